"""The trio floor: the cancel -> terminal-event hand-off with nothing of the runtime.

    python3 benchmarks/trio_floor.py [--turns 300] [--tokens-per-second 200]

``agent-runtime bench cancel --embedded`` measures the runtime's cancel ->
terminal event read; this measures the same hand-off written in bare trio (a
task in its own cancel scope, a reader parked on a ParkingLot), so the ratio
says what the runtime itself costs on this machine.
"""

from __future__ import annotations

import argparse
import time

import trio

from bench._stats import summarize


async def bench_floor(turns: int, tokens_per_second: float) -> list[float]:
    """The same hand-off with nothing of the runtime: the trio floor on this machine.

    A "turn" task sleeps per token inside its own cancel scope and appends to a
    list; a reader task parks on a ParkingLot. Cancel -> the turn task wakes,
    appends a terminal marker and unparks -> the reader reads it. Our path can
    only be slower than this; the ratio says what the runtime itself costs.
    """
    delay = 1.0 / tokens_per_second

    async def turn(
        log: list[str],
        lot: trio.lowlevel.ParkingLot,
        task_status: trio.TaskStatus[trio.CancelScope],
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await trio.sleep(delay)
                log.append("delta")
                lot.unpark_all()
        log.append("terminal")
        lot.unpark_all()

    async def reader(log: list[str], lot: trio.lowlevel.ParkingLot, read_at: list[float]) -> None:
        seen = 0
        while True:
            while seen < len(log):
                if log[seen] == "terminal":
                    read_at.append(time.perf_counter())
                    return
                seen += 1
            await lot.park()

    samples: list[float] = []
    for _ in range(turns):
        log: list[str] = []
        lot = trio.lowlevel.ParkingLot()
        read_at: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, log, lot, read_at)
            scope = await nursery.start(turn, log, lot)
            await trio.sleep(delay * 20)
            started = time.perf_counter()
            scope.cancel()
        samples.append(read_at[0] - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description="the trio floor of a cancel hand-off")
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--tokens-per-second", type=float, default=200.0)
    args = parser.parse_args()
    samples = trio.run(bench_floor, args.turns, args.tokens_per_second)
    summary = summarize([s * 1000 for s in samples])
    assert summary is not None
    print(
        f"trio floor, {summary.count} turns: p50 {summary.p50 * 1000:.0f} us, "
        f"p90 {summary.p90 * 1000:.0f} us, p99 {summary.p99 * 1000:.0f} us, "
        f"max {summary.max * 1000:.0f} us"
    )


if __name__ == "__main__":
    main()

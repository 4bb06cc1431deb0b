"""Cancel latency and idle-session memory of the embedded runtime (no HTTP).

Measures, for N turns each cancelled at a random point mid-stream, the time
from ``await turn.cancel()`` to the terminal event being read by a separate
reader task (the path an SSE writer takes), and the resident memory of many
idle sessions. Prints a table and writes JSON.

    python3 benchmarks/embedded_cancel.py --turns 1000 --sessions 10000 \\
        --json benchmarks/results/embedded_cancel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.progress import track
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import DemoModel, Event, MessageCancelled, Runtime, Turn


def rss_bytes() -> int:
    """This process's resident set size, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def cancel_one(rt: Runtime, session_id: str, cancel_after_events: int) -> float:
    """Run one turn, cancel it after the reader saw ``cancel_after_events``; return seconds."""
    session = rt.get_session(session_id)
    turn: Turn = await session.send("Write a 100000-word essay on cancellation")
    seen = trio.Event()
    terminal_at: list[float] = []
    terminal: list[Event] = []

    async def reader() -> None:
        count = 0
        async for event in turn.events():
            count += 1
            if count == cancel_after_events:
                seen.set()
            if event.is_terminal:
                terminal_at.append(time.perf_counter())
                terminal.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await seen.wait()
        started = time.perf_counter()
        await turn.cancel()
    assert isinstance(terminal[0], MessageCancelled), terminal
    return terminal_at[0] - started


async def bench_cancel(turns: int, tokens_per_second: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    samples: list[float] = []
    with tempfile.TemporaryDirectory() as data_dir:
        model = DemoModel(tokens_per_second=tokens_per_second)
        async with Runtime.open(data_dir=data_dir, model=model) as rt:
            session = await rt.create_session()
            for _ in track(range(turns), description="cancelling turns", transient=True):
                samples.append(await cancel_one(rt, session.id, rng.randint(2, 60)))
            # Nothing of a cancelled turn was billed.
            assert await rt.store.usage_records("local") == []
    return samples


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


async def bench_sessions(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        async with Runtime.open(data_dir=data_dir) as rt:
            before = rss_bytes()
            started = time.perf_counter()
            for _ in track(range(count), description="creating sessions", transient=True):
                await rt.create_session()
            elapsed = time.perf_counter() - started
            after = rss_bytes()
            assert rt.statistics().sessions == count
    return {
        "sessions": count,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "per_session_kb": (after - before) / count / 1024,
        "create_per_second": count / elapsed,
    }


def summarize(micros: list[float]) -> dict[str, float]:
    return {
        "turns": len(micros),
        "p50_us": percentile(micros, 50),
        "p90_us": percentile(micros, 90),
        "p99_us": percentile(micros, 99),
        "max_us": max(micros),
        "mean_us": statistics.fmean(micros),
    }


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "platform": platform.platform(),
        "commit": commit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--tokens-per-second", type=float, default=1000.0)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write raw samples and the summary here")
    args = parser.parse_args()
    console = Console()

    micros = [
        s * 1e6 for s in trio.run(bench_cancel, args.turns, args.tokens_per_second, args.seed)
    ]
    floor = [s * 1e6 for s in trio.run(bench_floor, args.turns, args.tokens_per_second)]
    summary, floor_summary = summarize(micros), summarize(floor)
    memory = trio.run(bench_sessions, args.sessions)

    table = Table(title=f"cancel -> terminal event read ({len(micros)} turns)")
    for column in ("", "p50 µs", "p90 µs", "p99 µs", "max µs", "target p99"):
        table.add_column(column, justify="right")
    keys = ("p50_us", "p90_us", "p99_us", "max_us")
    table.add_row("runtime", *(f"{summary[k]:.0f}" for k in keys), "<= 200")
    table.add_row("trio floor", *(f"{floor_summary[k]:.0f}" for k in keys), "")
    console.print(table)
    mem = Table(title=f"{memory['sessions']:.0f} idle sessions")
    for column in ("RSS before MB", "RSS after MB", "KiB / session", "created / s", "target"):
        mem.add_column(column, justify="right")
    mem.add_row(
        f"{memory['rss_before_mb']:.1f}",
        f"{memory['rss_after_mb']:.1f}",
        f"{memory['per_session_kb']:.1f}",
        f"{memory['create_per_second']:.0f}",
        "<= 300 MB",
    )
    console.print(mem)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "machine": machine(),
            "args": vars(args) | {"json": str(args.json)},
            "cancel": summary,
            "cancel_samples_us": micros,
            "trio_floor": floor_summary,
            "trio_floor_samples_us": floor,
            "idle_sessions": memory,
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

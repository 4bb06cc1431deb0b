"""Cancel -> upstream socket closed, with the OpenAI-compatible model.

An in-process fake OpenAI-compatible upstream (``tests/fake_upstream.py``)
streams tokens forever at a fixed pace; the runtime runs turns against it
with :class:`runtime.OpenAIModel`, ``--concurrency`` at a time, each cancelled
after a random number of events. Per turn: the time from the cancel being
accepted to the upstream seeing its socket closed, the chunks the upstream
wrote after the cancel was accepted, deltas appended after it (must be 0) and
billing (must be none).

    python3 benchmarks/upstream_cancel.py --turns 200 --concurrency 20 \\
        --json benchmarks/results/upstream_cancel.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embedded_cancel import machine, percentile  # noqa: E402

from bench.fake_upstream import Stream, open_fake_upstream  # noqa: E402
from runtime import OpenAIModel, Pricing, Runtime, TextDelta  # noqa: E402


async def one_turn(rt: Runtime, up: Any, label: str, cancel_after: int) -> dict[str, Any]:
    session = await rt.create_session()
    turn = await session.send(label)
    seen = 0
    async for event in turn.events():
        if isinstance(event, TextDelta):
            seen += 1
            if seen >= cancel_after:
                break
    [index] = [
        i for i, r in enumerate(up.requests) if r["json"]["messages"][-1]["content"] == label
    ]
    sent_at_cancel = up.chunks_sent.get(index, 0)
    accepted_at = trio.current_time()
    appended_at_cancel = len(turn.buffer)
    await turn.cancel()
    with trio.fail_after(5):
        closed_at = await up.wait_disconnected(index)
    terminal = await turn.wait_finished()
    appended_after = len(turn.buffer) - appended_at_cancel - 1  # minus the terminal
    await rt.delete_session(session.id)
    return {
        "close_ms": (closed_at - accepted_at) * 1e3,
        "upstream_chunks_after_cancel": up.chunks_sent.get(index, 0) - sent_at_cancel,
        "events_appended_after_cancel": appended_after,
        "terminal": terminal.type,
    }


async def main_async(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    rng = random.Random(args.seed)
    samples: list[dict[str, Any]] = []
    script = [Stream.endless(text_chunk="tok ", delay=1 / args.tokens_per_second)]
    async with open_fake_upstream(script) as up:
        model = OpenAIModel(base_url=up.base_url, model="bench", api_key="sk-bench")
        with tempfile.TemporaryDirectory() as data_dir:
            async with (
                model,
                Runtime.open(
                    data_dir=data_dir, model=model, prices={"bench": Pricing(1.0, 2.0)}
                ) as rt,
            ):
                done = 0
                while done < args.turns:
                    batch = min(args.concurrency, args.turns - done)

                    async def run(i: int) -> None:
                        label = f"turn {i}"
                        samples.append(await one_turn(rt, up, label, rng.randint(2, 40)))

                    async with trio.open_nursery() as nursery:
                        for i in range(done, done + batch):
                            nursery.start_soon(run, i)
                    done += batch
                billed = len(await rt.store.usage_records("local"))
    return samples, billed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--tokens-per-second", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    samples, billed = trio.run(main_async, args)
    close = [s["close_ms"] for s in samples]
    after = sum(s["upstream_chunks_after_cancel"] for s in samples)
    appended = sum(s["events_appended_after_cancel"] for s in samples)
    bad = sum(1 for s in samples if s["terminal"] != "message.cancelled")
    summary = {
        "turns": len(samples),
        "close_p50_ms": percentile(close, 50),
        "close_p99_ms": percentile(close, 99),
        "close_max_ms": max(close),
        "upstream_chunks_after_cancel": after,
        "events_appended_after_cancel": appended,
        "billed_turns": billed,
        "bad_terminals": bad,
    }
    table = Table(title=f"cancel -> upstream socket closed ({args.concurrency} concurrent)")
    for column in (
        "turns",
        "p50 ms",
        "p99 ms",
        "max ms",
        "upstream chunks after",
        "appended after",
        "billed",
        "target p99",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        str(len(samples)),
        f"{summary['close_p50_ms']:.2f}",
        f"{summary['close_p99_ms']:.2f}",
        f"{summary['close_max_ms']:.2f}",
        str(after),
        str(appended),
        str(billed),
        "<= 50",
    )
    Console(width=140).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "machine": machine(),
            "args": {**vars(args), "json": str(args.json)},
            "summary": summary,
            "samples": samples,
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

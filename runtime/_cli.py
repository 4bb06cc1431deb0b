"""``agent-runtime``: the command line.

``agent-runtime demo PROMPT`` runs one turn on the embedded runtime (no HTTP)
and prints its events; ``--cancel-after S`` cancels it mid-stream and reports
how long the cancel took to land. The HTTP server (``serve``) and the
benchmark (``bench``) subcommands are separate pieces of work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import trio

from ._demo import DemoModel
from ._events import MessageCancelled, MessageCompleted, MessageError, TextDelta
from ._runtime import Runtime

if TYPE_CHECKING:
    from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime",
        description="A self-hosted, actor-based agent runtime whose cancel really stops the work.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run one turn on the embedded runtime (demo model, no HTTP) and print its events",
        description=(
            "Run one session turn in-process with the demo model and print its events. "
            "Try 'Write a 300-word essay on trio', or lines 'run: CMD' / 'write FILE: TEXT'."
        ),
    )
    demo.add_argument("prompt", help="the message to send")
    demo.add_argument(
        "--tokens-per-second",
        type=float,
        default=50.0,
        help="demo model speed in words per second (default: 50)",
    )
    demo.add_argument(
        "--cancel-after",
        type=float,
        metavar="SECONDS",
        help="cancel the turn this many seconds after it starts",
    )
    demo.add_argument(
        "--data-dir",
        help="where session workspaces live (default: a temporary directory)",
    )
    return parser


async def _demo(args: argparse.Namespace, data_dir: str) -> int:
    model = DemoModel(tokens_per_second=args.tokens_per_second or None)
    async with Runtime.open(data_dir=data_dir, model=model) as rt:
        session = await rt.create_session()
        turn = await session.send(args.prompt)
        print(f"[{turn.id}]", file=sys.stderr)
        cancelled_at: list[float] = []

        async def cancel_later(delay: float) -> None:
            await trio.sleep(delay)
            cancelled_at.append(time.perf_counter())
            outcome = await turn.cancel()
            print(f"\n[cancel -> {outcome.value}]", file=sys.stderr)

        async with trio.open_nursery() as nursery:
            if args.cancel_after is not None:
                nursery.start_soon(cancel_later, args.cancel_after)
            async for event in turn.events():
                if isinstance(event, TextDelta):
                    print(event.content, end="", flush=True)
                elif event.type not in ("text.start", "text.stop"):
                    print(f"\n[{event.sequence_number} {event.type}]", file=sys.stderr)
            nursery.cancel_scope.cancel()
        terminal = turn.buffer.terminal
        if isinstance(terminal, MessageCompleted):
            usage = terminal.usage
            print(f"\n[completed: {usage.input_tokens} in, {usage.output_tokens} out]")
        elif isinstance(terminal, MessageCancelled):
            lag = (time.perf_counter() - cancelled_at[0]) * 1e6 if cancelled_at else 0.0
            print(
                f"\n[cancelled ({terminal.reason}); terminal event read {lag:.0f} us after cancel]"
            )
        elif isinstance(terminal, MessageError):
            print(f"\n[error: {terminal.error}]")
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agent-runtime`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.data_dir:
            return trio.run(_demo, args, args.data_dir)
        with tempfile.TemporaryDirectory(prefix="agent-runtime-") as tmp:
            return trio.run(_demo, args, tmp)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

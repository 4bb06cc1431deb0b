"""``agent-runtime``: the command line (serve, demo)."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Final

import trio

from runtime import (
    DemoModel,
    MemoryStore,
    MessageCancelled,
    MessageCompleted,
    MessageError,
    Model,
    OpenAIModel,
    Pricing,
    Runtime,
    TextDelta,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

DESCRIPTION: Final = (
    "agent-runtime: a self-hosted, actor-based agent runtime whose cancel really stops the work."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-runtime", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP API server (hypercorn, trio)",
        description=(
            "Serve the agent API of DESIGN.md over HTTP. SIGTERM/SIGINT drain: running "
            "turns end *.cancelled (reason shutdown, unbilled), then the server exits."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any)")
    serve.add_argument(
        "--data-dir", default="./data", help="session workspaces live here (default ./data)"
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this API key (repeatable); each gets an account with 1000 credits. With none, "
        "a key is created and printed once",
    )
    serve.add_argument(
        "--model",
        default="demo",
        help="'demo' (default; a scripted model, no LLM) or 'openai:MODEL' for an "
        "OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama); its key comes from "
        "OPENAI_API_KEY (optional for local servers)",
    )
    serve.add_argument(
        "--openai-base-url",
        default="https://api.openai.com/v1",
        metavar="URL",
        help="base URL of the OpenAI-compatible server (default https://api.openai.com/v1; "
        "vLLM http://127.0.0.1:8000/v1, Ollama http://127.0.0.1:11434/v1, "
        "llama.cpp http://127.0.0.1:8080/v1)",
    )
    serve.add_argument(
        "--openai-read-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="fail a turn whose upstream sends nothing for this long (default 120)",
    )
    serve.add_argument(
        "--price",
        type=float,
        nargs=2,
        default=(1.0, 2.0),
        metavar=("INPUT", "OUTPUT"),
        help="credits per million input and output tokens of the served model (default 1 2)",
    )
    serve.add_argument(
        "--demo-tokens-per-second",
        type=float,
        default=50.0,
        metavar="N",
        help="demo model speed in words per second (default 50)",
    )
    serve.add_argument(
        "--max-upload-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="N",
        help="largest file upload (PUT .../files/PATH) in bytes (default 64 MiB); JSON "
        "bodies are limited to 1 MiB",
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=120.0,
        metavar="N",
        help="how long a finished turn stays resumable and cancellable (default 120)",
    )

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


async def _serve(args: argparse.Namespace) -> int:
    from ._serve import serve

    model: Model
    if args.model == "demo":
        model = DemoModel(tokens_per_second=args.demo_tokens_per_second or None)
    elif args.model.startswith("openai:") and len(args.model) > len("openai:"):
        model = OpenAIModel(
            base_url=args.openai_base_url,
            model=args.model.removeprefix("openai:"),
            api_key=os.environ.get("OPENAI_API_KEY") or None,
            read_timeout=args.openai_read_timeout,
        )
    else:
        print(
            f"agent-runtime: unknown model {args.model!r}; use 'demo' or 'openai:MODEL'",
            file=sys.stderr,
        )
        return 2
    store = MemoryStore(default_credits=0.0)
    keys = list(args.api_key)
    created = None
    if not keys and not store.has_api_keys:
        created = f"pk_local_{secrets.token_urlsafe(24)}"
        keys.append(created)
    for key in keys:
        store.ensure_account_for_key(key)
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(model, OpenAIModel):
            await stack.enter_async_context(model)
        rt = await stack.enter_async_context(
            Runtime.open(
                data_dir=args.data_dir,
                model=model,
                store=store,
                grace_seconds=args.grace_seconds,
                prices={model.name: Pricing(*args.price)},
            )
        )

        def ready(binds: list[str]) -> None:
            print(f"agent-runtime serving on {', '.join(binds)}", flush=True)
            if created is not None:
                print(f"API key (shown once, stored only as a hash): {created}", flush=True)

        await serve(
            rt,
            host=args.host,
            port=args.port,
            on_ready=ready,
            file_limit=args.max_upload_bytes,
        )
    return 0


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
    if args.command == "serve":
        return trio.run(_serve, args)
    if args.command == "demo":
        if args.data_dir:
            return trio.run(_demo, args, args.data_dir)
        with tempfile.TemporaryDirectory(prefix="agent-runtime-") as tmp:
            return trio.run(_demo, args, tmp)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

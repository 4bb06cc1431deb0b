"""``agent-runtime``: the command line (serve, demo, keys, credits, limits, bench)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sqlite3
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Final

import trio

from runtime import (
    AgentRuntimeError,
    CreditMode,
    DemoModel,
    InvalidRequest,
    MessageCancelled,
    MessageCompleted,
    MessageError,
    Model,
    OpenAIModel,
    Pricing,
    Runtime,
    SandboxMode,
    SQLiteStore,
    StoreError,
    TextDelta,
    ToolLimits,
    WindowLimit,
)
from runtime._records import BUCKETS, WINDOWS
from runtime._sandbox import choose_sandbox
from runtime._sqlite import (
    account_of_key,
    add_credits,
    create_key,
    database_path,
    list_keys,
    open_database,
    set_limit,
    set_mode,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from runtime import Account

#: Credits of the account a new key gets from ``serve``.
NEW_KEY_CREDITS: Final = 1000.0
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
    _data_dir(serve)
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this API key (repeatable); a key new to the store gets an account with "
        "1000 credits. With none given and none stored, a key is created and printed once",
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
    tools = serve.add_argument_group(
        "tools", "where run_shell runs and its limits per call (the shell and its children)"
    )
    tools.add_argument(
        "--sandbox",
        choices=("auto", "bwrap", "none"),
        default="auto",
        help="'auto' (default): a bubblewrap sandbox if bwrap works here, else none with a "
        "warning; 'bwrap': the sandbox or refuse to start; 'none': a process group only",
    )
    defaults = ToolLimits()
    for flag, field, kind, unit in (
        ("--tool-timeout", "wall_seconds", float, "SECONDS"),
        ("--tool-cpu-seconds", "cpu_seconds", int, "SECONDS"),
        ("--tool-memory", "memory_bytes", int, "BYTES"),
        ("--tool-max-file-size", "file_size_bytes", int, "BYTES"),
        ("--tool-open-files", "open_files", int, "N"),
        ("--tool-max-output", "output_bytes", int, "BYTES"),
    ):
        tools.add_argument(
            flag,
            dest=field,
            type=kind,
            default=getattr(defaults, field),
            metavar=unit,
            help=f"{_LIMIT_HELP[field]} (default {getattr(defaults, field)})",
        )

    keys = sub.add_parser(
        "keys", help="create and list API keys (on the data dir's store)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    create = keys.add_parser(
        "create",
        help="create a key and print it once (only its hash is stored)",
        description="Create an API key and print it once; the store keeps only its hash. "
        "The key gets a new account unless --account names one.",
    )
    _data_dir(create)
    create.add_argument(
        "--credits",
        type=float,
        default=NEW_KEY_CREDITS,
        help=f"balance of the new account (default {NEW_KEY_CREDITS:g})",
    )
    create.add_argument(
        "--mode",
        choices=[m.value for m in CreditMode],
        default="hard",
        help="credit mode of the new account: hard refuses turns with 402 at the per-turn "
        "minimum, soft only records debits (default hard)",
    )
    create.add_argument("--account", metavar="ACCOUNT_ID", help="add the key to this account")
    listing = keys.add_parser(
        "list", help="list key ids, prefixes, accounts and balances (never the keys)"
    )
    _data_dir(listing)

    credits = sub.add_parser(
        "credits", help="change the credits of the account of a key"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    add = credits.add_parser("add", help="add N credits (negative to remove) to KEY_ID's account")
    _data_dir(add)
    add.add_argument("key_id", metavar="KEY_ID", help="a key id from 'keys list' (key_...)")
    add.add_argument("amount", type=float, metavar="N")
    mode = credits.add_parser("mode", help="set the credit mode of KEY_ID's account")
    _data_dir(mode)
    mode.add_argument("key_id", metavar="KEY_ID")
    mode.add_argument("mode", choices=[m.value for m in CreditMode])
    mode.add_argument(
        "--min-balance",
        type=float,
        metavar="X",
        help="hard mode refuses a new turn unless the balance is above X (default 0)",
    )

    limits = sub.add_parser(
        "limits", help="set the rate limits of the account of a key"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    limit = limits.add_parser(
        "set",
        help="limit turns and/or tokens per hour or day for one bucket",
        description="Set the most turns (a turn counts when it starts, cancelled or not) and "
        "tokens (of completed turns) one bucket of KEY_ID's account may use per window. "
        "Past it, new turns get 429 with Retry-After. Give neither maximum to remove the "
        "limit.",
    )
    _data_dir(limit)
    limit.add_argument("key_id", metavar="KEY_ID")
    limit.add_argument("--bucket", choices=BUCKETS, required=True)
    limit.add_argument("--window", choices=tuple(WINDOWS), required=True)
    limit.add_argument("--max-turns", type=int, metavar="N")
    limit.add_argument("--max-tokens", type=int, metavar="N")

    from bench._cli import add_parser as add_bench

    add_bench(sub)

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


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default="./data",
        help="holds the store (agent-runtime.db) and session workspaces (default ./data)",
    )


_LIMIT_HELP: Final = {
    "wall_seconds": "wall time, then the call is killed",
    "cpu_seconds": "CPU time",
    "memory_bytes": "address space",
    "file_size_bytes": "largest file written",
    "open_files": "open files per process",
    "output_bytes": "output kept; past it the call is stopped",
}


class _RedactingFormatter(logging.Formatter):
    """Log lines with the data dir's path replaced by ``$DATA_DIR``: exception
    texts name its files, and no host path goes into a log line."""

    def __init__(self, data_dir: str) -> None:
        super().__init__("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
        paths = {os.path.abspath(data_dir), os.path.realpath(data_dir)}
        self._paths = sorted(paths, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for path in self._paths:
            text = text.replace(path, "$DATA_DIR")
        return text


def _log_to_stderr(data_dir: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(data_dir))
    logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)


async def _serve(args: argparse.Namespace) -> int:
    from ._serve import serve

    _log_to_stderr(args.data_dir)

    try:
        limits = ToolLimits(**{field: getattr(args, field) for field in _LIMIT_HELP})
        sandbox = choose_sandbox(args.sandbox, args.data_dir)
    except ValueError as exc:
        print(f"agent-runtime: {exc}", file=sys.stderr)
        return 2
    if sandbox.mode is SandboxMode.NONE:
        print(
            f"agent-runtime: WARNING: {sandbox.reason}. Tool commands run as this user on the "
            "host's file system and network, in a process group that is killed with its "
            "turn; install bubblewrap for the sandbox.",
            file=sys.stderr,
            flush=True,
        )

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
    async with contextlib.AsyncExitStack() as stack:
        os.makedirs(args.data_dir, exist_ok=True)
        store = await stack.enter_async_context(
            SQLiteStore.open(database_path(args.data_dir), default_credits=0.0)
        )
        created = None
        for key in args.api_key:
            await store.ensure_account_for_key(key, credits=NEW_KEY_CREDITS)
        if not args.api_key and not await store.has_api_keys():
            created, _ = await store.run(lambda conn: create_key(conn, credits=NEW_KEY_CREDITS))
        if isinstance(model, OpenAIModel):
            await stack.enter_async_context(model)
        rt = await stack.enter_async_context(
            Runtime.open(
                data_dir=args.data_dir,
                model=model,
                store=store,
                grace_seconds=args.grace_seconds,
                tool_limits=limits,
                sandbox=sandbox,
                prices={model.name: Pricing(*args.price)},
            )
        )

        def ready(binds: list[str]) -> None:
            print(f"agent-runtime serving on {', '.join(binds)}", flush=True)
            if created is not None:
                print(f"API key (shown once, stored only as a hash): {created}", flush=True)

        # What is alive now (modules, the app, the runtime) lives as long as
        # the process: keep it out of the collector's full passes, which
        # otherwise stop the event loop for tens of ms under load.
        gc.collect()
        gc.freeze()
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


def _admin(args: argparse.Namespace) -> int:
    """keys / credits / limits: one transaction on the data dir's store.

    Safe while ``serve`` runs on the same data dir (WAL; the server reads
    balances, limits and unknown keys from the database).
    """
    path = database_path(args.data_dir)
    if args.command != "keys" or args.action != "create":
        if not path.exists():
            print(f"agent-runtime: no store at {path} (see --data-dir)", file=sys.stderr)
            return 1
    else:
        os.makedirs(args.data_dir, exist_ok=True)
    try:
        conn = open_database(path)
    except (StoreError, OSError) as exc:
        print(f"agent-runtime: cannot open the store {path}: {exc}", file=sys.stderr)
        return 1
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            show = _ADMIN[(args.command, args.action)](conn, args)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except (AgentRuntimeError, sqlite3.Error) as exc:
        print(f"agent-runtime: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    show()
    return 0


def _keys_create(conn: sqlite3.Connection, args: argparse.Namespace) -> Callable[[], None]:
    key, info = create_key(
        conn, credits=args.credits, mode=CreditMode(args.mode), account_id=args.account
    )

    def show() -> None:
        print(f"API key (shown once, stored only as a hash): {key}")
        print(
            f"key id {info.id}, account {info.account_id}, "
            f"{info.mode.value} mode, balance {info.balance:g}"
        )

    return show


def _keys_list(conn: sqlite3.Connection, args: argparse.Namespace) -> Callable[[], None]:
    from rich.console import Console
    from rich.table import Table

    keys = list_keys(conn)
    table = Table("key id", "prefix", "account", "mode", "balance", "created")
    for column in table.columns:
        column.no_wrap = True  # ids are copied from here: never fold or cut them
    for info in keys:
        table.add_row(
            info.id,
            info.prefix + "…",
            info.account_id,
            info.mode.value,
            f"{info.balance:g}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created_at)),
        )

    def show() -> None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=240)  # piped: whole rows, for grep and scripts
        console.print(table if keys else "no keys")

    return show


def _show_account(account: Account) -> Callable[[], None]:
    def show() -> None:
        print(
            f"account {account.id}: {account.mode.value} mode, balance {account.balance:g} "
            f"(hard mode refuses new turns at {account.min_balance:g} or less)"
        )
        for lim in account.limits:
            print(
                f"  limit {lim.bucket}/{lim.window}: turns {lim.max_turns or 'unlimited'}, "
                f"tokens {lim.max_tokens or 'unlimited'}"
            )

    return show


def _credits_add(conn: sqlite3.Connection, args: argparse.Namespace) -> Callable[[], None]:
    return _show_account(add_credits(conn, account_of_key(conn, args.key_id), args.amount))


def _credits_mode(conn: sqlite3.Connection, args: argparse.Namespace) -> Callable[[], None]:
    account_id = account_of_key(conn, args.key_id)
    return _show_account(set_mode(conn, account_id, CreditMode(args.mode), args.min_balance))


def _limits_set(conn: sqlite3.Connection, args: argparse.Namespace) -> Callable[[], None]:
    try:
        limit = WindowLimit(
            bucket=args.bucket,
            window=args.window,
            max_turns=args.max_turns,
            max_tokens=args.max_tokens,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return _show_account(set_limit(conn, account_of_key(conn, args.key_id), limit))


_ADMIN: Final[
    dict[tuple[str, str], Callable[[sqlite3.Connection, argparse.Namespace], Callable[[], None]]]
] = {
    ("keys", "create"): _keys_create,
    ("keys", "list"): _keys_list,
    ("credits", "add"): _credits_add,
    ("credits", "mode"): _credits_mode,
    ("limits", "set"): _limits_set,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agent-runtime`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            return trio.run(_serve, args)
        except StoreError as exc:
            print(f"agent-runtime: {exc}", file=sys.stderr)
            return 1
    if args.command in ("keys", "credits", "limits"):
        return _admin(args)
    if args.command == "bench":
        from bench._cli import main as bench

        return bench(args)
    if args.command == "demo":
        if args.data_dir:
            return trio.run(_demo, args, args.data_dir)
        with tempfile.TemporaryDirectory(prefix="agent-runtime-") as tmp:
            return trio.run(_demo, args, tmp)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

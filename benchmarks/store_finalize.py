"""Durable store: finalize latency and throughput of the SQLite store (WAL).

A turn's finalize awaits one store call, ``Store.complete_turn`` (usage
record + debit + final turn record in one transaction). For N sessions at once
(``--levels``), N trio tasks each loop ``begin_turn`` -> ``complete_turn``, the
second timed, until ``--count`` turns or ``--seconds`` have passed, on a fresh
database per level. Reported per level: finalize latency (p50/p99/max), turns
completed per second (each turn = its begin + its finalize), then a
finalize-only phase (as many turns begun first, untimed; then only their
``complete_turn``: finalize transactions per second). A ledger check ends each
level: usage rows == finalizes, distinct response ids, debits == balance drop,
completed turn rows == finalizes.

Configurations (``--configs``):

* ``normal``: ``SQLiteStore`` as shipped (one writer thread, group commit,
  ``synchronous=NORMAL``);
* ``full``: the same with ``synchronous="FULL"`` (fsync per commit);
* ``to_thread``: baseline, ``trio.to_thread.run_sync`` per call (trio's
  default limiter, 40 threads), a connection per thread, each call its own
  ``BEGIN IMMEDIATE``/``COMMIT`` (``NORMAL``); the statements are the
  store's own operation functions, so only dispatch and commits differ;
* ``to_thread_1``: the same with ``CapacityLimiter(1)`` (no lock contention,
  still a commit per call);
* ``runtime`` / ``runtime_memory``: end to end through ``Runtime.open`` with
  ``DemoModel(tokens_per_second=None)``, N sessions sending short prompts;
  the time is from the turn entering FINALIZING (``_for_testing_finalizing``
  hook, just before ``complete_turn``) to ``turn.wait_finished()`` returning
  in the sending task; ``runtime_memory`` is the same with ``MemoryStore``,
  so the difference is what durability adds.

``--think-ms T`` makes each store-level session pause ~T ms (uniform 0.5T to
1.5T, random start offset) between turns, i.e. sessions that are not all
finalizing back to back. ``--wal-autocheckpoint PAGES`` (diagnostic) sets the
writer's automatic WAL checkpoint threshold through ``store.run`` (SQLite's
default is 1000 pages; 0 turns it off and the WAL grows for the whole level).
The WAL's size at the end of each level is reported.

    python3 benchmarks/store_finalize.py --levels 1 20 100 --count 20000 --seconds 5 \\
        --json benchmarks/results/store_finalize.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import attrs
import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench._samples import machine_info  # noqa: E402
from bench._stats import percentile  # noqa: E402
from runtime import (  # noqa: E402
    DEFAULT_ACCOUNT,
    DemoModel,
    MemoryStore,
    MessageCompleted,
    Runtime,
    SessionRecord,
    SQLiteStore,
    Turn,
    TurnRecord,
    Usage,
    UsageRecord,
)
from runtime._sqlite import _begin_turn, _complete_turn  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from runtime import Store

T = TypeVar("T")

DB_NAME: Final = "agent-runtime.db"
CREDITS: Final = 1000.0
PROMPT: Final = "Say a 50-word hello"
#: A ~1 KB answer: the final turn record's output text.
ANSWER: Final = " ".join(["Each word of this text is streamed as its own delta."] * 20)
PRICE_IN, PRICE_OUT = 1.0, 2.0  # the demo model's credits per million tokens
#: End to end: turns per session before it is deleted and a new one made (a
#: session's history is resent to the model on every turn).
TURNS_PER_SESSION: Final = 20
STORE_CONFIGS: Final = ("normal", "full", "to_thread", "to_thread_1")
E2E_CONFIGS: Final = ("runtime", "runtime_memory")


# -- records -------------------------------------------------------------------


def new_turn(session_id: str) -> TurnRecord:
    return TurnRecord(
        id=f"msg_{random.getrandbits(128):032x}",
        account_id=DEFAULT_ACCOUNT,
        session_id=session_id,
        model="demo",
        status="in_progress",
        input=PROMPT,
        created_at=time.time(),
    )


def finished(record: TurnRecord) -> tuple[UsageRecord, TurnRecord]:
    """What ``Turn._finalize`` hands ``complete_turn`` for a completed turn."""
    now = time.time()
    usage = Usage(input_tokens=len(PROMPT.split()), output_tokens=len(ANSWER.split()))
    ledger = UsageRecord(
        response_id=record.id,
        account_id=record.account_id,
        session_id=record.session_id,
        model=record.model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        credits=(usage.input_tokens * PRICE_IN + usage.output_tokens * PRICE_OUT) / 1e6,
        created_at=now,
    )
    final = attrs.evolve(
        record, status="completed", output_text=ANSWER, usage=usage, finished_at=now
    )
    return ledger, final


def session_record(session_id: str) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        id=session_id,
        account_id=DEFAULT_ACCOUNT,
        ttl=3600.0,
        metadata={},
        model="demo",
        created_at=now,
        last_activity=now,
    )


# -- backends ------------------------------------------------------------------


class Backend(Protocol):
    async def save_session(self, record: SessionRecord) -> None: ...
    async def begin(self, record: TurnRecord) -> None: ...
    async def complete(self, usage: UsageRecord, record: TurnRecord) -> bool: ...


@attrs.define
class WriterBackend:
    """The store as shipped."""

    store: SQLiteStore

    async def save_session(self, record: SessionRecord) -> None:
        await self.store.save_session(record)

    async def begin(self, record: TurnRecord) -> None:
        await self.store.begin_turn(record)

    async def complete(self, usage: UsageRecord, record: TurnRecord) -> bool:
        return await self.store.complete_turn(usage, record)


@attrs.define
class ToThreadBackend:
    """Baseline: ``trio.to_thread.run_sync`` per call, a connection per
    thread, each call a transaction (and a commit) of its own. The statements
    are the store's operation functions: only dispatch and commits differ."""

    path: Path
    synchronous: str
    limiter: trio.CapacityLimiter | None
    _local: threading.local = attrs.field(factory=threading.local, init=False)
    _conns: list[sqlite3.Connection] = attrs.field(factory=list, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # As the store's own connection (runtime._sqlite._connect).
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self._transaction, fn, limiter=self.limiter)

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    async def save_session(self, record: SessionRecord) -> None:
        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.account_id,
                    record.ttl,
                    "{}",
                    record.model,
                    record.created_at,
                    record.last_activity,
                ),
            )

        await self.call(save)

    async def begin(self, record: TurnRecord) -> None:
        await self.call(lambda conn: _begin_turn(conn, record))

    async def complete(self, usage: UsageRecord, record: TurnRecord) -> bool:
        return await self.call(lambda conn: _complete_turn(conn, usage, record))


@asynccontextmanager
async def open_backend(
    config: str, path: Path, autocheckpoint: int | None
) -> AsyncIterator[Backend]:
    if config in ("normal", "full"):
        synchronous = "FULL" if config == "full" else "NORMAL"
        async with SQLiteStore.open(
            path, default_credits=CREDITS, synchronous=synchronous
        ) as store:
            if autocheckpoint is not None:
                pragma = f"PRAGMA wal_autocheckpoint = {autocheckpoint:d}"
                await store.run(lambda c: c.execute(pragma).fetchone())
            yield WriterBackend(store)
        return
    # Schema and account made by the store itself, then closed.
    async with SQLiteStore.open(path, default_credits=CREDITS):
        pass
    limiter = trio.CapacityLimiter(1) if config == "to_thread_1" else None
    backend = ToThreadBackend(path, "NORMAL", limiter)
    try:
        yield backend
    finally:
        backend.close()


# -- measuring -----------------------------------------------------------------


def summarize(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = [s * 1e3 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
    }


@attrs.define
class Clock:
    """Wall and CPU time of a phase (CPU of every thread of the process)."""

    wall: float = attrs.field(factory=time.perf_counter)
    cpu: float = attrs.field(factory=time.process_time)

    def stop(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.wall
        return wall, (time.process_time() - self.cpu) / wall


async def ledger_check(store: Store, expected: int) -> dict[str, Any]:
    """Usage rows == finalizes, each once, and the debits add up to the balance."""
    records = await store.usage_records(DEFAULT_ACCOUNT, limit=expected + 1000)
    account = await store.get_account(DEFAULT_ACCOUNT)
    billed = math.fsum(r.credits for r in records)
    check: dict[str, Any] = {
        "finalizes": expected,
        "usage_rows": len(records),
        "distinct_ids": len({r.response_id for r in records}),
        "billed": billed,
        "balance_drop": CREDITS - account.balance,
    }
    if isinstance(store, SQLiteStore):
        query = "SELECT count(*) FROM turns WHERE status = 'completed'"
        check["completed_turn_rows"] = await store.run(lambda c: c.execute(query).fetchone()[0])
    check["ok"] = (
        check["usage_rows"] == check["distinct_ids"] == expected
        and check.get("completed_turn_rows", expected) == expected
        and abs(check["billed"] - check["balance_drop"]) < 1e-6
    )
    return check


async def store_level(
    config: str,
    sessions: int,
    count: int,
    seconds: float,
    think: float,
    autocheckpoint: int | None,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="store-finalize-") as data_dir:
        path = Path(data_dir) / DB_NAME
        async with open_backend(config, path, autocheckpoint) as backend:
            result = await _store_level(backend, sessions, count, seconds, think, progress)
            wal = path.with_name(path.name + "-wal")
            result["wal_mb"] = wal.stat().st_size / 2**20 if wal.exists() else 0.0
        # Checked by the store, with the public API, after the backend closed.
        async with SQLiteStore.open(path) as store:
            result["check"] = await ledger_check(store, result["finalizes_total"])
    return result


async def _store_level(
    backend: Backend,
    sessions: int,
    count: int,
    seconds: float,
    think: float,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    session_ids = [f"sess_{i:04d}" for i in range(sessions)]
    for sid in session_ids:
        await backend.save_session(session_record(sid))

    # Phase 1: each session loops begin -> finalize (timed).
    finalize: list[float] = []
    begin: list[float] = []
    issued = 0
    deadline = time.perf_counter() + seconds

    async def turns(sid: str) -> None:
        nonlocal issued
        if think:
            await trio.sleep(random.uniform(0, think))
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            record = new_turn(sid)
            t0 = time.perf_counter()
            await backend.begin(record)
            begin.append(time.perf_counter() - t0)
            usage, final = finished(record)
            t0 = time.perf_counter()
            written = await backend.complete(usage, final)
            finalize.append(time.perf_counter() - t0)
            assert written
            progress(1)
            if think:
                await trio.sleep(random.uniform(0.5 * think, 1.5 * think))

    clock = Clock()
    async with trio.open_nursery() as nursery:
        for sid in session_ids:
            nursery.start_soon(turns, sid)
    wall, cpu = clock.stop()
    done = len(finalize)

    # Phase 2: as many turns begun (untimed), then only finalized (timed).
    pending: list[tuple[UsageRecord, TurnRecord]] = []

    async def begin_some(sid: str, n: int) -> None:
        for _ in range(n):
            record = new_turn(sid)
            await backend.begin(record)
            pending.append(finished(record))

    async with trio.open_nursery() as nursery:
        for i, sid in enumerate(session_ids):
            nursery.start_soon(begin_some, sid, done // sessions + (i < done % sessions))
    only: list[float] = []
    deadline = time.perf_counter() + seconds

    async def finalize_only() -> None:
        while pending and time.perf_counter() < deadline:
            usage, final = pending.pop()
            t0 = time.perf_counter()
            written = await backend.complete(usage, final)
            only.append(time.perf_counter() - t0)
            assert written
            progress(1)

    clock = Clock()
    async with trio.open_nursery() as nursery:
        for _ in session_ids:
            nursery.start_soon(finalize_only)
    only_wall, only_cpu = clock.stop()
    return {
        "sessions": sessions,
        "turns": done,
        "wall_s": wall,
        "turns_per_s": done / wall,
        "store_calls_per_s": 2 * done / wall,
        "cpu_cores": cpu,
        "finalize": summarize(finalize),
        "begin": summarize(begin),
        "finalize_only": {
            "finalizes": len(only),
            "wall_s": only_wall,
            "tx_per_s": len(only) / only_wall,
            "cpu_cores": only_cpu,
            **summarize(only),
        },
        "finalizes_total": done + len(only),
    }


@asynccontextmanager
async def open_e2e_store(config: str, data_dir: str) -> AsyncIterator[Store]:
    if config == "runtime_memory":
        yield MemoryStore(default_credits=CREDITS)
        return
    async with SQLiteStore.open(Path(data_dir) / DB_NAME, default_credits=CREDITS) as store:
        yield store


async def e2e_level(
    config: str, sessions: int, count: int, seconds: float, progress: Callable[[int], None]
) -> dict[str, Any]:
    """N sessions through a real Runtime, each sending short prompts in turn."""
    finalizing_at: dict[str, float] = {}
    finalize: list[float] = []
    whole: list[float] = []
    issued = 0
    deadline = time.perf_counter() + seconds

    async def hook(turn: Turn) -> None:
        finalizing_at[turn.id] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="store-finalize-") as data_dir:
        async with (
            open_e2e_store(config, data_dir) as store,
            Runtime.open(
                data_dir=data_dir, model=DemoModel(tokens_per_second=None), store=store
            ) as rt,
        ):
            rt._for_testing_finalizing = hook

            async def converse() -> None:
                nonlocal issued
                while issued < count and time.perf_counter() < deadline:
                    session = await rt.create_session()
                    for _ in range(TURNS_PER_SESSION):
                        if issued >= count or time.perf_counter() >= deadline:
                            break
                        issued += 1
                        t0 = time.perf_counter()
                        turn = await session.send(PROMPT)
                        terminal = await turn.wait_finished()
                        t1 = time.perf_counter()
                        assert isinstance(terminal, MessageCompleted), terminal
                        finalize.append(t1 - finalizing_at.pop(turn.id))
                        whole.append(t1 - t0)
                        progress(1)
                    await rt.delete_session(session.id)

            clock = Clock()
            async with trio.open_nursery() as nursery:
                for _ in range(sessions):
                    nursery.start_soon(converse)
            wall, cpu = clock.stop()
            check = await ledger_check(store, len(finalize))
    return {
        "sessions": sessions,
        "turns": len(finalize),
        "wall_s": wall,
        "turns_per_s": len(finalize) / wall,
        "cpu_cores": cpu,
        "finalize_to_terminal": summarize(finalize),
        "send_to_terminal": summarize(whole),
        "check": check,
    }


@attrs.define
class Tally:
    n: int = 0

    def add(self, n: int) -> None:
        self.n += n


async def tick(bar: Progress, task: TaskID, done: Tally) -> None:
    """Refresh the progress bar off the measured path."""
    while True:
        bar.update(task, completed=done.n)
        await trio.sleep(0.2)


async def bench(args: argparse.Namespace, console: Console) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f} finalizes"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        for config in args.configs:
            for sessions in args.levels:
                task = bar.add_task(f"{config} N={sessions}", total=None)
                done = Tally()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tick, bar, task, done)
                    if config in E2E_CONFIGS:
                        result = await e2e_level(
                            config, sessions, args.count, args.seconds, done.add
                        )
                    else:
                        result = await store_level(
                            config,
                            sessions,
                            args.count,
                            args.seconds,
                            args.think_ms / 1e3,
                            args.wal_autocheckpoint,
                            done.add,
                        )
                    nursery.cancel_scope.cancel()
                bar.remove_task(task)
                result["config"] = config
                results.setdefault(config, []).append(result)
                if not result["check"]["ok"]:
                    console.print(f"[red]ledger check failed: {config} N={sessions}[/red]")
                    console.print(result["check"])
    return results


def report(
    results: dict[str, list[dict[str, Any]]], console: Console, args: argparse.Namespace
) -> None:
    think_ms = args.think_ms
    f1 = "{:.2f}".format
    store_rows = [r for c in STORE_CONFIGS for r in results.get(c, [])]
    if store_rows:
        pause = f", {think_ms:g} ms pauses" if think_ms else ""
        if args.wal_autocheckpoint is not None:
            pause += f", wal_autocheckpoint={args.wal_autocheckpoint}"
        table = Table(title=f"store: begin_turn -> complete_turn per session{pause} (ms)")
        for column in (
            "config",
            "N",
            "turns",
            "turns/s",
            "fin p50",
            "fin p99",
            "fin max",
            "begin p50",
            "fin-only tx/s",
            "fin-only p50",
            "fin-only p99",
            "CPU",
            "WAL MB",
            "ledger",
        ):
            table.add_column(column, justify="right")
        for r in store_rows:
            fin, beg, only = r["finalize"], r["begin"], r["finalize_only"]
            table.add_row(
                r["config"],
                str(r["sessions"]),
                str(r["turns"]),
                f"{r['turns_per_s']:.0f}",
                f1(fin["p50_ms"]),
                f1(fin["p99_ms"]),
                f1(fin["max_ms"]),
                f1(beg["p50_ms"]),
                f"{only['tx_per_s']:.0f}",
                f1(only["p50_ms"]),
                f1(only["p99_ms"]),
                f"{r['cpu_cores']:.0%}",
                f"{r['wal_mb']:.1f}",
                "ok" if r["check"]["ok"] else "[red]FAILED[/red]",
            )
        console.print(table)
    e2e_rows = [r for c in E2E_CONFIGS for r in results.get(c, [])]
    if e2e_rows:
        table = Table(title="end to end (Runtime, DemoModel unpaced): FINALIZING -> terminal (ms)")
        for column in (
            "store",
            "N",
            "turns",
            "turns/s",
            "fin p50",
            "fin p99",
            "fin max",
            "turn p50",
            "turn p99",
            "CPU",
            "ledger",
        ):
            table.add_column(column, justify="right")
        for r in e2e_rows:
            fin, whole = r["finalize_to_terminal"], r["send_to_terminal"]
            table.add_row(
                "sqlite" if r["config"] == "runtime" else "memory",
                str(r["sessions"]),
                str(r["turns"]),
                f"{r['turns_per_s']:.0f}",
                f1(fin["p50_ms"]),
                f1(fin["p99_ms"]),
                f1(fin["max_ms"]),
                f1(whole["p50_ms"]),
                f1(whole["p99_ms"]),
                f"{r['cpu_cores']:.0%}",
                "ok" if r["check"]["ok"] else "[red]FAILED[/red]",
            )
        console.print(table)
    for r in results.get("normal", []):
        if r["sessions"] == 100 and not think_ms and args.wal_autocheckpoint is None:
            p99, rate = r["finalize"]["p99_ms"], r["turns_per_s"]
            console.print(
                f"targets (normal, N=100): finalize p99 {p99:.2f} ms (<= 2: "
                f"{'met' if p99 <= 2 else 'missed'}), {rate:.0f} completed turns/s "
                f"(>= 2,000: {'met' if rate >= 2000 else 'missed'})"
            )


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--count", type=int, default=20_000, help="most turns per level")
    parser.add_argument("--seconds", type=float, default=5.0, help="most seconds per phase")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause between turns")
    parser.add_argument(
        "--wal-autocheckpoint",
        type=int,
        metavar="PAGES",
        help="diagnostic: set the writer's wal_autocheckpoint (normal, full); 0 = off "
        "(the WAL then grows for the whole level)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=STORE_CONFIGS + E2E_CONFIGS,
        default=list(STORE_CONFIGS + E2E_CONFIGS),
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "store_finalize.json"
    )
    args = parser.parse_args()
    if args.count < 1 or args.seconds <= 0 or min(args.levels) < 1:
        parser.error("--count, --seconds and --levels must be positive")
    random.seed(args.seed)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    results = trio.run(bench, args, console)
    report(results, console, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": machine_info() | {"sqlite": sqlite3.sqlite_version},
        "args": vars(args) | {"json": display_path(args.json)},
        "results": results,
    }
    args.json.write_text(json.dumps(out, indent=1))
    console.print(f"wrote {display_path(args.json)}")
    if not all(r["check"]["ok"] for rows in results.values() for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

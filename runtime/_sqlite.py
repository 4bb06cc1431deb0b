"""The SQLite store: the default :class:`~runtime.Store` of ``Runtime.open``
and ``agent-runtime serve``.

Theory of operation
-------------------
One database file, ``data_dir/agent-runtime.db``, in WAL mode, and one
connection owned by one writer thread. Every operation is a function of the
connection, sent to that thread through a queue. The thread takes whatever has
queued up and runs it as one transaction (group commit), each operation in its
own savepoint, so one failing operation (a rate limit, a constraint) rolls
back only itself, and a hundred turns finishing at once cost one commit. The
awaiting trio tasks are rescheduled from the thread with one
``run_sync_soon`` per batch.

Why one thread rather than ``trio.to_thread.run_sync`` per call: SQLite has
one writer at a time anyway, so a pool would queue on the database lock
instead of in our queue, and every call would pay for a commit of its own
(measured in ``benchmarks/store_finalize.py``: see RESULTS.md).

Waiting for an operation is cancellable while it is still queued (it is then
withdrawn and never runs); once the thread has taken it up, its caller waits
for how it ended, as with ``trio.to_thread.run_sync`` without
``abandon_on_cancel``. So the runtime's timeout on a turn's finalize bounds a
busy writer, and a write the caller gave up on is never half-done.

Durability: ``synchronous=NORMAL`` (the SQLite default for WAL). A committed
transaction survives the process being killed (``SIGKILL``, a crash); an OS
crash or power loss may lose the last commits, never corrupt the file. Pass
``synchronous="FULL"`` to fsync every commit.

Schema changes are forward migrations in :data:`MIGRATIONS`, applied at open
under an immediate transaction and recorded in ``schema_version``; a database
newer than this code is refused rather than misread.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import attrs
import cattrs
import outcome
import trio
from cattrs.strategies import configure_tagged_union

from ._errors import InvalidRequest, NotFound, StoreError, Unauthorized
from ._events import FunctionCall, OutputMessage, ResponseOptions
from ._model import ToolSpec
from ._records import (
    BUCKETS,
    WINDOWS,
    Account,
    CreditMode,
    IdempotencyRecord,
    Recovered,
    SessionRecord,
    TurnRecord,
    UsageRecord,
    UsageWindow,
    WindowLimit,
)
from ._store import (
    DEFAULT_ACCOUNT,
    KEY_RETENTION,
    PURGE_EVERY,
    TURN_RETENTION,
    check_credits,
    finite,
    hash_key,
    interrupted,
    new_account_id,
    refuse,
    tokens_free_at,
    window_report,
    without_output,
)

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator, Callable, Iterable

logger = logging.getLogger("runtime.store")

T = TypeVar("T")

#: The database's file name inside the data directory.
DB_NAME: Final = "agent-runtime.db"
#: Most operations run in one transaction.
MAX_BATCH: Final = 256
#: How long a statement waits for another process's write lock (ms).
BUSY_TIMEOUT_MS: Final = 5000
#: The checkpointer is woken every this many commits.
CHECKPOINT_EVERY: Final = 32
#: How long after its terminal event a cancelled or failed turn's record is
#: queued (a crash in between leaves it "interrupted", which it then was).
END_DELAY: Final = 0.005
#: Past this size the writer truncates the WAL itself (a rare, bounded stall).
WAL_CAP: Final = 64 * 1024 * 1024

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: accounts, keys, limits, ledger, sessions, turns, idempotency keys.
    """
    CREATE TABLE accounts (
        id          TEXT PRIMARY KEY,
        balance     REAL NOT NULL,
        mode        TEXT NOT NULL CHECK (mode IN ('soft', 'hard')),
        min_balance REAL NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL
    );
    CREATE TABLE api_keys (
        id         TEXT PRIMARY KEY,
        hash       BLOB NOT NULL UNIQUE,
        prefix     TEXT NOT NULL,
        account_id TEXT NOT NULL REFERENCES accounts (id),
        created_at REAL NOT NULL
    );
    CREATE TABLE rate_limits (
        account_id TEXT NOT NULL REFERENCES accounts (id),
        bucket     TEXT NOT NULL,
        window     TEXT NOT NULL,
        max_turns  INTEGER,
        max_tokens INTEGER,
        PRIMARY KEY (account_id, bucket, window)
    );
    CREATE TABLE usage (
        response_id   TEXT PRIMARY KEY,
        account_id    TEXT NOT NULL,
        session_id    TEXT,
        bucket        TEXT NOT NULL,
        model         TEXT NOT NULL,
        input_tokens  INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        credits       REAL NOT NULL,
        created_at    REAL NOT NULL,
        estimated     INTEGER NOT NULL
    );
    CREATE INDEX usage_by_account ON usage (account_id, bucket, created_at);
    CREATE TABLE sessions (
        id            TEXT PRIMARY KEY,
        account_id    TEXT NOT NULL,
        ttl           REAL NOT NULL,
        metadata      TEXT NOT NULL,
        model         TEXT NOT NULL,
        created_at    REAL NOT NULL,
        last_activity REAL NOT NULL
    );
    CREATE TABLE turns (
        id         TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        session_id TEXT,
        bucket     TEXT NOT NULL,
        status     TEXT NOT NULL,
        created_at REAL NOT NULL,
        record     TEXT NOT NULL
    );
    CREATE INDEX turns_by_account ON turns (account_id, bucket, created_at);
    CREATE INDEX turns_by_session ON turns (session_id, created_at);
    CREATE INDEX turns_running ON turns (status) WHERE status = 'in_progress';
    CREATE INDEX turns_by_age ON turns (created_at);
    CREATE TABLE idempotency_keys (
        account_id  TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        response_id TEXT NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (account_id, key)
    );
    CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


# -- records <-> JSON ------------------------------------------------------------

_json = cattrs.Converter()
configure_tagged_union(OutputMessage | FunctionCall, _json, tag_name="kind")
_json.register_unstructure_hook(
    ResponseOptions,
    lambda o: {
        "instructions": o.instructions,
        "tools": [_json.unstructure(t, ToolSpec) for t in o.tools],
        "tool_choice": o.tool_choice,
        "max_output_tokens": o.max_output_tokens,
        "metadata": o.metadata,
    },
)
_json.register_structure_hook(
    ResponseOptions,
    lambda d, _: ResponseOptions(
        instructions=d["instructions"],
        tools=tuple(_json.structure(t, ToolSpec) for t in d["tools"]),
        tool_choice=d["tool_choice"],
        max_output_tokens=d["max_output_tokens"],
        metadata=d["metadata"],
    ),
)


def _dump(record: TurnRecord) -> str:
    return json.dumps(_json.unstructure(record), separators=(",", ":"))


def _load(text: str) -> TurnRecord:
    return _json.structure(json.loads(text), TurnRecord)


# -- the writer thread -------------------------------------------------------


@attrs.define(eq=False)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    #: The task waiting for the result; None for a queued write nobody awaits.
    task: trio.lowlevel.Task | None
    result: outcome.Outcome[Any] | None = None
    #: Queued instead if this (unawaited) write fails.
    fallback: Callable[[sqlite3.Connection], Any] | None = None
    #: _QUEUED -> _RUNNING, or _QUEUED -> _ABANDONED (its waiter was
    #: cancelled first: it never runs). Changed under the worker's lock.
    state: int = 0


_QUEUED: Final = 0
_RUNNING: Final = 1
_ABANDONED: Final = 2


_STOP: Final = object()


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: cannot use WAL mode (journal_mode is {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; return the version found."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {found}, newer than this agent-runtime "
                f"({SCHEMA_VERSION}); upgrade agent-runtime"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def open_database(
    path: str | os.PathLike[str], *, synchronous: str = "NORMAL"
) -> sqlite3.Connection:
    """A migrated connection in autocommit mode (for administration tools)."""
    conn = _connect(Path(path), synchronous)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@final
class _Checkpointer:
    """A thread with its own connection that copies the WAL into the database.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its
    threshold, on the writer thread: about every 120 commits, every queued
    operation waited behind its fsyncs (measured: the whole p99 of a durable
    finalize). Here the writer only wakes this thread; a PASSIVE checkpoint
    never blocks the writer.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._main, name="agent-runtime-sqlite-checkpoint", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _main(self) -> None:
        try:
            conn = _connect(self._path, self._synchronous)
        except (sqlite3.Error, StoreError):
            logger.exception("store: the checkpointer could not connect")
            return
        try:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    logger.exception("store: checkpoint failed")
        finally:
            conn.close()


@final
class _Worker:
    """The thread that owns the connection and runs every operation."""

    def __init__(self, conn: sqlite3.Connection, path: Path, synchronous: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._main, name="agent-runtime-sqlite", daemon=True)
        self._stopped = False
        self._lock = threading.Lock()
        self._wal = Path(f"{path}-wal")
        self._checkpointer = _Checkpointer(path, synchronous)
        self._commits = 0

    def start(self) -> None:
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpointer.start()
        self._thread.start()

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._queue.put(_STOP)
            await trio.to_thread.run_sync(self._thread.join)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer thread, inside a transaction.

        Cancellation: while the op is still queued, cancelling the caller
        withdraws it (it never runs). Once the thread has taken it up, the
        caller waits for its outcome (it may already be written).
        """
        if self._stopped:
            raise StoreError("the store is closed")
        op = _Op(fn, trio.lowlevel.current_task())
        self._queue.put(op)

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if op.state == _QUEUED:
                    op.state = _ABANDONED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        try:
            # Rescheduled with the op's outcome, which this unwraps.
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        except sqlite3.Error as exc:
            raise StoreError(f"the store failed: {type(exc).__name__}: {exc}") from exc
        return result

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], object],
        fallback: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        """Queue ``fn(conn)``; nobody waits for it. If it fails, ``fallback``
        is queued in its place; failures are logged."""
        if self._stopped:
            logger.error("store closed: a queued write was dropped")
            return
        self._queue.put(_Op(fn, None, fallback=fallback))

    def _main(self) -> None:
        stop = False
        while not stop:
            batch: list[_Op] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stop = True
                    break
                assert isinstance(item, _Op)
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run(batch)
        self._checkpointer.stop()
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            logger.exception("store: the final checkpoint failed")
        self._conn.close()

    def _run(self, batch: list[_Op]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            done: list[_Op] = []
            for op in batch:
                self._one(conn, op, done)
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._lost(conn, done, exc)  # every op gets its failure
        except BaseException as exc:
            # BEGIN failed, or a SAVEPOINT/RELEASE did, or a bug: nothing of
            # this batch was committed, whatever an op's own result said.
            logger.exception("store: a batch failed")
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = sqlite3.OperationalError(f"the store failed: {exc!r}")
            for op in batch:
                if op.state != _ABANDONED:
                    op.result = outcome.Error(error)
        self._deliver(batch)
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0:
            self._checkpointer.poke()
            try:
                oversized = self._wal.stat().st_size > WAL_CAP
            except OSError:
                oversized = False
            if oversized:
                self._truncate_wal()

    def _truncate_wal(self) -> None:
        """The checkpointer cannot keep up: catch up here, rarely. Never wait for
        readers (another process holding a snapshot would stall every queued
        operation for the busy timeout, every CHECKPOINT_EVERY commits)."""
        conn = self._conn
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error:
            logger.exception("store: checkpoint failed")

    def _one(self, conn: sqlite3.Connection, op: _Op, done: list[_Op]) -> None:
        with self._lock:
            if op.state == _ABANDONED:
                return
            op.state = _RUNNING
        if not conn.in_transaction:  # an earlier failure rolled the batch back
            conn.execute("BEGIN IMMEDIATE")
        conn.execute("SAVEPOINT op")
        try:
            op.result = outcome.Value(op.fn(conn))
        except Exception as exc:
            op.result = outcome.Error(exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            else:
                # SQLite rolled back the whole transaction (disk full, I/O
                # error): the operations before this one are lost too.
                self._lost(conn, done, exc)
                done.clear()
            return
        conn.execute("RELEASE op")
        done.append(op)

    @staticmethod
    def _lost(conn: sqlite3.Connection, done: list[_Op], exc: BaseException) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("store: rollback failed")
        error = sqlite3.OperationalError(f"the transaction was rolled back: {exc}")
        for op in done:
            op.result = outcome.Error(error)

    def _deliver(self, batch: list[_Op]) -> None:
        def reschedule() -> None:
            for op in batch:
                if op.state == _ABANDONED:
                    continue
                assert op.result is not None
                if op.task is not None:
                    trio.lowlevel.reschedule(op.task, op.result)
                elif isinstance(op.result, outcome.Error):
                    logger.error("store: a queued write failed: %r", op.result.error)
                    if op.fallback is not None:
                        self.submit(op.fallback)

        try:
            self._token.run_sync_soon(reschedule)
        except trio.RunFinishedError:
            logger.error("store: results delivered after trio.run ended")


# -- operations (run in the writer thread) ---------------------------------------


def _account(conn: sqlite3.Connection, account_id: str) -> Account:
    row = conn.execute(
        "SELECT balance, mode, min_balance FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"unknown account {account_id!r}")
    limits = tuple(
        WindowLimit(bucket=b, window=w, max_turns=t, max_tokens=k)
        for b, w, t, k in conn.execute(
            "SELECT bucket, window, max_turns, max_tokens FROM rate_limits "
            "WHERE account_id = ? ORDER BY bucket, window",
            (account_id,),
        )
    )
    return Account(account_id, row[0], CreditMode(row[1]), row[2], limits)


def create_account(
    conn: sqlite3.Connection,
    account_id: str,
    *,
    credits: float = 0.0,
    mode: CreditMode = CreditMode.HARD,
    min_balance: float = 0.0,
) -> Account:
    """Insert an account (an existing one is left as it is); return it."""
    if not account_id:
        raise InvalidRequest("account id must not be empty")
    conn.execute(
        "INSERT OR IGNORE INTO accounts (id, balance, mode, min_balance, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            account_id,
            finite("credits", credits),
            mode.value,
            finite("min_balance", min_balance),
            time.time(),
        ),
    )
    return _account(conn, account_id)


@attrs.frozen
class KeyInfo:
    """An API key as ``keys list`` shows it: never the key itself."""

    id: str
    prefix: str
    account_id: str
    created_at: float
    balance: float
    mode: CreditMode


def _insert_key(conn: sqlite3.Connection, api_key: str, account_id: str) -> str:
    if not api_key:
        raise InvalidRequest("an API key must not be empty")
    key_id = "key_" + secrets.token_hex(8)
    conn.execute(
        "INSERT INTO api_keys (id, hash, prefix, account_id, created_at) VALUES (?, ?, ?, ?, ?)",
        (key_id, hash_key(api_key), key_prefix(api_key), account_id, time.time()),
    )
    return key_id


def key_prefix(api_key: str) -> str:
    """What ``keys list`` shows of a key: at most 12 characters, and never more
    than a third of it (a short key given to ``serve --api-key`` stays secret)."""
    return api_key[: min(12, len(api_key) // 3)]


def ensure_account_for_key(conn: sqlite3.Connection, api_key: str, *, credits: float) -> str:
    """The account of ``api_key``; if the key is new, an account (with
    ``credits``) and the key's hash are created."""
    digest = hash_key(api_key)
    row = conn.execute("SELECT account_id FROM api_keys WHERE hash = ?", (digest,)).fetchone()
    if row is not None:
        return str(row[0])
    account_id = new_account_id()
    create_account(conn, account_id, credits=credits)
    _insert_key(conn, api_key, account_id)
    return account_id


def create_key(
    conn: sqlite3.Connection,
    *,
    credits: float = 0.0,
    mode: CreditMode = CreditMode.HARD,
    account_id: str | None = None,
) -> tuple[str, KeyInfo]:
    """A new key ``pk_local_…``, for ``account_id`` or a new account with
    ``credits``; returns (the key, shown once; its info)."""
    api_key = f"pk_local_{secrets.token_urlsafe(24)}"
    if account_id is None:
        account_id = new_account_id()
        create_account(conn, account_id, credits=credits, mode=mode)
    else:
        _account(conn, account_id)
    key_id = _insert_key(conn, api_key, account_id)
    return api_key, _key_info(conn, key_id)


def _key_info(conn: sqlite3.Connection, key_id: str) -> KeyInfo:
    row = conn.execute(
        "SELECT k.id, k.prefix, k.account_id, k.created_at, a.balance, a.mode "
        "FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = ?",
        (key_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"unknown key id {key_id!r}; 'agent-runtime keys list' shows them")
    return KeyInfo(row[0], row[1], row[2], row[3], row[4], CreditMode(row[5]))


def list_keys(conn: sqlite3.Connection) -> list[KeyInfo]:
    """Every key's id, prefix, account and balance, oldest first."""
    ids = [r[0] for r in conn.execute("SELECT id FROM api_keys ORDER BY created_at, id")]
    return [_key_info(conn, key_id) for key_id in ids]


def account_of_key(conn: sqlite3.Connection, key_id: str) -> str:
    return _key_info(conn, key_id).account_id


def add_credits(conn: sqlite3.Connection, account_id: str, amount: float) -> Account:
    """Add ``amount`` (may be negative) to the balance; return the account."""
    _account(conn, account_id)
    conn.execute(
        "UPDATE accounts SET balance = balance + ? WHERE id = ?",
        (finite("amount", amount), account_id),
    )
    return _account(conn, account_id)


def set_mode(
    conn: sqlite3.Connection, account_id: str, mode: CreditMode, min_balance: float | None = None
) -> Account:
    """Set the credit mode (and the per-turn minimum, if given)."""
    _account(conn, account_id)
    conn.execute("UPDATE accounts SET mode = ? WHERE id = ?", (mode.value, account_id))
    if min_balance is not None:
        conn.execute(
            "UPDATE accounts SET min_balance = ? WHERE id = ?",
            (finite("min_balance", min_balance), account_id),
        )
    return _account(conn, account_id)


def set_limit(conn: sqlite3.Connection, account_id: str, limit: WindowLimit) -> Account:
    """Set one window's limits; both ``None`` removes the limit."""
    _account(conn, account_id)
    if limit.max_turns is None and limit.max_tokens is None:
        conn.execute(
            "DELETE FROM rate_limits WHERE account_id = ? AND bucket = ? AND window = ?",
            (account_id, limit.bucket, limit.window),
        )
    else:
        conn.execute(
            "INSERT OR REPLACE INTO rate_limits VALUES (?, ?, ?, ?, ?)",
            (account_id, limit.bucket, limit.window, limit.max_turns, limit.max_tokens),
        )
    return _account(conn, account_id)


def _begin_turn(conn: sqlite3.Connection, record: TurnRecord) -> None:
    account = _account(conn, record.account_id)
    check_credits(account)
    now = time.time()
    for name, duration in WINDOWS.items():
        limit = account.limit(record.bucket, name)
        if limit is None:
            continue
        since = now - duration
        key = (account.id, record.bucket, since)
        if limit.max_turns is not None:
            (turns,) = conn.execute(
                "SELECT count(*) FROM turns WHERE account_id = ? AND bucket = ? AND created_at > ?",
                key,
            ).fetchone()
            if turns >= limit.max_turns:
                # One more fits once the oldest turns-max+1 have left the window.
                (oldest,) = conn.execute(
                    "SELECT created_at FROM turns "
                    "WHERE account_id = ? AND bucket = ? AND created_at > ? "
                    "ORDER BY created_at LIMIT 1 OFFSET ?",
                    (*key, turns - limit.max_turns),
                ).fetchone()
                raise refuse(limit, "turns", turns, limit.max_turns, oldest + duration)
        if limit.max_tokens is not None:
            (tokens,) = conn.execute(
                "SELECT coalesce(sum(input_tokens + output_tokens), 0) "
                "FROM usage WHERE account_id = ? AND bucket = ? AND created_at > ?",
                key,
            ).fetchone()
            if tokens >= limit.max_tokens:
                used = conn.execute(
                    "SELECT created_at, input_tokens + output_tokens FROM usage "
                    "WHERE account_id = ? AND bucket = ? AND created_at > ? ORDER BY created_at",
                    key,
                ).fetchall()
                retry_at = tokens_free_at(used, limit.max_tokens) + duration
                raise refuse(limit, "tokens", tokens, limit.max_tokens, retry_at)
    conn.execute(
        "INSERT INTO turns (id, account_id, session_id, bucket, status, created_at, record) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        _turn_row(record),
    )


def _turn_row(record: TurnRecord) -> tuple[object, ...]:
    return (
        record.id,
        record.account_id,
        record.session_id,
        record.bucket,
        record.status,
        record.created_at,
        _dump(record),
    )


def _finish_turn(conn: sqlite3.Connection, record: TurnRecord, *, touch: bool = True) -> None:
    """Store the turn's record (inserted if it was never begun); with ``touch``,
    its end is its session's last activity."""
    conn.execute(
        "INSERT INTO turns (id, account_id, session_id, bucket, status, created_at, record) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET status = excluded.status, record = excluded.record",
        _turn_row(record),
    )
    if touch and record.session_id is not None and record.finished_at is not None:
        conn.execute(
            "UPDATE sessions SET last_activity = ? WHERE id = ?",
            (record.finished_at, record.session_id),
        )


def _finish_without_output(conn: sqlite3.Connection, record: TurnRecord) -> None:
    """:func:`_finish_turn` of the smallest record that says how the turn ended
    (the fallback when the whole one does not fit; built only then)."""
    _finish_turn(conn, without_output(record))


def _complete_turn(conn: sqlite3.Connection, usage: UsageRecord, record: TurnRecord) -> bool:
    inserted = conn.execute(
        "INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            usage.response_id,
            usage.account_id,
            usage.session_id,
            usage.bucket,
            usage.model,
            usage.input_tokens,
            usage.output_tokens,
            usage.credits,
            usage.created_at,
            int(usage.estimated),
        ),
    ).rowcount
    if not inserted:
        return False
    debited = conn.execute(
        "UPDATE accounts SET balance = balance - ? WHERE id = ?",
        (usage.credits, usage.account_id),
    ).rowcount
    if not debited:
        raise NotFound(f"unknown account {usage.account_id!r}")
    _finish_turn(conn, record)
    return True


def _recover(conn: sqlite3.Connection) -> Recovered:
    now = time.time()
    running = [
        _load(text)
        for (text,) in conn.execute("SELECT record FROM turns WHERE status = 'in_progress'")
    ]
    for record in running:
        _finish_turn(conn, interrupted(record, now), touch=False)
    conn.execute("DELETE FROM sessions WHERE created_at + ttl <= ?", (now,))
    _purge(conn, now)
    sessions = []
    for row in conn.execute(
        "SELECT id, account_id, ttl, metadata, model, created_at, last_activity "
        "FROM sessions ORDER BY created_at"
    ).fetchall():
        session = SessionRecord(
            id=row[0],
            account_id=row[1],
            ttl=row[2],
            metadata=json.loads(row[3]),
            model=row[4],
            created_at=row[5],
            last_activity=row[6],
        )
        history = tuple(
            _load(text)
            for (text,) in conn.execute(
                "SELECT record FROM turns WHERE session_id = ? ORDER BY created_at, rowid",
                (session.id,),
            )
        )
        sessions.append((session, history))
    return Recovered(tuple(sessions), len(running))


def _purge(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(
        "DELETE FROM turns WHERE created_at < ? AND status != 'in_progress' AND ("
        "session_id IS NULL OR session_id NOT IN (SELECT id FROM sessions))",
        (now - TURN_RETENTION,),
    )
    conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - KEY_RETENTION,))


def _windows(conn: sqlite3.Connection, account_id: str) -> dict[str, tuple[UsageWindow, ...]]:
    account = _account(conn, account_id)
    now = time.time()

    def use() -> Iterable[tuple[str, str, int, int]]:
        for bucket in BUCKETS:
            for name, duration in WINDOWS.items():
                key = (account_id, bucket, now - duration)
                (turns,) = conn.execute(
                    "SELECT count(*) FROM turns "
                    "WHERE account_id = ? AND bucket = ? AND created_at > ?",
                    key,
                ).fetchone()
                (tokens,) = conn.execute(
                    "SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM usage "
                    "WHERE account_id = ? AND bucket = ? AND created_at > ?",
                    key,
                ).fetchone()
                yield bucket, name, turns, tokens

    return window_report(account, use())


def _usage_records(conn: sqlite3.Connection, account_id: str, limit: int) -> list[UsageRecord]:
    return [
        UsageRecord(
            response_id=r[0],
            account_id=r[1],
            session_id=r[2],
            model=r[4],
            input_tokens=r[5],
            output_tokens=r[6],
            credits=r[7],
            created_at=r[8],
            estimated=bool(r[9]),
        )
        for r in conn.execute(
            "SELECT * FROM usage WHERE account_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (account_id, limit),
        )
    ]


# -- the store -----------------------------------------------------------------


@final
class SQLiteStore:
    """A :class:`~runtime.Store` in a SQLite database (WAL, one writer thread).

    Obtain one with :meth:`SQLiteStore.open`; it is usable until that block
    ends.
    """

    def __init__(self, path: Path, worker: _Worker) -> None:
        self.path = path
        self._worker = worker
        #: sha256(key) -> account id of keys seen. Keys are never deleted, so
        #: a hit is always right; a miss asks the database (keys created by
        #: ``agent-runtime keys create`` while serving are found).
        self._known_keys: dict[bytes, str] = {}
        self._purged_at = time.time()
        #: Final records of cancelled and failed turns, written END_DELAY later.
        self._ends: list[TurnRecord] = []
        self._ends_waiting = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        default_credits: float = 1000.0,
        synchronous: str = "NORMAL",
    ) -> AsyncIterator[SQLiteStore]:
        """Open (creating and migrating as needed) the database at ``path``.

        Args:
          default_credits: balance of the :data:`~runtime.DEFAULT_ACCOUNT`
            when it is created (only the first time).
          synchronous: SQLite's ``synchronous`` pragma: ``NORMAL`` (default;
            survives a process crash) or ``FULL`` (also an OS crash).

        Raises:
          StoreError: the file cannot be opened, is not a database, or has a
            newer schema.
        """
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        path = Path(path)

        def connect() -> sqlite3.Connection:
            conn = open_database(path, synchronous=synchronous.upper())
            try:
                conn.execute("BEGIN IMMEDIATE")
                create_account(conn, DEFAULT_ACCOUNT, credits=default_credits)
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await trio.to_thread.run_sync(connect)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        worker = _Worker(conn, path, synchronous.upper())
        worker.start()
        store = cls(path, worker)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._write_ends)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            store._flush_ends()
            with trio.CancelScope(shield=True):
                await worker.stop()

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the store's thread, in a transaction of
        its own savepoint (for administration; see the module's functions)."""
        return await self._call(fn)

    # -- the Store interface ----------------------------------------------

    async def authenticate(self, api_key: str) -> str:
        digest = hash_key(api_key)
        account_id = self._known_keys.get(digest)
        if account_id is not None:
            await trio.lowlevel.checkpoint()
            return account_id

        def find(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT account_id FROM api_keys WHERE hash = ?", (digest,))
            found = row.fetchone()
            return None if found is None else str(found[0])

        account_id = await self._call(find)
        if account_id is None:
            raise Unauthorized("missing or unknown API key; send 'Authorization: Bearer KEY'")
        self._known_keys[digest] = account_id
        return account_id

    async def ensure_account_for_key(self, api_key: str, *, credits: float = 1000.0) -> str:
        """The account of ``api_key``, created (with ``credits``) if the key is new."""
        return await self._call(lambda conn: ensure_account_for_key(conn, api_key, credits=credits))

    async def has_api_keys(self) -> bool:
        return await self._call(
            lambda conn: conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None
        )

    async def get_account(self, account_id: str) -> Account:
        return await self._call(lambda conn: _account(conn, account_id))

    async def begin_turn(self, record: TurnRecord) -> None:
        now = time.time()
        purge = now - self._purged_at > PURGE_EVERY
        if purge:
            self._purged_at = now

        def begin(conn: sqlite3.Connection) -> None:
            _begin_turn(conn, record)
            if purge:  # old turn records and keys go while serving, not only at start-up
                _purge(conn, now)

        await self._call(begin)

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        return await self._call(lambda conn: _complete_turn(conn, usage, record))

    def end_turn(self, record: TurnRecord) -> None:
        # Not queued at once: waking the writer thread right after a terminal
        # event makes it compete for the GIL with the readers of that event
        # (measured: cancel -> terminal p99 x3-8 at one stream). The write
        # goes END_DELAY later, with whatever else ended meanwhile.
        self._ends.append(record)
        self._ends_waiting.set()

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # Queued ends go first: whoever asks the store next sees them written.
        if self._ends:
            self._flush_ends()
        return await self._worker.call(fn)

    async def _write_ends(self) -> None:
        while True:
            await self._ends_waiting.wait()
            await trio.sleep(END_DELAY)
            self._flush_ends()

    def _flush_ends(self) -> None:
        ends, self._ends = self._ends, []
        self._ends_waiting = trio.Event()
        for record in ends:
            # If the record does not fit (the disk is full: what failed the
            # turn may fail this too), its status still must: a turn left
            # in_progress would read as interrupted after the next restart.
            self._worker.submit(
                functools.partial(_finish_turn, record=record),
                functools.partial(_finish_without_output, record=record),
            )

    async def get_turn(self, response_id: str) -> TurnRecord | None:
        def get(conn: sqlite3.Connection) -> TurnRecord | None:
            row = conn.execute("SELECT record FROM turns WHERE id = ?", (response_id,)).fetchone()
            return None if row is None else _load(row[0])

        return await self._call(get)

    async def usage_records(self, account_id: str, *, limit: int = 100) -> list[UsageRecord]:
        return await self._call(lambda conn: _usage_records(conn, account_id, limit))

    async def usage_windows(self, account_id: str) -> dict[str, tuple[UsageWindow, ...]]:
        return await self._call(lambda conn: _windows(conn, account_id))

    async def save_session(self, record: SessionRecord) -> None:
        metadata = json.dumps(record.metadata, separators=(",", ":"))
        await self._call(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.account_id,
                    record.ttl,
                    metadata,
                    record.model,
                    record.created_at,
                    record.last_activity,
                ),
            )
        )

    async def delete_session(self, session_id: str) -> None:
        await self._call(
            lambda conn: conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        )

    async def recover(self) -> Recovered:
        return await self._call(_recover)

    async def get_idempotency_key(self, account_id: str, key: str) -> IdempotencyRecord | None:
        def get(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            row = conn.execute(
                "SELECT fingerprint, response_id, created_at FROM idempotency_keys "
                "WHERE account_id = ? AND key = ?",
                (account_id, key),
            ).fetchone()
            if row is None:
                return None
            return IdempotencyRecord(
                account_id=account_id,
                key=key,
                fingerprint=row[0],
                response_id=row[1],
                created_at=row[2],
            )

        return await self._call(get)

    async def put_idempotency_key(self, record: IdempotencyRecord) -> None:
        now = time.time()
        purge = now - self._purged_at > PURGE_EVERY
        if purge:
            self._purged_at = now

        def put(conn: sqlite3.Connection) -> None:
            if purge:
                _purge(conn, now)
            # The first binding of a live key wins; an expired one is replaced.
            conn.execute(
                "INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (account_id, key) DO UPDATE SET "
                "fingerprint = excluded.fingerprint, response_id = excluded.response_id, "
                "created_at = excluded.created_at "
                "WHERE idempotency_keys.created_at < ?",
                (
                    record.account_id,
                    record.key,
                    record.fingerprint,
                    record.response_id,
                    record.created_at,
                    now - KEY_RETENTION,
                ),
            )

        await self._call(put)


def database_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the store of ``data_dir`` lives."""
    return Path(data_dir) / DB_NAME

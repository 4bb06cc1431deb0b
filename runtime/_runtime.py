"""The runtime: the root nursery, the registries, and the eviction loop.

Theory of operation
-------------------
:meth:`Runtime.open` owns the root nursery. Sessions are tasks in it (each
with its own nursery for its turns); stateless turns run in it directly.
Lifetimes nest: leaving ``Runtime.open`` closes every session with reason
``shutdown`` (its running turn ends ``*.cancelled``, its processes are killed,
non-persistent workspaces are removed), cancels the stateless turns the same
way, waits for all of it, and only then cancels the root nursery.

Turns are registered by response id until ``grace_seconds`` after their
terminal event; one eviction task walks a deadline heap, so ten thousand
finished turns cost ten thousand heap entries, not ten thousand tasks.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import heapq
import logging
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._demo import DemoModel
from ._errors import InvalidRequest, NotFound, ShuttingDown, StoreError
from ._events import ResponseOptions
from ._idempotency import IdempotencyKeys
from ._ids import new_id
from ._model import ChatMessage, ToolSpec
from ._respond import ResponseRound
from ._sandbox import Sandbox, SandboxMode, ToolLimits, choose_sandbox, sweep_orphans
from ._session import DEFAULT_IDLE_TIMEOUT, DEFAULT_TTL, Session
from ._spawn import start_in
from ._sqlite import SQLiteStore, database_path
from ._store import DEFAULT_ACCOUNT, DEFAULT_PRICES, Pricing
from ._turn import SESSION_DELETED, SHUTDOWN, Turn, lookup
from ._workspace import Workspace, remove_tree

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

    from ._model import Model
    from ._records import Recovered, TurnRecord
    from ._store import Store
    from ._turn import TurnBody

logger = logging.getLogger("runtime")

DEFAULT_GRACE: Final = 120.0
#: Longest session ttl accepted (about 31 years; also keeps float() finite).
MAX_TTL: Final = 1e9
#: How long shutdown waits for turns to unwind before cancelling everything.
SHUTDOWN_TIMEOUT: Final = 10.0
_FREE: Final = Pricing(0.0, 0.0)
_TOKEN: Final = object()


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold ``root/agent-runtime.lock`` (flock) while a runtime uses ``root``.

    Two runtimes on one data dir would each take the other's running turns for
    interrupted ones and sweep the other's workspaces at start-up. The lock
    goes with the process, however it ends.
    """
    with open(root / "agent-runtime.lock", "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"the data dir {str(root)!r} is in use by another agent-runtime process"
            ) from None
        yield


@attrs.frozen
class RuntimeStatistics:
    """A snapshot of what the runtime holds."""

    #: Live sessions (not yet torn down).
    sessions: int
    #: Turns without a terminal event yet.
    running_turns: int
    #: Turns whose buffers are still held (running or within their grace).
    buffered_turns: int


@final
@attrs.define(eq=False, kw_only=True)
class Runtime:
    """The agent runtime. Obtain one with :meth:`Runtime.open` only."""

    data_dir: Path
    model: Model
    store: Store
    grace_seconds: float
    idle_timeout: float
    tool_limits: ToolLimits
    #: How ``run_shell`` is confined (bubblewrap or a bare process group).
    sandbox: Sandbox
    prices: Mapping[str, Pricing]
    _token: object = attrs.field(alias="_token", repr=False)
    _nursery: trio.Nursery = attrs.field(alias="_nursery", repr=False)
    #: What sessions and turns start in (see :mod:`runtime._spawn`): the
    #: context of ``Runtime.open``'s caller, never a request's.
    _context: contextvars.Context = attrs.field(factory=contextvars.copy_context, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _sessions: dict[str, Session] = attrs.field(factory=dict, init=False)
    _turns: dict[str, Turn] = attrs.field(factory=dict, init=False)
    _running_stateless: set[Turn] = attrs.field(factory=set, init=False)
    _evictions: list[tuple[float, str]] = attrs.field(factory=list, init=False)
    #: Idempotency-key bindings, per account (used by the HTTP layer).
    idempotency: IdempotencyKeys = attrs.field(init=False)
    #: The eviction loop's sleep; its deadline is the heap's earliest entry.
    _evict_timer: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    #: Test hook awaited (shielded) inside each turn's finalizing step.
    _for_testing_finalizing: Callable[[Turn], Awaitable[None]] | None = attrs.field(
        default=None, init=False
    )
    #: Test hook called with the pid of every tool process started.
    _for_testing_on_process: Callable[[int], object] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("use 'async with Runtime.open(...) as rt', not Runtime(...)")
        self.idempotency = IdempotencyKeys(self.store)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        data_dir: str | os.PathLike[str],
        model: Model | None = None,
        store: Store | None = None,
        grace_seconds: float = DEFAULT_GRACE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        tool_limits: ToolLimits | None = None,
        sandbox: str | Sandbox = "auto",
        prices: Mapping[str, Pricing] | None = None,
    ) -> AsyncIterator[Runtime]:
        """Open a runtime rooted at ``data_dir`` and close it on exit.

        Args:
          data_dir: holds ``workspaces/<session id>/`` (created if missing)
            and, unless ``store`` is given, the SQLite store
            ``agent-runtime.db``.
          model: the model of every turn; default :class:`DemoModel`.
          store: accounts, ledger, persistent sessions; default a
            :class:`SQLiteStore` in ``data_dir`` (opened and closed here).
            Whatever the store, it is asked at start-up to recover: turns it
            holds as running become cancelled (``interrupted``), its
            persistent sessions come back (history and workspace), and
            workspace directories of any other session are removed.
          grace_seconds: how long a finished turn stays resumable/cancellable.
          idle_timeout: a non-persistent session is destroyed this long after
            its last turn ends.
          tool_limits: CPU, memory, file size, open files, wall time and
            output of one ``run_shell`` call (default :class:`ToolLimits`).
          sandbox: ``"auto"`` (bubblewrap if it works here, else a bare
            process group, with a warning logged), ``"bwrap"`` (or
            ``ValueError``), ``"none"``, or a :class:`Sandbox`. At start-up,
            tool processes left running by an earlier runtime on this
            ``data_dir`` (one that crashed) are killed.
          prices: credits per million tokens by model name (default: the demo
            model's price; unknown models are free).

        Cancellation: leaving the block (normally, by an exception, or by
        cancellation) cancels every running turn with reason ``shutdown``,
        kills their processes, removes non-persistent workspaces, and returns
        once all of that is done (at most ``SHUTDOWN_TIMEOUT`` seconds of
        waiting, then everything is cancelled hard).
        """
        for name, value in (
            ("grace_seconds", grace_seconds),
            ("idle_timeout", idle_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        root = Path(data_dir)
        (root / "workspaces").mkdir(parents=True, exist_ok=True)
        if not isinstance(sandbox, Sandbox):
            sandbox = choose_sandbox(sandbox, root)
            if sandbox.mode is SandboxMode.NONE:
                logger.warning("%s (process group + subreaper sweep only)", sandbox.reason)
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(_exclusive(root))
            # We hold the data dir: whatever tool carries its marker is an orphan.
            sweep_orphans(sandbox.token)
            if store is None:
                store = await stack.enter_async_context(SQLiteStore.open(database_path(root)))
            async with cls._open(root, model, store, grace_seconds, idle_timeout,
                                 tool_limits or ToolLimits(), sandbox, prices) as rt:  # fmt: skip
                yield rt

    @classmethod
    @asynccontextmanager
    async def _open(
        cls,
        root: Path,
        model: Model | None,
        store: Store,
        grace_seconds: float,
        idle_timeout: float,
        tool_limits: ToolLimits,
        sandbox: Sandbox,
        prices: Mapping[str, Pricing] | None,
    ) -> AsyncIterator[Runtime]:
        async with trio.open_nursery() as nursery:
            rt = cls(
                data_dir=root,
                model=model if model is not None else DemoModel(),
                store=store,
                grace_seconds=grace_seconds,
                idle_timeout=idle_timeout,
                tool_limits=tool_limits,
                sandbox=sandbox,
                prices=dict(DEFAULT_PRICES if prices is None else prices),
                _token=_TOKEN,
                _nursery=nursery,
            )
            nursery.start_soon(rt._evict_loop)
            try:
                await rt._recover(await store.recover())
                yield rt
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                    await rt._shutdown()
                nursery.cancel_scope.cancel(reason="runtime closed")

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Runtime {str(self.data_dir)!r} sessions={s.sessions} "
            f"running={s.running_turns} buffered={s.buffered_turns}>"
        )

    # -- sessions ---------------------------------------------------------

    async def create_session(
        self,
        *,
        persistent: bool = False,
        ttl: float = DEFAULT_TTL,
        metadata: Mapping[str, Any] | None = None,
        model: str | None = None,
        account_id: str = DEFAULT_ACCOUNT,
    ) -> Session:
        """Create a session (a task in the root nursery) and return it, started.

        Raises:
          InvalidRequest: bad ``ttl``, ``metadata`` or ``model``.
          NotFound: unknown ``account_id``.
          ShuttingDown: the runtime is closing.
        """
        if self._closing:
            raise ShuttingDown("the runtime is shutting down; no new sessions are accepted")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
            raise InvalidRequest(f"ttl must be a positive number of seconds, not {ttl!r}")
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidRequest(f"metadata must be an object, not {metadata!r}")
        if model is not None and model != self.model.name:
            raise InvalidRequest(
                f"unknown model {model!r}; this runtime serves {self.model.name!r}"
            )
        await self.store.get_account(account_id)
        if self._closing:  # shutdown began while we awaited the store
            raise ShuttingDown("the runtime is shutting down; no new sessions are accepted")
        session = self._make_session(
            new_id("sess"), account_id, bool(persistent), float(ttl), dict(metadata or {})
        )
        await self._start_session(session)
        if session.persistent:
            # Stored once running, before the caller hears of it: a crash after
            # this point brings the session back.
            try:
                await self.store.save_session(session.record())
            except BaseException:
                session._close(SESSION_DELETED)
                with trio.CancelScope(shield=True):
                    await session.wait_closed()
                raise
            if session._closing is not None:
                # Deleted (a bulk DELETE) while it was being stored: its
                # teardown may have forgotten it before the row existed.
                with trio.CancelScope(shield=True):
                    await session.wait_closed()
                    await session._forget_record()
        return session

    def _make_session(
        self, sid: str, account_id: str, persistent: bool, ttl: float, metadata: dict[str, Any]
    ) -> Session:
        return Session(
            id=sid,
            account_id=account_id,
            persistent=persistent,
            ttl=ttl,
            metadata=metadata,
            model=self.model.name,
            workspace=Workspace(str(self.data_dir / "workspaces" / sid)),
            _runtime=self,
            _idle_timeout=self.idle_timeout,
        )

    async def _start_session(self, session: Session) -> None:
        self._sessions[session.id] = session
        try:
            await start_in(self._context, self._nursery, session._run)
        except BaseException:
            self._forget_session(session)
            raise

    async def _recover(self, recovered: Recovered) -> None:
        """Take up what the store kept: persistent sessions come back with
        their histories; every other workspace directory is removed."""
        for record, history in recovered.sessions:
            session = self._make_session(
                record.id, record.account_id, True, record.ttl, dict(record.metadata)
            )
            session.created_at = record.created_at
            session._restore(record, history)
            await self._start_session(session)
        keep = set(self._sessions)
        workspaces = self.data_dir / "workspaces"

        def sweep() -> int:
            removed = 0
            for entry in workspaces.iterdir():
                if entry.name not in keep:
                    with contextlib.suppress(OSError):
                        remove_tree(str(entry))  # a link or a file: removed, never followed
                    removed += 1
            return removed

        removed = await trio.to_thread.run_sync(sweep)
        if recovered.sessions or recovered.interrupted or removed:
            logger.info(
                "recovered %d persistent sessions; %d turns were interrupted; "
                "%d leftover workspaces removed",
                len(recovered.sessions),
                recovered.interrupted,
                removed,
            )

    def get_session(self, session_id: str, *, account_id: str | None = None) -> Session:
        """Return the live session.

        Raises:
          NotFound: unknown, deleted, or (with ``account_id``) another
            account's: the same answer, so existence never leaks.
        """
        session = self._sessions.get(session_id)
        if session is None or (account_id is not None and session.account_id != account_id):
            raise NotFound(f"session {session_id!r} is unknown or was deleted")
        return session

    def sessions(self, *, account_id: str | None = None) -> list[Session]:
        """Every live session (of ``account_id``, if given), oldest first."""
        return [
            s for s in self._sessions.values() if account_id is None or s.account_id == account_id
        ]

    async def delete_sessions(
        self, *, account_id: str, idle_only: bool = False, older_than: float = 0.0
    ) -> int:
        """Delete the account's sessions created more than ``older_than`` seconds
        ago (only those with no running turn if ``idle_only``); return how many.

        Cancellation: as :meth:`delete_session`, for each.
        """
        now = time.time()
        doomed = [
            s
            for s in self.sessions(account_id=account_id)
            if s.status == "ready"
            and now - s.created_at >= older_than
            and not (idle_only and s.busy)
        ]
        for session in doomed:
            session._close(SESSION_DELETED)
        for session in doomed:
            await session.wait_closed()
        await trio.lowlevel.checkpoint()
        return len(doomed)

    async def delete_session(self, session_id: str, *, account_id: str | None = None) -> None:
        """Destroy a session and return once it is gone.

        Its running turn ends ``message.cancelled`` with reason
        ``session_deleted`` (unbilled), its processes are killed and its
        workspace directory is removed, all before this returns.

        Raises:
          NotFound: unknown or already deleted.

        Cancellation: the teardown, once begun, completes in the session's own
        task even if this call is cancelled.
        """
        session = self.get_session(session_id, account_id=account_id)
        if session._closing is not None and session._closing != SESSION_DELETED:
            raise NotFound(f"session {session_id!r} is already closing ({session._closing})")
        session._close(SESSION_DELETED)
        await session.wait_closed()

    def _forget_session(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    # -- turns ------------------------------------------------------------

    def get_turn(self, response_id: str, *, account_id: str | None = None) -> Turn:
        """Return the turn (running or within its grace).

        Raises:
          NotFound: unknown, evicted, or (with ``account_id``) another account's.
        """
        turn = lookup(self._turns, response_id)
        if account_id is not None and turn.account_id != account_id:
            raise NotFound(f"response {response_id!r} is unknown, or was evicted")
        return turn

    def nudge_readers(self) -> None:
        """Wake every ``read_batch`` waiter of every running turn (keep-alive
        ticks: one call wakes all idle streams, no timer per stream)."""
        for turn in self._turns.values():
            if turn.state.is_running:
                turn.buffer.nudge()

    def find_turn(self, response_id: str) -> Turn | None:
        """The turn if it is still buffered, else None."""
        return self._turns.get(response_id)

    async def turn_record(self, response_id: str, *, account_id: str | None = None) -> TurnRecord:
        """The turn's record: live if it is buffered, else as the store keeps it
        (after eviction, and after a restart).

        Raises:
          NotFound: unknown, purged, or (with ``account_id``) another account's.
        """
        turn = self._turns.get(response_id)
        record = turn.record() if turn is not None else await self.store.get_turn(response_id)
        if record is None or (account_id is not None and record.account_id != account_id):
            raise NotFound(f"response {response_id!r} is unknown")
        return record

    async def respond(
        self,
        input: str | Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        instructions: str | None = None,
        max_output_tokens: int | None = None,
        tool_choice: str | None = None,
        metadata: Mapping[str, str] | None = None,
        account_id: str = DEFAULT_ACCOUNT,
    ) -> Turn:
        """Start a stateless turn: one model round trip, no session, no agent loop.

        Client-defined ``tools`` are offered to the model; its calls come back
        as ``function_call`` output items (``response.*`` events), not run.

        Raises:
          InvalidRequest: empty ``input`` or malformed arguments.
          OutOfCredits: the account may not start turns.
          ShuttingDown: the runtime is closing.
        """
        if isinstance(input, str):
            if not input.strip():
                raise InvalidRequest("input must not be empty")
            messages: tuple[ChatMessage, ...] = (ChatMessage(role="user", content=input),)
            text = input
        else:
            messages = tuple(input)
            if not messages or not all(isinstance(m, ChatMessage) for m in messages):
                raise InvalidRequest("input must be a string or a non-empty list of ChatMessage")
            text = "\n".join(m.content for m in messages if m.role == "user")
        if instructions:
            messages = (ChatMessage(role="system", content=instructions), *messages)
        if max_output_tokens is not None and max_output_tokens < 1:
            raise InvalidRequest(f"max_output_tokens must be >= 1, not {max_output_tokens!r}")
        if self._closing:
            raise ShuttingDown("the runtime is shutting down; no new turns are accepted")
        turn = self._new_turn(
            prefix="resp",
            account_id=account_id,
            session_id=None,
            text=text,
            body=ResponseRound(
                model=self.model,
                messages=messages,
                tools=tuple(tools),
                max_output_tokens=max_output_tokens,
                options=ResponseOptions(
                    instructions=instructions,
                    tools=tuple(tools),
                    tool_choice=tool_choice,
                    max_output_tokens=max_output_tokens,
                    metadata=dict(metadata or {}),
                ),
            ),
            on_finished=self._running_stateless.discard,
        )
        await turn._begin()
        if self._closing:
            turn._abort_start(ShuttingDown("the runtime is shutting down"))
            raise ShuttingDown("the runtime is shutting down; no new turns are accepted")
        self._running_stateless.add(turn)
        self._register(turn)
        await start_in(self._context, self._nursery, turn._run)
        return turn

    def _new_turn(
        self,
        *,
        prefix: str,
        account_id: str,
        session_id: str | None,
        text: str,
        body: TurnBody,
        on_finished: Callable[[Turn], object],
    ) -> Turn:
        def finished(turn: Turn) -> None:
            on_finished(turn)
            self._schedule_eviction(turn)

        turn = Turn(
            id=new_id(prefix),
            account_id=account_id,
            session_id=session_id,
            model=self.model.name,
            input=text,
            _body=body,
            _store=self.store,
            _pricing=self.prices.get(self.model.name, _FREE),
            _on_finished=finished,
            _hook_finalizing=self._for_testing_finalizing,
        )
        body.begin(turn)
        return turn

    def _register(self, turn: Turn) -> None:
        self._turns[turn.id] = turn

    def _schedule_eviction(self, turn: Turn) -> None:
        deadline = trio.current_time() + self.grace_seconds
        heapq.heappush(self._evictions, (deadline, turn.id))
        # Move the loop's deadline rather than waking it: no extra task runs
        # on the path from a terminal event to its readers.
        if deadline < self._evict_timer.deadline:
            self._evict_timer.deadline = deadline

    async def _evict_loop(self) -> None:
        while True:
            deadline = self._evictions[0][0] if self._evictions else math.inf
            self._evict_timer = trio.CancelScope(deadline=deadline)
            with self._evict_timer:
                await trio.sleep_forever()
            now = trio.current_time()
            while self._evictions and self._evictions[0][0] <= now:
                _, rid = heapq.heappop(self._evictions)
                self._turns.pop(rid, None)

    # -- lifetime ---------------------------------------------------------

    def statistics(self) -> RuntimeStatistics:
        """Counts of sessions, running turns and buffered turns."""
        running = sum(1 for t in self._turns.values() if t.state.is_running)
        return RuntimeStatistics(
            sessions=len(self._sessions),
            running_turns=running,
            buffered_turns=len(self._turns),
        )

    @property
    def closing(self) -> bool:
        """True once shutdown has begun: new sessions and turns are refused."""
        return self._closing

    async def shutdown(self) -> None:
        """Refuse new work, cancel every running turn (reason ``shutdown``),
        tear down every session, and return when all of that is done.

        Leaving :meth:`open` does this too; call it first to drain (e.g. on
        SIGTERM, before the HTTP server stops). Idempotent.
        """
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        for turn in list(self._running_stateless):
            turn._cancel(SHUTDOWN)
        sessions = list(self._sessions.values())
        for session in sessions:
            session._close(SHUTDOWN)
        for session in sessions:
            await session.wait_closed()
        for turn in list(self._running_stateless):
            await turn.wait_finished()

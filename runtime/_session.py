"""A session: an actor task with its own nursery, owning its workspace.

Theory of operation
-------------------
:meth:`Session._run` is the session. It creates the workspace directory, opens
the session's nursery, reports itself started, then waits for one of three
ends: :meth:`Session._close` (DELETE or runtime shutdown), its ``ttl`` running
out, or, for a non-persistent session, ``idle_timeout`` seconds passing with no
turn running. Whatever the end, it cancels the running turn with the matching
reason, lets the nursery unwind it (the turn appends its terminal event, its
processes are killed), and removes the workspace in its own ``finally``: the
teardown is structural, not a cleanup list. Only runtime shutdown keeps the
workspace of a persistent session.

Turns are started in the session's nursery with ``nursery.start``, so a turn
can never outlive its session.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._agent import AgentLoop
from ._errors import InvalidRequest, SessionBusy, SessionClosed, ShuttingDown
from ._model import ChatMessage
from ._records import SessionRecord, TurnRecord
from ._spawn import start_in
from ._state import TurnState
from ._tools import ToolBox
from ._turn import SESSION_EXPIRED, SHUTDOWN, Turn
from ._workspace import remove_tree

if TYPE_CHECKING:
    from ._runtime import Runtime
    from ._workspace import Workspace

logger = logging.getLogger("runtime")

#: A non-persistent session is destroyed this long after its last turn ends.
DEFAULT_IDLE_TIMEOUT: Final = 300.0
DEFAULT_TTL: Final = 14400.0
#: How long a session's teardown waits for the store to forget it.
STORE_TIMEOUT: Final = 10.0


@final
@attrs.define(eq=False, kw_only=True)
class Session:
    """A conversation with its own workspace; created by :meth:`Runtime.create_session`."""

    id: str
    account_id: str
    persistent: bool
    ttl: float
    metadata: dict[str, Any]
    model: str
    workspace: Workspace
    created_at: float = attrs.field(factory=time.time)
    last_activity: float = attrs.field(init=False)
    _runtime: Runtime = attrs.field(alias="_runtime")
    _idle_timeout: float = attrs.field(alias="_idle_timeout")

    #: The session's turns, oldest first: the running one as a Turn, the
    #: finished ones as compact entries (their buffers are not kept here).
    _history: list[Turn | TurnRecord] = attrs.field(factory=list, init=False)
    _active: Turn | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _closing: str | None = attrs.field(default=None, init=False)
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: The session task's sleep; its deadline is :meth:`_deadline`.
    _timer: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: trio-clock time of the last change that restarts the idle timer.
    _idle_since: float = attrs.field(init=False)
    _expires_at: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.last_activity = self.created_at
        now = trio.current_time()
        self._idle_since = now
        self._expires_at = now + self.ttl

    def __repr__(self) -> str:
        state = f"closing:{self._closing}" if self._closing else "busy" if self.busy else "idle"
        return f"<Session {self.id} {state} turns={len(self._history)}>"

    # -- the session record ----------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a turn runs (until its terminal event)."""
        return self._active is not None

    @property
    def active_response_id(self) -> str | None:
        return self._active.id if self._active is not None else None

    @property
    def status(self) -> str:
        """``"ready"`` while the session accepts turns, ``"closing"`` after."""
        return "ready" if self._closing is None else "closing"

    @property
    def closed(self) -> bool:
        """True once the session's teardown has finished."""
        return self._done.is_set()

    # -- turns ------------------------------------------------------------

    async def send(self, text: str) -> Turn:
        """Start a turn answering ``text`` and return it at once.

        The turn runs in the session's nursery; its first event
        (``message.created``) is already in its buffer when this returns.

        Raises:
          InvalidRequest: ``text`` is not a non-empty string.
          SessionBusy: a turn of this session is running (names its id).
          SessionClosed: the session is being torn down.
          OutOfCredits: the account may not start turns.
          ShuttingDown: the runtime is closing.
        """
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("message must be a non-empty string")
        rt = self._runtime
        self._check_open()
        if self._active is not None:
            raise SessionBusy(self.id, self._active.id)
        turn = rt._new_turn(
            prefix="msg",
            account_id=self.account_id,
            session_id=self.id,
            text=text,
            body=AgentLoop(
                model=rt.model,
                toolbox=ToolBox(
                    workspace=self.workspace,
                    limits=rt.tool_limits,
                    sandbox=rt.sandbox,
                    on_process=rt._for_testing_on_process,
                ),
                context=self._context(),
            ),
            on_finished=self._turn_finished,
        )
        # Claim the session and register the turn before the first await, so a
        # concurrent send gets a 409 naming a response id that exists (and the
        # credit check cannot be raced). If the start fails, the turn ends
        # with a terminal event like any other, so its readers never hang.
        self._active = turn
        rt._register(turn)
        try:
            await turn._begin()
            self._check_open()
            assert self._nursery is not None
            self.last_activity = time.time()
            await start_in(rt._context, self._nursery, turn._run)
        except BaseException as exc:
            if turn.state.is_running:
                turn._abort_start(exc)
            raise
        self._history.append(turn)
        return turn

    def history(self) -> list[TurnRecord]:
        """Every turn of the session, oldest first (the running one included)."""
        return [t.record() if isinstance(t, Turn) else t for t in self._history]

    def record(self) -> SessionRecord:
        """The session as the store keeps it (persistent sessions only)."""
        return SessionRecord(
            id=self.id,
            account_id=self.account_id,
            ttl=self.ttl,
            metadata=self.metadata,
            model=self.model,
            created_at=self.created_at,
            last_activity=self.last_activity,
        )

    def _restore(self, record: SessionRecord, history: tuple[TurnRecord, ...]) -> None:
        """Take up a persistent session from the store after a restart."""
        self.last_activity = record.last_activity
        self._history = list(history)
        remaining = record.created_at + record.ttl - time.time()
        self._expires_at = trio.current_time() + max(0.0, remaining)

    def _check_open(self) -> None:
        if self._runtime._closing:
            raise ShuttingDown("the runtime is shutting down; no new turns are accepted")
        if self._closing is not None:
            raise SessionClosed(f"session {self.id} is closing ({self._closing})")

    def _context(self) -> tuple[ChatMessage, ...]:
        """The completed turns of the session, as model context."""
        messages: list[ChatMessage] = []
        for entry in self._history:
            if isinstance(entry, TurnRecord) and entry.status == TurnState.COMPLETED.value:
                messages.append(ChatMessage(role="user", content=entry.input))
                messages.append(ChatMessage(role="assistant", content=entry.output_text))
        return tuple(messages)

    def _turn_finished(self, turn: Turn) -> None:
        if self._history and self._history[-1] is turn:
            self._history[-1] = turn.record()
        if self._active is turn:
            self._active = None
        if not turn._begun:
            # Its start was refused (credits, rate limit): no turn ran, so the
            # session's activity and idle clock stay those of its last turn.
            return
        self.last_activity = time.time()
        self._idle_since = trio.current_time()
        # Re-arm the idle timer in place rather than waking the session task,
        # so no extra task runs between a terminal event and its readers. A
        # timer that is already earlier just fires and the loop re-computes.
        deadline = self._deadline()
        if deadline < self._timer.deadline:
            self._timer.deadline = deadline

    # -- lifetime ---------------------------------------------------------

    def _close(self, reason: str) -> None:
        """Begin teardown: cancel the running turn with ``reason``. Idempotent."""
        if self._closing is None:
            self._closing = reason
            if self._active is not None:
                self._active._cancel(reason)
        self._wake.set()

    async def wait_closed(self) -> None:
        """Wait until the session's teardown has finished (workspace handled)."""
        await self._done.wait()

    def _deadline(self) -> float:
        deadline = self._expires_at
        if not self.persistent and self._active is None:
            deadline = min(deadline, self._idle_since + self._idle_timeout)
        return deadline

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            # A metadata-only mkdir: cheap enough for the loop, and keeping it
            # here (not in a thread) keeps session creation deterministic under
            # a mock clock. Inside the try: if it fails, the finally still
            # forgets the session.
            os.makedirs(self.workspace.root, exist_ok=True)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while self._closing is None:
                    self._wake = trio.Event()
                    self._timer = trio.CancelScope(deadline=self._deadline())
                    with self._timer:
                        await self._wake.wait()
                        continue
                    # The deadline passed; it may have moved (a turn started).
                    if trio.current_time() >= self._deadline():
                        self._close(SESSION_EXPIRED)
                # Leaving the nursery waits for the cancelled turn to unwind.
        finally:
            if self._closing is None:  # cancelled from outside: the runtime is going away
                self._closing = SHUTDOWN
            keep = self._closing == SHUTDOWN and self.persistent
            if not keep:
                with trio.CancelScope(shield=True):
                    if self.persistent:
                        await self._forget_record()
                    try:
                        await trio.to_thread.run_sync(remove_tree, self.workspace.root)
                    except OSError:
                        logger.exception("session %s: could not remove its workspace", self.id)
            self._runtime._forget_session(self)
            self._done.set()

    async def _forget_record(self) -> None:
        """Delete the stored session row, before its workspace goes (a crash in
        between leaves a workspace that the next start-up sweeps away)."""
        try:
            with trio.fail_after(STORE_TIMEOUT):
                await self._runtime.store.delete_session(self.id)
        except Exception:
            # TooSlowError included. The row stays; the session comes back after
            # a restart, and can be deleted then.
            logger.exception("session %s: could not delete its stored record", self.id)

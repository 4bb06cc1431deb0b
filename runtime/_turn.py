"""A turn: one unit of agent work in its own cancel scope.

Theory of operation
-------------------
The turn task (:meth:`Turn._run`, started with ``nursery.start`` in its
session's nursery, or the runtime's for stateless turns) is the single writer
of the turn's fate and of its event buffer. Other tasks only ever call
:meth:`Turn._cancel`, which is synchronous: it moves the state machine
(:mod:`runtime._state`), seals the buffer and cancels the scope in one step,
so nothing can be appended between "cancel accepted" and the terminal event.

The task then runs the body (the agent loop, or one stateless model round)
inside ``with trio.CancelScope()``. How it leaves that scope is fed to the
state machine: ``UNWOUND`` if the cancel was caught there, ``FINISH`` if the
body returned. ``FINISH`` on a turn whose cancel was accepted after the body's
last checkpoint still ends ``CANCELLED``; otherwise the turn enters
``FINALIZING``, writes its usage record and debit (shielded: a completed turn is
always charged, exactly once) and ends ``COMPLETED``. An exception from the body
ends it ``FAILED`` (or ``CANCELLED`` if a cancel was accepted first). A cancel
from outside (the runtime's nursery) reaches the body as ``trio.Cancelled``
that is not ours: the turn records it as cancelled (reason ``shutdown`` unless
one was given) and lets it propagate. In every case exactly one terminal event
is appended, last.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import trio

from ._buffer import EventBuffer
from ._errors import AgentRuntimeError, NotFound
from ._events import ResponseSnapshot
from ._records import ToolCallRecord, TurnRecord, UsageRecord
from ._state import CancelOutcome, TurnInput, TurnState, cancel_outcome, next_state

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ._events import Event, Usage
    from ._store import Pricing, Store

logger = logging.getLogger("runtime")

#: Cancel reasons the runtime itself uses.
CLIENT_CANCEL: Final = "client_cancel"
SESSION_DELETED: Final = "session_deleted"
SESSION_EXPIRED: Final = "session_expired"
SHUTDOWN: Final = "shutdown"
#: How long a finalizing turn waits for the ledger before it fails unbilled.
LEDGER_TIMEOUT: Final = 30.0
#: The error name of a turn that failed because the store did (DESIGN: store_error).
STORE_ERROR: Final = "store_error"
#: Prefix of a turn failed by an unexpected exception (a bug); its text is
#: logged, never sent.
INTERNAL_ERROR: Final = "internal_error"


class TurnBody(Protocol):
    """What a turn runs: it owns the event vocabulary, the turn the lifecycle."""

    def begin(self, turn: Turn) -> None:
        """Append the first event(s); called before the turn is started."""

    async def run(self, turn: Turn) -> Usage:
        """Do the work, appending events; return the usage to bill."""
        ...

    def completed(self, turn: Turn, usage: Usage) -> None:
        """Append the terminal event of a completed turn."""

    def cancelled(self, turn: Turn, reason: str) -> None:
        """Append the terminal event of a cancelled turn."""

    def failed(self, turn: Turn, error: str) -> None:
        """Append the terminal event of a failed turn."""


@final
@attrs.define(eq=False, kw_only=True)
class Turn:
    """One turn: a session message (``msg_…``) or a stateless response (``resp_…``).

    Obtained from :meth:`Session.send`, :meth:`Runtime.respond` or
    :meth:`Runtime.get_turn`; never constructed by users.
    """

    id: str
    account_id: str
    session_id: str | None
    model: str
    input: str
    created_at: float = attrs.field(factory=time.time)
    _body: TurnBody = attrs.field(alias="_body")
    _store: Store = attrs.field(alias="_store")
    _pricing: Pricing = attrs.field(alias="_pricing")
    _on_finished: Callable[[Turn], None] = attrs.field(alias="_on_finished")
    _hook_finalizing: Callable[[Turn], Awaitable[None]] | None = attrs.field(
        default=None, alias="_hook_finalizing"
    )

    state: TurnState = attrs.field(default=TurnState.IN_PROGRESS, init=False)
    buffer: EventBuffer = attrs.field(init=False)
    cancel_reason: str | None = attrs.field(default=None, init=False)
    usage: Usage | None = attrs.field(default=None, init=False)
    error: str | None = attrs.field(default=None, init=False)
    finished_at: float | None = attrs.field(default=None, init=False)
    tool_calls: list[ToolCallRecord] = attrs.field(factory=list, init=False)
    _text: list[str] = attrs.field(factory=list, init=False)
    #: Made here, not in the task: a cancel accepted before the turn task
    #: first runs must still land (trio lets a scope be cancelled before entry).
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: True once the store has admitted the turn (so it must hear how it ended).
    _begun: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.buffer = EventBuffer(self.id)

    def __repr__(self) -> str:
        return f"<Turn {self.id} {self.state.value} seq={len(self.buffer)}>"

    @property
    def is_stateless(self) -> bool:
        return self.session_id is None

    @property
    def output_text(self) -> str:
        """The answer text streamed so far (every text delta, in order)."""
        if len(self._text) > 1:
            self._text[:] = ["".join(self._text)]
        return self._text[0] if self._text else ""

    def _add_text(self, text: str) -> None:
        # A list, not ``+=`` on an attribute: that copies the whole answer
        # for every delta (quadratic in the length of the turn).
        self._text.append(text)

    def response_snapshot(self) -> ResponseSnapshot:
        """A stateless turn's response object as it stands (final once ended).

        Raises:
          TypeError: for a session turn.
        """
        terminal = self.buffer.terminal
        snapshot = getattr(terminal, "response", None)
        if isinstance(snapshot, ResponseSnapshot):
            return snapshot
        make = getattr(self._body, "snapshot", None)
        if make is None:
            raise TypeError(f"{self!r} is a session turn; it has no response object")
        result: ResponseSnapshot = make(self, self.status)
        return result

    def record(self) -> TurnRecord:
        """The turn as it stands, as the store and its session's history keep it."""
        response = None
        if self.is_stateless and self.state.is_terminal:
            response = self.response_snapshot()
        return TurnRecord(
            id=self.id,
            account_id=self.account_id,
            session_id=self.session_id,
            model=self.model,
            status=self.status,
            input=self.input,
            created_at=self.created_at,
            output_text=self.output_text,
            tool_calls=tuple(self.tool_calls),
            usage=self.usage,
            cancel_reason=self.cancel_reason,
            error=self.error,
            finished_at=self.finished_at,
            response=response,
        )

    async def _begin(self) -> None:
        """Have the store admit the turn (credits, rate limits) and record it
        as running. Raises what :meth:`Store.begin_turn` raises."""
        await self._store.begin_turn(self.record())
        self._begun = True

    # -- public API -----------------------------------------------------

    def events(self, after: int | None = None) -> AsyncIterator[Event]:
        """Replay the turn's events after ``after`` (all from 0 if None), then
        follow live until the terminal event.

        Cancellation: cancelling the reader ends the reader only; the turn
        goes on.
        """
        return self.buffer.events(after)

    async def read_batch(
        self, after: int | None = None, *, limit: int | None = None
    ) -> tuple[Event, ...]:
        """Every event after ``after`` available now (at most ``limit``),
        waiting for at least one; ``()`` once the terminal event has been
        read. For coalescing writers."""
        return await self.buffer.read_batch(after, limit=limit)

    @property
    def status(self) -> str:
        """The lifecycle state as clients see it (``finalizing`` shows as
        ``in_progress``: the outcome is not public until the terminal event)."""
        state = TurnState.IN_PROGRESS if self.state is TurnState.FINALIZING else self.state
        return str(state.value)

    async def cancel(self, reason: str = CLIENT_CANCEL) -> CancelOutcome:
        """Ask the turn to stop.

        Returns:
          ``CancelOutcome.CANCELLING`` while the turn runs (also for a repeat
          call before the cancel has landed); the turn then ends with a
          ``*.cancelled`` terminal event and is not billed.
          ``CancelOutcome.ALREADY_COMPLETE`` once it has ended, however it
          ended, or once it is finalizing: it then completes and is billed,
          or, if the ledger write fails, ends failed and unbilled; never
          cancelled.

        Cancellation: the decision is taken synchronously before the call's
        only checkpoint, so cancelling the caller does not undo it.
        """
        outcome = self._cancel(reason)
        await trio.lowlevel.checkpoint()
        return outcome

    async def wait_finished(self) -> Event:
        """Wait until the turn has its terminal event, and return that event."""
        await self._done.wait()
        terminal = self.buffer.terminal
        assert terminal is not None
        return terminal

    # -- the single writer ----------------------------------------------

    def _fire(self, event: TurnInput) -> TurnState:
        self.state = next_state(self.state, event)
        return self.state

    def _cancel(self, reason: str) -> CancelOutcome:
        was = self.state
        now = self._fire(TurnInput.CANCEL)
        if was is TurnState.IN_PROGRESS and now is TurnState.CANCELLING:
            self.cancel_reason = reason
            self.buffer.seal()
            self._scope.cancel(reason=reason)
        return cancel_outcome(now)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        body = self._body
        try:
            with self._scope as scope:
                task_status.started()
                usage = await body.run(self)
        except Exception as exc:
            if self.state is not TurnState.CANCELLING:
                logger.exception("turn %s failed", self.id)
            if isinstance(exc, AgentRuntimeError):
                self._end_failed(f"{exc.error_type}: {exc}")
            else:
                # A bug's text may name host paths or secrets: the log has it.
                self._end_failed(f"{INTERNAL_ERROR} ({type(exc).__name__}); see the server log")
            return
        except BaseException:
            # Cancelled from outside our scope (the runtime is going away).
            if not self.state.is_terminal:
                self._fire(TurnInput.UNWOUND)
                self._end_cancelled(default=SHUTDOWN)
            raise
        if self._fire(TurnInput.UNWOUND if scope.cancelled_caught else TurnInput.FINISH) is (
            TurnState.CANCELLED
        ):
            self._end_cancelled()
            return
        await self._finalize(usage)

    async def _finalize(self, usage: Usage) -> None:
        """Charge a finished turn exactly once, then append its terminal event.

        The usage record, the debit and the turn's final record are one store
        transaction. Shielded, so a shutdown cannot leave the turn
        charged-but-unfinished or finished-unpaid; bounded, so a stuck store
        cannot hold shutdown forever. Any failure here ends the turn
        ``failed`` (``store_error``) and unbilled: the transaction either
        happened or not, and a late write is still unique by response id.
        """
        assert self.state is TurnState.FINALIZING
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + LEDGER_TIMEOUT
            try:
                now = time.time()
                record = UsageRecord(
                    response_id=self.id,
                    account_id=self.account_id,
                    session_id=self.session_id,
                    model=self.model,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    credits=self._pricing.cost(usage),
                    created_at=now,
                    estimated=usage.estimated,
                )
                final = attrs.evolve(
                    self.record(), status=TurnState.COMPLETED.value, usage=usage, finished_at=now
                )
                make = getattr(self._body, "snapshot", None)
                if make is not None:
                    final = attrs.evolve(
                        final, response=make(self, TurnState.COMPLETED.value, usage=usage)
                    )
                if self._hook_finalizing is not None:
                    await self._hook_finalizing(self)
                await self._store.complete_turn(record, final)
            except Exception as exc:
                logger.exception("turn %s: writing its usage failed", self.id)
                self._end_failed(
                    f"{STORE_ERROR}: the turn's usage could not be recorded, so it is not "
                    f"billed ({type(exc).__name__}: {exc})"
                )
                return
        if scope.cancelled_caught:
            logger.error("turn %s: the store did not answer in %s s", self.id, LEDGER_TIMEOUT)
            self._end_failed(
                f"{STORE_ERROR}: the store did not answer in {LEDGER_TIMEOUT:g} s; "
                f"the turn is not billed"
            )
            return
        self._fire(TurnInput.FINALIZED)
        self.usage = usage
        self.finished_at = final.finished_at
        self._end(lambda: self._body.completed(self, usage))

    def _end_failed(self, error: str) -> None:
        """FAIL: ends ``failed``, or ``cancelled`` if a cancel was accepted first."""
        if self._fire(TurnInput.FAIL) is TurnState.CANCELLED:
            self._end_cancelled()
            return
        self.error = error
        self._end(lambda: self._body.failed(self, error))

    def _abort_start(self, exc: BaseException) -> None:
        """End a turn whose start was refused (credits, closing session)."""
        if isinstance(exc, AgentRuntimeError):
            self._end_failed(f"{exc.error_type}: {exc}")
        else:
            self._end_failed(
                f"{INTERNAL_ERROR}: the turn could not start ({type(exc).__name__}); "
                "see the server log"
            )

    def _end_cancelled(self, default: str = SHUTDOWN) -> None:
        assert self.state is TurnState.CANCELLED
        if self.cancel_reason is None:
            self.cancel_reason = default
        reason = self.cancel_reason
        self._end(lambda: self._body.cancelled(self, reason))

    def _end(self, append_terminal: Callable[[], None]) -> None:
        assert self.state.is_terminal
        self.buffer.seal()
        append_terminal()
        assert self.buffer.closed, f"{self!r}: the body appended no terminal event"
        if self.finished_at is None:
            self.finished_at = time.time()
        self._done.set()
        self._on_finished(self)
        if self._begun and self.state is not TurnState.COMPLETED:
            # A completed turn's record went with its ledger transaction.
            self._store.end_turn(self.record())


def lookup(turns: dict[str, Turn], response_id: str) -> Turn:
    """``turns[response_id]``, or :class:`NotFound` naming the id."""
    try:
        return turns[response_id]
    except KeyError:
        raise NotFound(f"response {response_id!r} is unknown, or was evicted") from None

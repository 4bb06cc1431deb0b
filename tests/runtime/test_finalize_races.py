"""Pinned interleavings around a turn's finalize step (issue 9, point 3).

A turn that finished its work enters ``FINALIZING`` and writes its usage
record and debit in one store transaction (``Store.complete_turn``), shielded
and bounded by ``LEDGER_TIMEOUT``. Each test here holds that transaction open
in the store (a :class:`HeldLedger`) and lands one other operation inside it:
a client cancel, a ledger failure after the cancel was answered, a DELETE, a
session's ttl running out, late readers, idempotent retries, runtime shutdown
(within its grace, past it, and with a ledger that never answers). One more
lands a cancel just *before* finalize: accepted while the body cannot see it,
so the body finishes its work and the turn must still end cancelled.

The contract checked throughout (``runtime/_state.py``): a cancel answered
``CANCELLING`` (HTTP 202) ends ``cancelled`` and unbilled; from ``FINALIZING``
on, a cancel answers ``ALREADY_COMPLETE`` (200) and changes nothing, and the
turn is billed exactly once, or fails unbilled if the ledger does; never both,
and never cancelled. Already pinned elsewhere, not repeated here: a cancel
during the finalize *hook* (``test_turn.py``), a ledger that hangs without a
shutdown (``test_races.py``), a cancel accepted after the body's last
checkpoint from inside the model (``test_turn.py``).

Session and stateless turns share the finalize code but not their bodies or
owners (a session's nursery, or the runtime's), so most tests run for both.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Final

import attrs
import pytest
import trio
import trio.testing

from runtime import (
    CancelOutcome,
    IdempotencyConflict,
    MemoryStore,
    MessageCancelled,
    MessageCompleted,
    MessageError,
    NotFound,
    Pricing,
    Replayed,
    ResponseCancelled,
    ResponseCompleted,
    ResponseFailed,
    Runtime,
    SessionClosed,
    ShuttingDown,
    StoreError,
    TextChunk,
    Turn,
    TurnState,
    UsageChunk,
    fingerprint,
)
from runtime._runtime import SHUTDOWN_TIMEOUT
from runtime._turn import LEDGER_TIMEOUT

from ..fakes import DelegatingStore, FakeModel
from ..helpers import collect, state_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from runtime import Event, Session, TurnRecord, UsageRecord

#: FakeModel's default turn: 3 tokens in, 2 out, at 1 and 2 credits a token.
COST: Final = 7.0
PRICES: Final = {"fake": Pricing(1_000_000.0, 2_000_000.0)}
KINDS: Final = ("session", "stateless")

COMPLETED: Final[dict[str, type[Event]]] = {
    "session": MessageCompleted,
    "stateless": ResponseCompleted,
}
CANCELLED: Final[dict[str, type[Event]]] = {
    "session": MessageCancelled,
    "stateless": ResponseCancelled,
}
FAILED: Final[dict[str, type[Event]]] = {"session": MessageError, "stateless": ResponseFailed}


@attrs.define(eq=False)
class HeldLedger(DelegatingStore):
    """A MemoryStore whose ledger transaction waits for ``release`` once entered
    (``entered`` is set then), and then raises ``fail`` if it is set."""

    inner: MemoryStore = attrs.field(factory=MemoryStore)
    entered: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    fail: Exception | None = None
    #: Response ids of every ledger transaction begun, and of those written.
    calls: list[str] = attrs.field(factory=list)
    written: list[str] = attrs.field(factory=list)

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        self.calls.append(usage.response_id)
        self.entered.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        done = await self.inner.complete_turn(usage, record)
        if done:
            self.written.append(usage.response_id)
        return done

    async def assert_billed(self, *turns: Turn) -> None:
        """Exactly ``turns`` are billed, once each, and nothing else."""
        records = await self.inner.usage_records("local", limit=1000)
        assert sorted(r.response_id for r in records) == sorted(t.id for t in turns)
        assert sorted(self.written) == sorted(t.id for t in turns)
        balance = (await self.inner.get_account("local")).balance
        assert balance == 1000.0 - COST * len(turns)
        for turn in turns:
            stored = await self.inner.get_turn(turn.id)
            assert stored is not None
            assert stored.status == "completed"


@pytest.fixture
def ledger() -> HeldLedger:
    return HeldLedger()


@pytest.fixture
async def rt(tmp_path: Path, model: FakeModel, ledger: HeldLedger) -> AsyncIterator[Runtime]:
    async with Runtime.open(data_dir=tmp_path, model=model, store=ledger, prices=PRICES) as rt:
        yield rt
        ledger.release.set()  # a test that failed holding it: let shutdown finish


@contextlib.contextmanager
def releasing(ledger: HeldLedger) -> Iterator[None]:
    """Release the ledger when the block ends, even by a failed assertion (a
    nursery would otherwise wait for the shielded finalize for LEDGER_TIMEOUT)."""
    try:
        yield
    finally:
        ledger.release.set()


async def start(rt: Runtime, kind: str) -> Turn:
    if kind == "session":
        session = await rt.create_session()
        return await session.send("hi")
    return await rt.respond("hi")


async def finalizing(rt: Runtime, ledger: HeldLedger, kind: str) -> Turn:
    """Start a turn and return it once its ledger transaction is in flight."""
    turn = await start(rt, kind)
    await ledger.entered.wait()
    assert ledger.calls == [turn.id]
    assert turn.state is TurnState.FINALIZING
    assert turn.status == "in_progress"  # the outcome is not public yet
    assert turn.buffer.terminal is None
    return turn


def assert_stream(events: list[Event], after: int, terminal: type[Event]) -> None:
    """Contiguous from ``after + 1``, exactly one terminal, of type ``terminal``, last."""
    assert [e.sequence_number for e in events] == list(range(after + 1, after + 1 + len(events)))
    assert [e.is_terminal for e in events] == [False] * (len(events) - 1) + [True]
    assert isinstance(events[-1], terminal)


# -- cancel -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_cancel_while_ledger_write_in_flight(
    rt: Runtime, ledger: HeldLedger, kind: str
) -> None:
    """race: cancels while complete_turn is in flight answer ALREADY_COMPLETE, change
    nothing, and the turn completes billed once (no 202 for a turn that is charged)."""
    turn = await finalizing(rt, ledger, kind)
    length = len(turn.buffer)
    for _ in range(3):
        assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    assert turn.state is TurnState.FINALIZING
    assert turn.cancel_reason is None
    assert len(turn.buffer) == length
    ledger.release.set()
    terminal = await turn.wait_finished()
    assert isinstance(terminal, COMPLETED[kind])
    assert terminal.sequence_number == length
    assert state_of(turn) is TurnState.COMPLETED
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    await ledger.assert_billed(turn)


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_ledger_failure_after_cancel_answered_already_complete(
    rt: Runtime, ledger: HeldLedger, kind: str
) -> None:
    """race: a cancel answered ALREADY_COMPLETE, then the ledger write fails: the turn
    ends failed (store_error), unbilled, never cancelled."""
    ledger.fail = StoreError("disk I/O error")
    turn = await finalizing(rt, ledger, kind)
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    ledger.release.set()
    terminal = await turn.wait_finished()
    assert isinstance(terminal, FAILED[kind])
    assert state_of(turn) is TurnState.FAILED
    assert turn.error is not None
    assert turn.error.startswith("store_error:")
    assert turn.cancel_reason is None
    assert turn.usage is None
    await ledger.assert_billed()
    stored = await ledger.inner.get_turn(turn.id)
    assert stored is not None
    assert stored.status == "failed"


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_cancel_accepted_while_body_cannot_see_it(
    rt: Runtime, model: FakeModel, ledger: HeldLedger, kind: str
) -> None:
    """race: a cancel accepted just before finalize (the body, past its usage, waits
    shielded and then returns) answers CANCELLING: the turn ends cancelled, nothing
    is appended after the cancel, and the ledger is never asked."""
    model.steps = [[TextChunk("a"), UsageChunk(3, 2), "shielded-block"]]
    turn = await start(rt, kind)
    await model.blocked.wait()
    length = len(turn.buffer)
    assert await turn.cancel() is CancelOutcome.CANCELLING
    assert await turn.cancel() is CancelOutcome.CANCELLING  # not landed yet
    assert turn.state is TurnState.CANCELLING
    model.gate.set()
    events = await collect(turn)
    # The body finished its work (FINISH) after the cancel: still cancelled.
    assert model.closed == 1
    assert len(events) == length + 1  # sealed: the text block's end was dropped
    assert_stream(events, -1, CANCELLED[kind])
    assert state_of(turn) is TurnState.CANCELLED
    assert turn.cancel_reason == "client_cancel"
    assert turn.usage is None
    assert ledger.calls == []
    await ledger.assert_billed()
    if kind == "stateless":
        # The response object shows the partial output as it was when cancelled.
        snapshot = turn.response_snapshot()
        assert snapshot.status == "cancelled"
        assert [item.status for item in snapshot.output] == ["in_progress"]


# -- DELETE and session expiry ------------------------------------------------------


async def test_finalize_race_delete_session_during_ledger_write(
    rt: Runtime, ledger: HeldLedger
) -> None:
    """race: DELETE while the turn is finalizing waits for it: the turn completes and
    is billed once (not cancelled), then the session is gone with its workspace."""
    session = await rt.create_session()
    turn = await session.send("hi")
    await ledger.entered.wait()
    deleted = trio.Event()

    async def delete() -> None:
        await rt.delete_session(session.id)
        deleted.set()

    async with trio.open_nursery() as nursery:
        with releasing(ledger):
            nursery.start_soon(delete)
            await trio.testing.wait_all_tasks_blocked()
            assert not deleted.is_set()
            assert session.status == "closing"
            assert turn.state is TurnState.FINALIZING
            assert turn.cancel_reason is None  # the DELETE's cancel was not accepted
            with pytest.raises(SessionClosed):
                await session.send("again")
            assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    assert isinstance(turn.buffer.terminal, MessageCompleted)
    assert state_of(turn) is TurnState.COMPLETED
    assert session.closed
    assert not os.path.exists(session.workspace.root)
    with pytest.raises(NotFound):
        rt.get_session(session.id)
    [entry] = session.history()
    assert (entry.id, entry.status) == (turn.id, "completed")
    await ledger.assert_billed(turn)


async def test_finalize_race_session_ttl_runs_out_during_ledger_write(
    tmp_path: Path, ledger: HeldLedger, autojump_clock: trio.abc.Clock
) -> None:
    """race: a session's ttl running out while its turn finalizes: the turn completes,
    billed once; the session is torn down after it."""
    model = FakeModel()
    async with Runtime.open(data_dir=tmp_path, model=model, store=ledger, prices=PRICES) as rt:
        session = await rt.create_session(ttl=5)
        turn = await session.send("hi")
        await ledger.entered.wait()
        await trio.sleep(10)  # the ttl runs out while the ledger holds
        assert session.status == "closing"
        assert turn.state is TurnState.FINALIZING
        ledger.release.set()
        await session.wait_closed()
        assert isinstance(turn.buffer.terminal, MessageCompleted)
        await ledger.assert_billed(turn)


# -- readers ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_readers_attach_during_ledger_write(
    rt: Runtime, ledger: HeldLedger, kind: str
) -> None:
    """race: readers attaching while the turn finalizes, at every cursor and through
    both read paths, get the exact tail, wait, then exactly one completed event."""
    turn = await finalizing(rt, ledger, kind)
    length = len(turn.buffer)
    seen: dict[tuple[int, bool], list[Event]] = {}

    async def read(after: int, batch: bool) -> None:
        got = seen.setdefault((after, batch), [])
        if not batch:
            async for event in rt.get_turn(turn.id).events(after):
                got.append(event)
            return
        last = after
        while events := await turn.read_batch(last):
            got.extend(events)
            last = events[-1].sequence_number

    async with trio.open_nursery() as nursery:
        with releasing(ledger):
            for after in range(-1, length):
                for batch in (False, True):
                    nursery.start_soon(read, after, batch)
            await trio.testing.wait_all_tasks_blocked()
            # Every reader has what there is and waits: no terminal before the ledger.
            for (after, _), got in seen.items():
                assert list(got) == list(turn.buffer.snapshot()[after + 1 :])
                assert not any(e.is_terminal for e in got)
    assert len(seen) == 2 * (length + 1)
    for (after, _), got in seen.items():
        assert_stream(got, after, COMPLETED[kind])
        assert tuple(got) == turn.buffer.snapshot()[after + 1 :]
    await ledger.assert_billed(turn)


# -- idempotent retries -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_idempotent_retry_during_ledger_write(
    tmp_path: Path, ledger: HeldLedger, kind: str, autojump_clock: trio.abc.Clock
) -> None:
    """race: a retry with the key while the turn finalizes gets the same turn at once
    (no second turn, no second charge); another body is a conflict; after eviction
    the key answers Replayed."""
    model = FakeModel()
    async with Runtime.open(
        data_dir=tmp_path, model=model, store=ledger, prices=PRICES, grace_seconds=5
    ) as rt:
        session: Session | None = await rt.create_session() if kind == "session" else None
        where = session.id if session is not None else "responses"
        starts: list[Turn] = []

        async def begin() -> Turn:
            turn = await (session.send("hi") if session is not None else rt.respond("hi"))
            starts.append(turn)
            return turn

        async def request(body: str = "hi") -> Turn | Replayed:
            return await rt.idempotency.run(
                "local", "key-1", fingerprint(where, body), begin, rt.find_turn
            )

        first = await request()
        await ledger.entered.wait()
        assert isinstance(first, Turn)
        assert first.state is TurnState.FINALIZING
        # The retries do not wait for the ledger: they return while it holds.
        for _ in range(3):
            assert await request() is first
        with pytest.raises(IdempotencyConflict):
            await request("another body")
        assert first.state is TurnState.FINALIZING
        ledger.release.set()
        assert isinstance(await first.wait_finished(), COMPLETED[kind])
        assert await request() is first
        assert starts == [first]
        if session is not None:
            assert [entry.id for entry in session.history()] == [first.id]
        await trio.sleep(6)  # past the grace: evicted
        assert rt.find_turn(first.id) is None
        assert await request() == Replayed(first.id)
        assert starts == [first]
        await ledger.assert_billed(first)


# -- shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_shutdown_waits_for_ledger_write(
    rt: Runtime, ledger: HeldLedger, kind: str
) -> None:
    """race: shutdown while the ledger write is in flight: the turn is not cancelled
    (reason shutdown never lands), it completes billed once, and shutdown returns
    only after it."""
    turn = await finalizing(rt, ledger, kind)
    done = trio.Event()

    async def shut_down() -> None:
        await rt.shutdown()
        done.set()

    async with trio.open_nursery() as nursery:
        with releasing(ledger):
            nursery.start_soon(shut_down)
            await trio.testing.wait_all_tasks_blocked()
            assert rt.closing
            assert not done.is_set()
            assert turn.state is TurnState.FINALIZING
            assert turn.cancel_reason is None
            with pytest.raises(ShuttingDown):
                await start(rt, kind)
    assert isinstance(turn.buffer.terminal, COMPLETED[kind])
    assert state_of(turn) is TurnState.COMPLETED
    assert rt.statistics().running_turns == 0
    await ledger.assert_billed(turn)


@attrs.define(eq=False)
class SlowLedger(HeldLedger):
    """A ledger whose transaction takes ``seconds`` (forever if None) of the trio clock."""

    seconds: float | None = None

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        self.calls.append(usage.response_id)
        self.entered.set()
        if self.seconds is None:
            await trio.sleep_forever()
        await trio.sleep(self.seconds)
        done = await self.inner.complete_turn(usage, record)
        if done:
            self.written.append(usage.response_id)
        return done


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_ledger_outlasts_shutdown_grace(
    tmp_path: Path, kind: str, autojump_clock: trio.abc.Clock
) -> None:
    """race: a ledger write longer than SHUTDOWN_TIMEOUT (but within LEDGER_TIMEOUT):
    the runtime's hard cancel does not reach the shielded finalize; the turn
    completes billed once and Runtime.open returns after the write."""
    seconds = SHUTDOWN_TIMEOUT + 5
    assert seconds < LEDGER_TIMEOUT
    ledger = SlowLedger(seconds=seconds)
    async with Runtime.open(
        data_dir=tmp_path, model=FakeModel(), store=ledger, prices=PRICES
    ) as rt:
        turn = await start(rt, kind)
        await ledger.entered.wait()
        entered_at = trio.current_time()
    assert trio.current_time() - entered_at >= seconds - 1e-9
    assert isinstance(turn.buffer.terminal, COMPLETED[kind])
    assert turn.state is TurnState.COMPLETED
    await ledger.assert_billed(turn)


@pytest.mark.parametrize("kind", KINDS)
async def test_finalize_race_ledger_never_answers_during_shutdown(
    tmp_path: Path, kind: str, autojump_clock: trio.abc.Clock
) -> None:
    """race: shutdown with a ledger that never answers: after LEDGER_TIMEOUT the turn
    ends failed (store_error), unbilled, not cancelled; Runtime.open then returns."""
    ledger = SlowLedger(seconds=None)
    async with Runtime.open(
        data_dir=tmp_path, model=FakeModel(), store=ledger, prices=PRICES
    ) as rt:
        turn = await start(rt, kind)
        await ledger.entered.wait()
        entered_at = trio.current_time()
    assert trio.current_time() - entered_at >= LEDGER_TIMEOUT - 1e-9
    assert isinstance(turn.buffer.terminal, FAILED[kind])
    assert turn.state is TurnState.FAILED
    assert turn.error is not None
    assert turn.error.startswith("store_error:")
    assert turn.cancel_reason is None
    assert sum(e.is_terminal for e in turn.buffer.snapshot()) == 1
    await ledger.assert_billed()

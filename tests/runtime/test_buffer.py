"""The per-turn event buffer (``runtime/_buffer.py``).

Live tests reach quiescence with ``wait_all_tasks_blocked`` rather than
sleeping: it only returns once every reader is parked, so a reader that
busy-looped instead of blocking would make the test hang, and the
``fail_after`` guard (real clock: nothing here sleeps) turns that into a
failure.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from runtime import (
    InvalidRequest,
    MessageCancelled,
    MessageCompleted,
    MessageCreated,
    TextDelta,
    Usage,
)
from runtime._buffer import EventBuffer

if TYPE_CHECKING:
    from runtime import Event

RID: Final = "resp_test"
#: Hang guard for live tests (real seconds; a passing test takes milliseconds).
GUARD: Final = 5.0


def _created(buf: EventBuffer) -> MessageCreated | None:
    return buf.append(MessageCreated, id="msg_1", session_id="sess_1")


def _delta(buf: EventBuffer, k: int) -> TextDelta | None:
    return buf.append(TextDelta, content=f"w{k} ")


def _completed(buf: EventBuffer) -> MessageCompleted | None:
    return buf.append(MessageCompleted, id="msg_1", usage=Usage(1, 2))


def _full_buffer(deltas: int = 5) -> EventBuffer:
    """A closed buffer: created, ``deltas`` text deltas, completed."""
    buf = EventBuffer(RID)
    _created(buf)
    for k in range(deltas):
        _delta(buf, k)
    _completed(buf)
    return buf


async def _read(buf: EventBuffer, after: int | None, record: list[Event]) -> None:
    async for event in buf.events(after):
        record.append(event)


def _assert_tail(record: list[Event], buf: EventBuffer, after: int | None) -> None:
    """``record`` is exactly the buffer's events after ``after``, ending with its one terminal."""
    start = 0 if after is None else after + 1
    assert record == list(buf.snapshot()[start:])
    assert [e.sequence_number for e in record] == list(range(start, len(buf)))
    assert [e.is_terminal for e in record] == [False] * (len(record) - 1) + [True]


# --- appending --------------------------------------------------------------


def test_buffer_starts_open_and_empty() -> None:
    """A new buffer is open, unsealed, empty and has no terminal."""
    buf = EventBuffer(RID)
    assert not buf.sealed
    assert not buf.closed
    assert buf.terminal is None
    assert len(buf) == 0
    assert buf.snapshot() == ()
    assert repr(buf) == f"<EventBuffer {RID} open len=0>"


def test_buffer_sequence_numbers_contiguous_and_stamped() -> None:
    """Appends get sequence numbers 0, 1, 2, … and the buffer's response_id."""
    buf = EventBuffer(RID)
    appended: list[Event | None] = [_created(buf)]
    appended += [_delta(buf, k) for k in range(10)]
    appended.append(_completed(buf))

    events = buf.snapshot()
    assert list(events) == appended
    assert [e.sequence_number for e in events] == list(range(12))
    assert {e.response_id for e in events} == {RID}
    assert len(buf) == 12
    assert isinstance(events[0], MessageCreated)
    assert events[0].session_id == "sess_1"
    assert [e.content for e in events[1:11] if isinstance(e, TextDelta)] == [
        f"w{k} " for k in range(10)
    ]


def test_buffer_terminal_closes_and_seals() -> None:
    """The terminal event closes and seals the buffer and is its ``terminal``."""
    buf = EventBuffer(RID)
    _created(buf)
    assert not buf.closed
    done = _completed(buf)
    assert done is not None
    assert buf.closed
    assert buf.sealed
    assert buf.terminal is done
    assert done.usage == Usage(1, 2)
    assert repr(buf) == f"<EventBuffer {RID} closed len=2>"


def test_buffer_seal_drops_non_terminal_keeps_terminal() -> None:
    """After seal, non-terminal appends return None and are not stored; the terminal still is."""
    buf = EventBuffer(RID)
    _created(buf)
    _delta(buf, 0)
    buf.seal()
    buf.seal()  # idempotent
    assert buf.sealed
    assert not buf.closed
    assert repr(buf) == f"<EventBuffer {RID} sealed len=2>"

    assert _delta(buf, 1) is None
    assert _created(buf) is None
    assert len(buf) == 2

    cancelled = buf.append(MessageCancelled, id="msg_1", reason="client_cancel")
    assert cancelled is not None
    assert cancelled.sequence_number == 2
    assert cancelled.reason == "client_cancel"
    assert buf.terminal is cancelled
    assert buf.snapshot()[-1] is cancelled


@pytest.mark.parametrize("sealed", [False, True])
def test_buffer_append_after_terminal_raises(sealed: bool) -> None:
    """Any append after the terminal event raises RuntimeError and changes nothing."""
    buf = _full_buffer(2)
    if sealed:
        buf.seal()
    before = buf.snapshot()
    with pytest.raises(RuntimeError, match="after the terminal event"):
        _delta(buf, 99)
    with pytest.raises(RuntimeError, match="after the terminal event"):
        buf.append(MessageCancelled, id="msg_1", reason="late")
    with pytest.raises(RuntimeError, match="after the terminal event"):
        _completed(buf)
    assert buf.snapshot() == before


# --- replay -----------------------------------------------------------------


async def test_buffer_events_without_cursor_replays_all() -> None:
    """events() with no cursor (or -1) replays every event from sequence 0."""
    buf = _full_buffer()
    assert [e async for e in buf.events()] == list(buf.snapshot())
    assert [e async for e in buf.events(-1)] == list(buf.snapshot())
    assert [e async for e in buf.events(None)] == list(buf.snapshot())


async def test_buffer_events_after_every_cursor_gives_exact_tail() -> None:
    """events(after=N) on a closed buffer yields exactly events N+1.. for every N."""
    buf = _full_buffer()
    for after in range(-1, len(buf)):
        record = [e async for e in buf.events(after)]
        assert record == list(buf.snapshot()[after + 1 :])
        assert [e.sequence_number for e in record] == list(range(after + 1, len(buf)))


@pytest.mark.parametrize("after", [-2, -3, -100])
def test_buffer_events_after_below_minus_one_raises(after: int) -> None:
    """events(after) with after < -1 raises InvalidRequest at once."""
    buf = _full_buffer()
    with pytest.raises(InvalidRequest, match=f"after must be >= -1, not {after}"):
        buf.events(after)


@pytest.mark.parametrize("beyond", [0, 1, 100])
async def test_buffer_events_after_beyond_last_on_closed_yields_nothing(beyond: int) -> None:
    """A cursor at or past the terminal of a closed buffer yields nothing (and does not wait)."""
    buf = _full_buffer()
    with trio.fail_after(GUARD):
        assert [e async for e in buf.events(len(buf) - 1 + beyond)] == []


async def test_buffer_reader_stays_finished() -> None:
    """A reader that reached the terminal keeps raising StopAsyncIteration."""
    buf = _full_buffer(0)
    reader = buf.events()
    assert reader.__aiter__() is reader
    assert [e async for e in reader] == list(buf.snapshot())
    for _ in range(3):
        with pytest.raises(StopAsyncIteration):
            await anext(reader)


async def test_buffer_cancelled_replay_step_loses_no_event() -> None:
    """A replay step cancelled at its checkpoint does not advance the cursor."""
    buf = _full_buffer(1)
    reader = buf.events()
    with trio.CancelScope() as cs:
        cs.cancel()
        await anext(reader)
        pytest.fail("a replay step with data ready must still be a checkpoint")  # pragma: no cover
    assert cs.cancelled_caught
    assert [e async for e in reader] == list(buf.snapshot())


# --- live readers -----------------------------------------------------------


async def test_buffer_live_readers_at_several_cursors_see_exact_tails() -> None:
    """Readers started mid-turn at any cursor each see the contiguous tail and one terminal."""
    buf = EventBuffer(RID)
    _created(buf)
    _delta(buf, 0)
    _delta(buf, 1)
    # Final buffer: seq 0..9, terminal at 9; cursors before, at and past the current end.
    cursors: list[int | None] = [None, -1, 0, 1, 2, 3, 5, 8]
    records: list[list[Event]] = [[] for _ in cursors]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for after, record in zip(cursors, records, strict=True):
                nursery.start_soon(_read, buf, after, record)
            await trio.testing.wait_all_tasks_blocked()
            for after, record in zip(cursors, records, strict=True):
                start = 0 if after is None else after + 1
                assert record == list(buf.snapshot()[start:])

            for k in range(2, 8):
                _delta(buf, k)
                await trio.lowlevel.checkpoint()
            _completed(buf)
    assert len(buf) == 10
    for after, record in zip(cursors, records, strict=True):
        _assert_tail(record, buf, after)


async def test_buffer_reader_past_the_end_of_open_buffer_waits_for_terminal() -> None:
    """A cursor past the last event of an open buffer blocks until the terminal, then ends."""
    buf = EventBuffer(RID)
    _created(buf)
    record: list[Event] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, buf, 50, record)
            await trio.testing.wait_all_tasks_blocked()
            _delta(buf, 0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == 1  # still waiting
            _completed(buf)
    assert record == []


async def test_buffer_many_readers_block_and_see_each_append() -> None:
    """50 concurrent readers park between appends and have seen exactly what was appended."""
    buf = EventBuffer(RID)
    records: list[list[Event]] = [[] for _ in range(50)]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(_read, buf, None, record)
            await trio.testing.wait_all_tasks_blocked()
            assert all(record == [] for record in records)

            _created(buf)
            for k in range(20):
                await trio.testing.wait_all_tasks_blocked()
                # Every reader is parked (wait_all_tasks_blocked returned) and
                # has seen every event so far, no more and no fewer.
                assert all(record == list(buf.snapshot()) for record in records)
                assert len(nursery.child_tasks) == 50
                _delta(buf, k)
            _completed(buf)
    for record in records:
        _assert_tail(record, buf, None)


async def test_buffer_writer_bursts_reach_parked_readers() -> None:
    """A burst of appends with no checkpoint in between reaches every parked reader in full."""
    buf = EventBuffer(RID)
    records: list[list[Event]] = [[] for _ in range(5)]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(_read, buf, None, record)
            await trio.testing.wait_all_tasks_blocked()
            _created(buf)
            for k in range(200):
                _delta(buf, k)
            await trio.testing.wait_all_tasks_blocked()
            assert all(len(record) == 201 for record in records)
            _completed(buf)
    for record in records:
        _assert_tail(record, buf, None)


async def test_buffer_sealed_reader_gets_terminal_after_last_kept_event() -> None:
    """A live reader of a sealed buffer sees the kept events, then the terminal, nothing else."""
    buf = EventBuffer(RID)
    record: list[Event] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, buf, None, record)
            _created(buf)
            await trio.testing.wait_all_tasks_blocked()
            buf.seal()
            assert _delta(buf, 0) is None
            await trio.testing.wait_all_tasks_blocked()
            assert record == list(buf.snapshot())
            buf.append(MessageCancelled, id="msg_1", reason="client_cancel")
    assert [e.type for e in record] == ["message.created", "message.cancelled"]
    _assert_tail(record, buf, None)


async def test_buffer_reader_cancelled_mid_wait_affects_nobody() -> None:
    """Cancelling one parked reader ends only it; the writer and other readers go on."""
    buf = EventBuffer(RID)
    cancelled_record: list[Event] = []
    other_record: list[Event] = []
    reader_scope = trio.CancelScope()

    async def cancellable_reader() -> None:
        with reader_scope:
            await _read(buf, None, cancelled_record)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancellable_reader)
            nursery.start_soon(_read, buf, None, other_record)
            _created(buf)
            _delta(buf, 0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(cancelled_record) == 2

            reader_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert reader_scope.cancelled_caught
            assert len(nursery.child_tasks) == 1  # the cancelled reader is gone

            for k in range(1, 5):
                assert _delta(buf, k) is not None
            _completed(buf)
    assert cancelled_record == list(buf.snapshot()[:2])
    _assert_tail(other_record, buf, None)


async def test_buffer_reader_cancelled_mid_wait_resumes_from_its_cursor() -> None:
    """A reader cancelled while parked keeps its cursor; iterating again continues there."""
    buf = EventBuffer(RID)
    reader = buf.events()
    record: list[Event] = []
    scope = trio.CancelScope()

    async def read_until_cancelled() -> None:
        with scope:
            async for event in reader:
                record.append(event)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_cancelled)
            _created(buf)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        _delta(buf, 0)
        _completed(buf)
        record.extend([e async for e in reader])
    _assert_tail(record, buf, None)


async def test_buffer_abandoned_reader_blocks_nothing() -> None:
    """A reader iterated once then dropped blocks neither the writer nor other readers."""
    buf = EventBuffer(RID)
    _created(buf)
    abandoned = buf.events()
    first = await anext(abandoned)
    assert first.sequence_number == 0
    del abandoned
    gc.collect()  # an abandoned reader needs no finalization (no warning either)

    record: list[Event] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, buf, None, record)
            for k in range(10):
                assert _delta(buf, k) is not None
            _completed(buf)
            terminal = await buf.wait_closed()
    assert terminal is buf.terminal
    _assert_tail(record, buf, None)


async def test_buffer_wait_closed_returns_the_terminal() -> None:
    """wait_closed blocks until the terminal event and returns it to every waiter."""
    buf = EventBuffer(RID)
    results: list[Event] = []

    async def waiter() -> None:
        results.append(await buf.wait_closed())

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter)
            _created(buf)
            _delta(buf, 0)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # non-terminal appends do not release waiters
            buf.seal()
            cancelled = buf.append(MessageCancelled, id="msg_1", reason="client_cancel")
        assert cancelled is not None
        assert results == [cancelled] * 3
        assert all(r is cancelled for r in results)
        # On a closed buffer it returns at once.
        assert await buf.wait_closed() is cancelled


async def test_buffer_nudge_wakes_read_batch_with_nothing() -> None:
    """nudge() wakes a read_batch waiter with () while the buffer stays open;
    a waiter that has events gets them, and a closed buffer still ends with ()."""
    buffer = EventBuffer("msg_n")
    buffer.append(MessageCreated, id="msg_n", session_id="sess_n")
    got: list[tuple[Event, ...]] = []

    async def reader() -> None:
        got.append(await buffer.read_batch(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        buffer.nudge()
    assert got == [()]
    assert not buffer.closed
    assert [e.sequence_number for e in await buffer.read_batch(-1)] == [0]
    buffer.append(MessageCancelled, id="msg_n", reason="client_cancel")
    buffer.nudge()
    assert await buffer.read_batch(1) == ()
    assert buffer.closed


async def test_buffer_read_batch_limit() -> None:
    """read_batch(limit=N) returns the first N events after the cursor, so a
    writer far behind takes its backlog in bounded pieces."""
    buf = EventBuffer(RID)
    _created(buf)
    for k in range(9):
        _delta(buf, k)
    seen = [e.sequence_number for e in await buf.read_batch(None, limit=4)]
    assert seen == [0, 1, 2, 3]
    seen = [e.sequence_number for e in await buf.read_batch(3, limit=4)]
    assert seen == [4, 5, 6, 7]
    seen = [e.sequence_number for e in await buf.read_batch(7, limit=4)]
    assert seen == [8, 9]


async def test_buffer_read_ready_and_read_batch_checkpoints() -> None:
    """read_ready returns what is appended already (maybe nothing) and never
    waits; read_batch is a checkpoint whether data is ready or it parks."""
    buf = EventBuffer(RID)
    assert buf.read_ready(None) == ()
    _created(buf)
    _delta(buf, 0)
    assert [e.sequence_number for e in buf.read_ready(None)] == [0, 1]
    assert [e.sequence_number for e in buf.read_ready(0, limit=5)] == [1]
    assert buf.read_ready(1) == ()
    with pytest.raises(InvalidRequest):
        buf.read_ready(-2)
    with trio.CancelScope() as scope:
        scope.cancel()
        await buf.read_batch(0)  # ready: still a cancel point
    assert scope.cancelled_caught
    with trio.move_on_after(0.01) as scope:
        await buf.read_batch(1)  # nothing: parks until cancelled
    assert scope.cancelled_caught

"""Per-turn event buffer: append-only, sequence-numbered, many readers.

Theory of operation
-------------------
The turn task is the buffer's only writer. It appends events; the buffer gives
each the next sequence number (0, 1, 2, …) so numbers are contiguous by
construction. Readers are independent cursors over the same list: each keeps
its own index and parks on a :class:`trio.lowlevel.ParkingLot` when it has
caught up, and every append wakes them all. A reader that is slow, cancelled
or abandoned therefore never blocks or affects the writer: the writer never
awaits anything here.

Two one-way switches:

* :meth:`EventBuffer.seal` is flipped the moment a cancel is accepted. From
  then on non-terminal appends are dropped, so the next event after those
  already appended is the terminal one.
* The terminal event closes the buffer. Readers drain what is left and stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, final

import attrs
import trio

from ._errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._events import Event

E = TypeVar("E", bound="Event")


@final
@attrs.define(eq=False)
class EventBuffer:
    """The append-only event log of one turn."""

    response_id: str
    _events: list[Event] = attrs.field(factory=list, init=False)
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _sealed: bool = attrs.field(default=False, init=False)
    _nudges: int = attrs.field(default=0, init=False)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "sealed" if self._sealed else "open"
        return f"<EventBuffer {self.response_id} {state} len={len(self._events)}>"

    def __len__(self) -> int:
        return len(self._events)

    @property
    def sealed(self) -> bool:
        """True once a cancel was accepted or the terminal event appended."""
        return self._sealed

    @property
    def closed(self) -> bool:
        """True once the terminal event is appended."""
        return bool(self._events) and self._events[-1].is_terminal

    @property
    def terminal(self) -> Event | None:
        """The terminal event, or None while the turn runs."""
        return self._events[-1] if self.closed else None

    def snapshot(self) -> tuple[Event, ...]:
        """Every event appended so far."""
        return tuple(self._events)

    def append(self, cls: type[E], **fields: Any) -> E | None:
        """Append a new ``cls`` event and wake every reader.

        Returns:
          The event, or None if it was dropped because the buffer is sealed
          and ``cls`` is not terminal.

        Raises:
          RuntimeError: on any append after the terminal event (a bug).
        """
        if self.closed:
            raise RuntimeError(f"{self!r}: append of {cls.type} after the terminal event")
        if self._sealed and not cls.is_terminal:
            return None
        event = cls(sequence_number=len(self._events), response_id=self.response_id, **fields)
        self._events.append(event)
        if cls.is_terminal:
            self._sealed = True
        self._lot.unpark_all()
        return event

    def seal(self) -> None:
        """Refuse every further non-terminal event. Idempotent."""
        self._sealed = True

    def events(self, after: int | None = None) -> AsyncIterator[Event]:
        """Iterate over the turn's events, then follow live until the terminal.

        Args:
          after: the last sequence number the caller has seen; iteration starts
            with ``after + 1``. ``None`` (or -1) replays from 0.

        Raises:
          InvalidRequest: if ``after`` is below -1.

        Cancellation: cancelling a reader ends only that reader.
        """
        start = 0 if after is None else after + 1
        if start < 0:
            raise InvalidRequest(f"after must be >= -1, not {after!r}")
        return _Reader(self, start)

    async def read_batch(
        self, after: int | None = None, *, limit: int | None = None
    ) -> tuple[Event, ...]:
        """Every event after ``after`` that is appended already (the first
        ``limit`` of them), waiting until there is at least one, or until
        :meth:`nudge`. Returns ``()`` when nudged, and once the buffer is
        closed and read to the end (check :attr:`closed` to tell them apart).

        For writers that coalesce (one socket write for many events) and send
        keep-alives when nudged: this wait needs no timeout scope of its own.

        Raises:
          InvalidRequest: if ``after`` is below -1.
        """
        start = 0 if after is None else after + 1
        if start < 0:
            raise InvalidRequest(f"after must be >= -1, not {after!r}")
        if start < len(self._events) or self.closed:
            await trio.lowlevel.checkpoint()
        else:
            # Parking is the checkpoint: no second trip through the scheduler
            # once woken (one per socket write, for every stream).
            nudges = self._nudges
            while start >= len(self._events) and not self.closed and nudges == self._nudges:
                await self._lot.park()
        return self.read_ready(after, limit=limit)

    def read_ready(
        self, after: int | None = None, *, limit: int | None = None
    ) -> tuple[Event, ...]:
        """What :meth:`read_batch` returns, without waiting or a checkpoint:
        the events after ``after`` appended already (maybe none). For a writer
        that has just passed a checkpoint of its own.
        """
        start = 0 if after is None else after + 1
        if start < 0:
            raise InvalidRequest(f"after must be >= -1, not {after!r}")
        end = None if limit is None else start + limit
        return tuple(self._events[start:end])

    def nudge(self) -> None:
        """Wake every :meth:`read_batch` waiter with what it has (maybe ``()``)."""
        self._nudges += 1
        self._lot.unpark_all()

    async def wait_closed(self) -> Event:
        """Wait for the terminal event and return it."""
        while (terminal := self.terminal) is None:
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return terminal


@final
class _Reader:
    """One reader's cursor. An async iterator, not an async generator, so an
    abandoned reader needs no finalization."""

    __slots__ = ("_buffer", "_next")

    def __init__(self, buffer: EventBuffer, start: int) -> None:
        self._buffer = buffer
        self._next = start

    def __aiter__(self) -> _Reader:
        return self

    async def __anext__(self) -> Event:
        buffer = self._buffer
        events = buffer._events
        if self._next < len(events):
            # Data is ready: still a full checkpoint, so a reader replaying a
            # long buffer can be cancelled and lets other tasks run.
            await trio.lowlevel.checkpoint()
        while self._next >= len(events):
            if buffer.closed:
                await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await buffer._lot.park()
        event = events[self._next]
        self._next += 1
        return event

"""Idempotency keys in the runtime: one turn per (account, key), 24 h, conflicts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from runtime import (
    IdempotencyConflict,
    IdempotencyKeys,
    InvalidRequest,
    MemoryStore,
    Replayed,
    Runtime,
    SessionBusy,
    Turn,
    UsageChunk,
    fingerprint,
)

if TYPE_CHECKING:
    from ..fakes import FakeModel


async def test_idempotency_same_key_same_turn(rt: Runtime) -> None:
    """A repeat of the same request gets the same turn; no second turn starts."""
    session = await rt.create_session()
    keys = IdempotencyKeys(MemoryStore())
    fp = fingerprint(session.id, "hi")
    first = await keys.run("a", "k", fp, lambda: session.send("hi"), rt.find_turn)
    assert isinstance(first, Turn)
    await first.wait_finished()
    again = await keys.run("a", "k", fp, lambda: session.send("hi"), rt.find_turn)
    assert again is first
    assert len(session.history()) == 1


async def test_idempotency_conflict_and_accounts(rt: Runtime) -> None:
    """Another body with the key is a conflict (422); another account may reuse it."""
    session = await rt.create_session()
    keys = IdempotencyKeys(MemoryStore())
    await keys.run("a", "k", fingerprint("x"), lambda: session.send("hi"), rt.find_turn)
    with pytest.raises(IdempotencyConflict) as info:
        await keys.run("a", "k", fingerprint("y"), lambda: session.send("hi"), rt.find_turn)
    assert info.value.status_hint == 422
    other = await rt.create_session()
    turn = await keys.run("b", "k", fingerprint("y"), lambda: other.send("hi"), rt.find_turn)
    assert isinstance(turn, Turn)


async def test_idempotency_evicted_turn_is_replayed(rt: Runtime) -> None:
    """Once the turn is no longer buffered, the key answers Replayed(response_id)."""
    session = await rt.create_session()
    keys = IdempotencyKeys(MemoryStore())
    turn = await keys.run("a", "k", "fp", lambda: session.send("hi"), rt.find_turn)
    assert isinstance(turn, Turn)
    result = await keys.run("a", "k", "fp", lambda: session.send("hi"), lambda rid: None)
    assert result == Replayed(turn.id)


async def test_idempotency_expired_key_starts_a_new_turn(rt: Runtime) -> None:
    """A key older than its ttl is forgotten: the same request starts a new turn."""
    session = await rt.create_session()
    keys = IdempotencyKeys(MemoryStore(), ttl=0.0)
    first = await keys.run("a", "k", "fp", lambda: session.send("hi"), rt.find_turn)
    assert isinstance(first, Turn)
    await first.wait_finished()
    second = await keys.run("a", "k", "fp", lambda: session.send("hi"), rt.find_turn)
    assert isinstance(second, Turn)
    assert second is not first
    keys.purge()


async def test_idempotency_concurrent_requests_start_one_turn(
    rt: Runtime, model: FakeModel
) -> None:
    """race: ten concurrent requests with one key start exactly one turn and all get it."""
    model.steps = [["block", UsageChunk(1, 1)]]
    session = await rt.create_session()
    keys = IdempotencyKeys(MemoryStore())
    got: list[Turn | Replayed] = []

    async def request() -> None:
        got.append(await keys.run("a", "k", "fp", lambda: session.send("hi"), rt.find_turn))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(request)
    assert len(got) == 10
    assert len({id(t) for t in got}) == 1
    model.gate.set()


async def test_idempotency_failed_start_releases_the_key(rt: Runtime, model: FakeModel) -> None:
    """A request whose start failed (409) leaves the key free for a retry."""
    model.steps = [["block", UsageChunk(1, 1)]]
    session = await rt.create_session()
    running = await session.send("first")
    keys = IdempotencyKeys(MemoryStore())
    with pytest.raises(SessionBusy):
        await keys.run("a", "k", "fp", lambda: session.send("hi"), rt.find_turn)
    model.gate.set()
    await running.wait_finished()
    model.steps = [[UsageChunk(1, 1)]]
    turn = await keys.run("a", "k", "fp", lambda: session.send("hi"), rt.find_turn)
    assert isinstance(turn, Turn)


@pytest.mark.parametrize("key", ["", "x" * 256])
async def test_idempotency_key_length(rt: Runtime, key: str) -> None:
    """Empty or over-long keys are InvalidRequest (400)."""
    keys = IdempotencyKeys(MemoryStore())
    with pytest.raises(InvalidRequest):
        await keys.run("a", key, "fp", lambda: rt.respond("hi"), rt.find_turn)


def test_idempotency_fingerprint_separates_parts() -> None:
    """Fingerprints are length-prefixed: ('ab', 'c') and ('a', 'bc') differ."""
    assert fingerprint("ab", "c") != fingerprint("a", "bc")
    assert fingerprint("a", b"b") == fingerprint("a", "b")

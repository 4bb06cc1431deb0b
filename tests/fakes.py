"""Test doubles: a scripted model whose every step the test controls, and a
store wrapper to interpose on."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import attrs
import trio

from runtime import ModelChunk, ModelRequest, TextChunk, UsageChunk

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from runtime import (
        Account,
        IdempotencyRecord,
        Recovered,
        SessionRecord,
        Store,
        TurnRecord,
        UsageRecord,
        UsageWindow,
    )


@final
@attrs.define(eq=False)
class FakeModel:
    """A model that streams a scripted list of steps.

    Each step is a list of chunks or markers: ``"block"`` waits on ``gate``,
    ``"shielded-block"`` does so inside a shielded scope (a cancel cannot land
    until the gate opens), ``"raise"`` raises ``RuntimeError``. Step
    ``k`` of the model is ``steps[min(k, len - 1)]``. Every chunk is preceded
    by a checkpoint. ``requests`` records what the model saw; ``closed``
    counts streams that were closed (normally or by cancellation).
    """

    steps: list[list[ModelChunk | str]] = attrs.field(
        factory=lambda: [[TextChunk("hello "), TextChunk("world"), UsageChunk(3, 2)]]
    )
    name: str = "fake"
    gate: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the model reaches a "block" marker.
    blocked: trio.Event = attrs.field(factory=trio.Event)
    requests: list[ModelRequest] = attrs.field(factory=list)
    closed: int = 0

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        step = self.steps[min(len(self.requests), len(self.steps) - 1)]
        self.requests.append(request)
        try:
            for chunk in step:
                if chunk == "block":
                    self.blocked.set()
                    await self.gate.wait()
                    continue
                if chunk == "shielded-block":
                    self.blocked.set()
                    with trio.CancelScope(shield=True):
                        await self.gate.wait()
                    continue
                if chunk == "raise":
                    raise RuntimeError("model exploded")
                await trio.lowlevel.checkpoint()
                assert not isinstance(chunk, str)
                yield chunk
        finally:
            self.closed += 1


@attrs.define(eq=False)
class DelegatingStore:
    """A :class:`runtime.Store` that passes every call to ``inner``; subclass
    it and override the calls to interpose on."""

    inner: Store

    async def authenticate(self, api_key: str) -> str:
        return await self.inner.authenticate(api_key)

    async def get_account(self, account_id: str) -> Account:
        return await self.inner.get_account(account_id)

    async def begin_turn(self, record: TurnRecord) -> None:
        await self.inner.begin_turn(record)

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        return await self.inner.complete_turn(usage, record)

    def end_turn(self, record: TurnRecord) -> None:
        self.inner.end_turn(record)

    async def get_turn(self, response_id: str) -> TurnRecord | None:
        return await self.inner.get_turn(response_id)

    async def usage_records(self, account_id: str, *, limit: int = 100) -> list[UsageRecord]:
        return await self.inner.usage_records(account_id, limit=limit)

    async def usage_windows(self, account_id: str) -> dict[str, tuple[UsageWindow, ...]]:
        return await self.inner.usage_windows(account_id)

    async def save_session(self, record: SessionRecord) -> None:
        await self.inner.save_session(record)

    async def delete_session(self, session_id: str) -> None:
        await self.inner.delete_session(session_id)

    async def recover(self) -> Recovered:
        return await self.inner.recover()

    async def get_idempotency_key(self, account_id: str, key: str) -> IdempotencyRecord | None:
        return await self.inner.get_idempotency_key(account_id, key)

    async def put_idempotency_key(self, record: IdempotencyRecord) -> None:
        await self.inner.put_idempotency_key(record)

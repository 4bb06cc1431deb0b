"""Test doubles: a scripted model whose every step the test controls."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import attrs
import trio

from runtime import ModelChunk, ModelRequest, TextChunk, UsageChunk

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator


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

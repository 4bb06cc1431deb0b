"""The stateless turn body: one model round trip, ``response.*`` events.

No agent loop and no built-in tools: client-defined function tools are given
to the model, and the calls it makes are returned as ``function_call`` output
items for the client to execute. Event names and payloads follow OpenAI's
Responses streaming API (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``/``.done``, ``response.content_part.done``,
``response.function_call_arguments.delta``/``.done``,
``response.output_item.done``, then ``response.completed`` |
``response.cancelled`` | ``response.failed``). Reasoning chunks are not
surfaced on this surface.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING, final

import attrs

from ._events import (
    FunctionCall,
    OutputItem,
    OutputMessage,
    ResponseCancelled,
    ResponseCompleted,
    ResponseContentPartAdded,
    ResponseContentPartDone,
    ResponseCreated,
    ResponseFailed,
    ResponseFunctionCallArgumentsDelta,
    ResponseFunctionCallArgumentsDone,
    ResponseInProgress,
    ResponseOptions,
    ResponseOutputItemAdded,
    ResponseOutputItemDone,
    ResponseOutputTextDelta,
    ResponseOutputTextDone,
    ResponseSnapshot,
    Usage,
)
from ._model import ModelRequest, TextChunk, ToolCallDelta, ToolCallStart, UsageChunk

if TYPE_CHECKING:
    from ._model import ChatMessage, Model, ToolSpec
    from ._turn import Turn


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@final
@attrs.define(eq=False, kw_only=True)
class ResponseRound:
    """The body of a stateless turn."""

    model: Model
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int | None = None
    options: ResponseOptions = attrs.field(factory=ResponseOptions)
    #: Output items so far; the last one may still be open.
    output: list[OutputItem] = attrs.field(factory=list, init=False)
    _open: bool = attrs.field(default=False, init=False)
    #: The open item's text or arguments so far, joined only when needed
    #: (appending to the item each delta would be quadratic).
    _parts: list[str] = attrs.field(factory=list, init=False)

    def snapshot(
        self,
        turn: Turn,
        status: str,
        *,
        usage: Usage | None = None,
        error: str | None = None,
        cancel_reason: str | None = None,
    ) -> ResponseSnapshot:
        """The response as it stands, for ``response.*`` events and lookups."""
        self._materialize()
        return ResponseSnapshot(
            id=turn.id,
            status=status,
            model=turn.model,
            created_at=turn.created_at,
            output=tuple(self.output),
            usage=usage,
            error=error,
            cancel_reason=cancel_reason,
            options=self.options,
        )

    def begin(self, turn: Turn) -> None:
        turn.buffer.append(ResponseCreated, response=self.snapshot(turn, "in_progress"))
        turn.buffer.append(ResponseInProgress, response=self.snapshot(turn, "in_progress"))

    async def run(self, turn: Turn) -> Usage:
        tool_choice = self.options.tool_choice
        request = ModelRequest(
            messages=self.messages,
            tools=() if tool_choice == "none" else self.tools,
            max_output_tokens=self.max_output_tokens,
            tool_choice=None if tool_choice == "none" else tool_choice,
        )
        usage = Usage()
        async with contextlib.aclosing(self.model.stream(request)) as stream:
            async for chunk in stream:
                if isinstance(chunk, TextChunk):
                    self._text(turn, chunk.text)
                elif isinstance(chunk, ToolCallStart):
                    self._close(turn)
                    item = FunctionCall(_item_id("fc"), chunk.call_id, chunk.name)
                    self._add(turn, item)
                elif isinstance(chunk, ToolCallDelta):
                    self._arguments(turn, chunk)
                elif isinstance(chunk, UsageChunk):
                    usage = Usage(chunk.input_tokens, chunk.output_tokens, chunk.estimated)
        self._close(turn)
        return usage

    def _add(self, turn: Turn, item: OutputItem) -> None:
        if turn.buffer.sealed:
            return
        self.output.append(item)
        self._open = True
        self._parts = []
        turn.buffer.append(ResponseOutputItemAdded, output_index=len(self.output) - 1, item=item)

    def _text(self, turn: Turn, text: str) -> None:
        last = self.output[-1] if self._open else None
        if not isinstance(last, OutputMessage):
            self._close(turn)
            self._add(turn, OutputMessage(_item_id("msg")))
            if not self._open:
                return
            last = self.output[-1]
            assert isinstance(last, OutputMessage)
            turn.buffer.append(
                ResponseContentPartAdded, item_id=last.id, output_index=len(self.output) - 1,
                content_index=0,
            )  # fmt: skip
        event = turn.buffer.append(
            ResponseOutputTextDelta, item_id=last.id, output_index=len(self.output) - 1,
            content_index=0, delta=text,
        )  # fmt: skip
        if event is not None:
            self._parts.append(text)
            turn._add_text(text)

    def _arguments(self, turn: Turn, chunk: ToolCallDelta) -> None:
        last = self.output[-1] if self._open else None
        if not isinstance(last, FunctionCall) or last.call_id != chunk.call_id:
            return
        event = turn.buffer.append(
            ResponseFunctionCallArgumentsDelta, item_id=last.id,
            output_index=len(self.output) - 1, delta=chunk.arguments,
        )  # fmt: skip
        if event is not None:
            self._parts.append(chunk.arguments)

    def _close(self, turn: Turn) -> None:
        """Finish the open output item, with its ``*.done`` events."""
        if not self._open or turn.buffer.sealed:
            return
        self._materialize()
        self._open = False
        index = len(self.output) - 1
        item = self.output[index]
        append = turn.buffer.append
        if isinstance(item, OutputMessage):
            append(ResponseOutputTextDone, item_id=item.id, output_index=index, content_index=0,
                   text=item.text)  # fmt: skip
            append(ResponseContentPartDone, item_id=item.id, output_index=index, content_index=0,
                   text=item.text)  # fmt: skip
        else:
            append(ResponseFunctionCallArgumentsDone, item_id=item.id, output_index=index,
                   name=item.name, arguments=item.arguments)  # fmt: skip
        item = attrs.evolve(item, status="completed")
        self.output[index] = item
        append(ResponseOutputItemDone, output_index=index, item=item)

    def _materialize(self) -> None:
        """Write the open item's parts into it."""
        if not self._open or not self._parts:
            return
        joined = "".join(self._parts)
        self._parts = [joined]
        item = self.output[-1]
        if isinstance(item, OutputMessage):
            self.output[-1] = attrs.evolve(item, text=joined)
        else:
            self.output[-1] = attrs.evolve(item, arguments=joined)

    @property
    def function_calls(self) -> list[FunctionCall]:
        return [item for item in self.output if isinstance(item, FunctionCall)]

    def completed(self, turn: Turn, usage: Usage) -> None:
        snapshot = self.snapshot(turn, "completed", usage=usage)
        turn.buffer.append(ResponseCompleted, response=snapshot)

    def cancelled(self, turn: Turn, reason: str) -> None:
        snapshot = self.snapshot(turn, "cancelled", cancel_reason=reason)
        turn.buffer.append(ResponseCancelled, response=snapshot, reason=reason)

    def failed(self, turn: Turn, error: str) -> None:
        snapshot = self.snapshot(turn, "failed", error=error)
        turn.buffer.append(ResponseFailed, response=snapshot)

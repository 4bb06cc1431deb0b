"""The session turn body: the agent loop and its ``message.*`` events.

model step -> tool calls -> tool results -> model step … at most
:data:`MAX_STEPS` steps. Text and reasoning become ``text.*`` / ``thinking.*``
blocks; each tool call becomes ``tool_use.start``, ``tool_use.input_delta``…,
``tool_use.executing``, ``tool_use.stop``, ``tool_result``.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any, Final, final

import attrs

from ._events import (
    MessageCancelled,
    MessageCompleted,
    MessageCreated,
    MessageError,
    TextDelta,
    TextStart,
    TextStop,
    ThinkingDelta,
    ThinkingStart,
    ThinkingStop,
    ToolResult,
    ToolUseExecuting,
    ToolUseInputDelta,
    ToolUseStart,
    ToolUseStop,
    Usage,
)
from ._model import (
    ChatMessage,
    ModelRequest,
    ReasoningChunk,
    TextChunk,
    ToolCallDelta,
    ToolCallRequest,
    ToolCallStart,
    UsageChunk,
)
from ._records import ToolCallRecord
from ._tools import BUILTIN_TOOLS

if TYPE_CHECKING:
    from ._events import Event
    from ._model import Model
    from ._tools import ToolBox
    from ._turn import Turn

#: Model round trips per turn; the loop ends after this many even if the model
#: still asks for tools.
MAX_STEPS: Final = 16

_BLOCKS: Final[dict[str, tuple[type[Event], type[Event]]]] = {
    "text": (TextStart, TextStop),
    "thinking": (ThinkingStart, ThinkingStop),
}


@final
@attrs.define(eq=False, kw_only=True)
class AgentLoop:
    """The body of a session turn."""

    model: Model
    toolbox: ToolBox
    #: The conversation before this turn (completed turns of the session).
    context: tuple[ChatMessage, ...]
    max_steps: int = MAX_STEPS
    _open_block: str | None = attrs.field(default=None, init=False)

    def begin(self, turn: Turn) -> None:
        assert turn.session_id is not None
        turn.buffer.append(MessageCreated, id=turn.id, session_id=turn.session_id)

    async def run(self, turn: Turn) -> Usage:
        messages = [*self.context, ChatMessage(role="user", content=turn.input)]
        usage = Usage()
        for _ in range(self.max_steps):
            text, calls, step_usage = await self._step(turn, messages)
            usage += step_usage
            if not calls:
                break
            messages.append(ChatMessage(role="assistant", content=text, tool_calls=tuple(calls)))
            for call in calls:
                messages.append(await self._execute(turn, call))
        return usage

    async def _step(
        self, turn: Turn, messages: list[ChatMessage]
    ) -> tuple[str, list[ToolCallRequest], Usage]:
        """One model round trip; returns its text, tool calls and usage."""
        request = ModelRequest(messages=tuple(messages), tools=BUILTIN_TOOLS)
        text: list[str] = []
        names: dict[str, str] = {}
        arguments: dict[str, list[str]] = {}
        usage = Usage()
        append = turn.buffer.append
        async with contextlib.aclosing(self.model.stream(request)) as stream:
            async for chunk in stream:
                if isinstance(chunk, TextChunk):
                    self._enter(turn, "text")
                    if append(TextDelta, content=chunk.text) is not None:
                        text.append(chunk.text)
                        turn._add_text(chunk.text)
                elif isinstance(chunk, ReasoningChunk):
                    self._enter(turn, "thinking")
                    append(ThinkingDelta, content=chunk.text)
                elif isinstance(chunk, ToolCallStart):
                    self._enter(turn, None)
                    names[chunk.call_id] = chunk.name
                    arguments[chunk.call_id] = []
                    append(ToolUseStart, name=chunk.name, id=chunk.call_id)
                elif isinstance(chunk, ToolCallDelta):
                    arguments[chunk.call_id].append(chunk.arguments)
                    append(ToolUseInputDelta, content=chunk.arguments)
                elif isinstance(chunk, UsageChunk):
                    usage = Usage(chunk.input_tokens, chunk.output_tokens, chunk.estimated)
        self._enter(turn, None)
        calls = [ToolCallRequest(cid, names[cid], "".join(arguments[cid])) for cid in names]
        return "".join(text), calls, usage

    def _enter(self, turn: Turn, block: str | None) -> None:
        """Close the open text/thinking block unless it is ``block``; open ``block``."""
        if self._open_block == block:
            return
        if self._open_block is not None:
            turn.buffer.append(_BLOCKS[self._open_block][1])
        if block is not None:
            turn.buffer.append(_BLOCKS[block][0])
        self._open_block = block

    async def _execute(self, turn: Turn, call: ToolCallRequest) -> ChatMessage:
        parsed: Any
        try:
            parsed = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = call.arguments
        turn.buffer.append(ToolUseExecuting, name=call.name, id=call.id, input=parsed)
        outcome = await self.toolbox.call(call.name, call.arguments)
        turn.buffer.append(ToolUseStop, id=call.id)
        turn.buffer.append(
            ToolResult, id=call.id, content=outcome.content, is_error=outcome.is_error
        )
        turn.tool_calls.append(
            ToolCallRecord(call.id, call.name, call.arguments, outcome.content, outcome.is_error)
        )
        return ChatMessage(role="tool", content=outcome.content, tool_call_id=call.id)

    def completed(self, turn: Turn, usage: Usage) -> None:
        turn.buffer.append(MessageCompleted, id=turn.id, usage=usage)

    def cancelled(self, turn: Turn, reason: str) -> None:
        turn.buffer.append(MessageCancelled, id=turn.id, reason=reason)

    def failed(self, turn: Turn, error: str) -> None:
        turn.buffer.append(MessageError, id=turn.id, error=error)

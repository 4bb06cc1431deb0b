"""Events: what a turn appends to its buffer and readers receive.

Every event is a frozen attrs object with a ``type`` (the wire name), its
``sequence_number`` (0, 1, 2, … per turn, contiguous) and the ``response_id``
of its turn, plus the payload fields of DESIGN.md. Session turns emit the
``message.*`` / ``text.*`` / ``thinking.*`` / ``tool_use.*`` family; stateless
turns (``Runtime.respond``) emit the ``response.*`` family named after OpenAI's
Responses streaming API. Each turn ends with exactly one terminal event
(``is_terminal``), always its last.

Domain objects only: turning them into JSON is the server's job.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import attrs

_count = [attrs.validators.instance_of(int), attrs.validators.ge(0)]


@attrs.frozen
class Usage:
    """Token counts of a turn (summed over its model steps)."""

    input_tokens: int = attrs.field(default=0, validator=_count)
    output_tokens: int = attrs.field(default=0, validator=_count)
    #: True when any part was estimated (the upstream sent no usage).
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.estimated or other.estimated,
        )


@attrs.frozen(kw_only=True)
class Event:
    """Base of all events; never instantiated itself."""

    type: ClassVar[str] = ""
    is_terminal: ClassVar[bool] = False

    sequence_number: int
    response_id: str


# --- session turns ---------------------------------------------------------


@attrs.frozen(kw_only=True)
class MessageCreated(Event):
    type = "message.created"
    id: str
    session_id: str
    status: str = "in_progress"


@attrs.frozen(kw_only=True)
class TextStart(Event):
    type = "text.start"


@attrs.frozen(kw_only=True)
class TextDelta(Event):
    type = "text.delta"
    content: str


@attrs.frozen(kw_only=True)
class TextStop(Event):
    type = "text.stop"


@attrs.frozen(kw_only=True)
class ThinkingStart(Event):
    type = "thinking.start"


@attrs.frozen(kw_only=True)
class ThinkingDelta(Event):
    type = "thinking.delta"
    content: str


@attrs.frozen(kw_only=True)
class ThinkingStop(Event):
    type = "thinking.stop"


@attrs.frozen(kw_only=True)
class ToolUseStart(Event):
    type = "tool_use.start"
    name: str
    id: str


@attrs.frozen(kw_only=True)
class ToolUseInputDelta(Event):
    type = "tool_use.input_delta"
    content: str


@attrs.frozen(kw_only=True)
class ToolUseExecuting(Event):
    type = "tool_use.executing"
    name: str
    id: str
    input: Any


@attrs.frozen(kw_only=True)
class ToolUseStop(Event):
    type = "tool_use.stop"
    #: Ours, beyond DESIGN.md's ``{}``: which tool call stopped.
    id: str


@attrs.frozen(kw_only=True)
class ToolResult(Event):
    type = "tool_result"
    id: str
    content: str
    is_error: bool


@attrs.frozen(kw_only=True)
class MessageCompleted(Event):
    type = "message.completed"
    is_terminal = True
    id: str
    usage: Usage
    status: str = "completed"


@attrs.frozen(kw_only=True)
class MessageCancelled(Event):
    type = "message.cancelled"
    is_terminal = True
    id: str
    reason: str
    status: str = "cancelled"


@attrs.frozen(kw_only=True)
class MessageError(Event):
    type = "message.error"
    is_terminal = True
    id: str
    error: str


# --- stateless turns (OpenAI Responses streaming names) ---------------------


@attrs.frozen
class OutputMessage:
    """An assistant message item of a stateless response."""

    id: str
    text: str = ""
    status: str = "in_progress"


@attrs.frozen
class FunctionCall:
    """A client-defined function call the model asked for."""

    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: str = "in_progress"


OutputItem = OutputMessage | FunctionCall


@attrs.frozen(kw_only=True)
class ResponseOptions:
    """What a stateless request asked for, echoed in its response object."""

    instructions: str | None = None
    tools: tuple[Any, ...] = ()  # ToolSpec; Any avoids an import cycle
    tool_choice: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class ResponseSnapshot:
    """The state of a stateless response at the time of an event."""

    id: str
    status: str
    model: str
    created_at: float
    output: tuple[OutputItem, ...] = ()
    usage: Usage | None = None
    error: str | None = None
    cancel_reason: str | None = None
    options: ResponseOptions = attrs.field(factory=ResponseOptions)

    @property
    def output_text(self) -> str:
        return "".join(item.text for item in self.output if isinstance(item, OutputMessage))


@attrs.frozen(kw_only=True)
class ResponseCreated(Event):
    type = "response.created"
    response: ResponseSnapshot


@attrs.frozen(kw_only=True)
class ResponseInProgress(Event):
    type = "response.in_progress"
    response: ResponseSnapshot


@attrs.frozen(kw_only=True)
class ResponseOutputItemAdded(Event):
    type = "response.output_item.added"
    output_index: int
    item: OutputItem


@attrs.frozen(kw_only=True)
class ResponseContentPartAdded(Event):
    type = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    text: str = ""


@attrs.frozen(kw_only=True)
class ResponseOutputTextDelta(Event):
    type = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str


@attrs.frozen(kw_only=True)
class ResponseOutputTextDone(Event):
    type = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str


@attrs.frozen(kw_only=True)
class ResponseContentPartDone(Event):
    type = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    text: str


@attrs.frozen(kw_only=True)
class ResponseFunctionCallArgumentsDelta(Event):
    type = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


@attrs.frozen(kw_only=True)
class ResponseFunctionCallArgumentsDone(Event):
    type = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class ResponseOutputItemDone(Event):
    type = "response.output_item.done"
    output_index: int
    item: OutputItem


@attrs.frozen(kw_only=True)
class ResponseCompleted(Event):
    type = "response.completed"
    is_terminal = True
    response: ResponseSnapshot


@attrs.frozen(kw_only=True)
class ResponseCancelled(Event):
    type = "response.cancelled"
    is_terminal = True
    response: ResponseSnapshot
    reason: str


@attrs.frozen(kw_only=True)
class ResponseFailed(Event):
    type = "response.failed"
    is_terminal = True
    response: ResponseSnapshot


def _all_event_classes() -> dict[str, type[Event]]:
    found: dict[str, type[Event]] = {}
    todo = list(Event.__subclasses__())
    while todo:
        cls = todo.pop()
        found[cls.type] = cls
        todo.extend(cls.__subclasses__())
    return found


#: Every event class by its wire name.
EVENT_TYPES: Final[dict[str, type[Event]]] = _all_event_classes()

"""The model protocol: one async streaming call.

A model takes a :class:`ModelRequest` (the conversation so far and the tools
it may call) and streams :data:`ModelChunk` objects: text and reasoning
deltas, tool calls (a start, then argument fragments), and at most one final
:class:`UsageChunk`. The turn calls it inside ``contextlib.aclosing`` so a
cancel closes the stream (and whatever connection it holds) at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator


@attrs.frozen
class ToolCallRequest:
    """A tool call as recorded in the conversation."""

    id: str
    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class ChatMessage:
    """One message of the conversation given to the model.

    ``role`` is ``"system"``, ``"user"``, ``"assistant"`` or ``"tool"``. An
    assistant message may carry ``tool_calls``; a tool message answers the
    call ``tool_call_id``.
    """

    role: str
    content: str = ""
    tool_calls: tuple[ToolCallRequest, ...] = ()
    tool_call_id: str | None = None


@attrs.frozen(kw_only=True)
class ToolSpec:
    """A function tool offered to the model (JSON-schema parameters)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = attrs.field(factory=lambda: {"type": "object", "properties": {}})


@attrs.frozen(kw_only=True)
class ModelRequest:
    """Everything one model step sees."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int | None = None
    #: ``"auto"`` (or None), ``"none"``, ``"required"``, or the name of the one
    #: function the model must call.
    tool_choice: str | None = None


@attrs.frozen
class TextChunk:
    """A piece of the answer's text."""

    text: str


@attrs.frozen
class ReasoningChunk:
    """A piece of the model's reasoning (``thinking.*`` events)."""

    text: str


@attrs.frozen
class ToolCallStart:
    """The model started a tool call."""

    call_id: str
    name: str


@attrs.frozen
class ToolCallDelta:
    """A fragment of a started call's JSON arguments."""

    call_id: str
    arguments: str


@attrs.frozen
class UsageChunk:
    """Token counts of this model step; sent once, last."""

    input_tokens: int
    output_tokens: int
    #: True when the upstream gave no counts and these are estimates.
    estimated: bool = False


ModelChunk = TextChunk | ReasoningChunk | ToolCallStart | ToolCallDelta | UsageChunk


@runtime_checkable
class Model(Protocol):
    """What the runtime needs of a model."""

    @property
    def name(self) -> str:
        """The model's name, as billed and shown in session records."""
        ...

    def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        """Stream one model step.

        Cancellation: the runtime closes the returned iterator (``aclose``)
        when the turn is cancelled; an implementation releases everything
        it holds there (e.g. closes its upstream HTTP stream).
        """
        ...

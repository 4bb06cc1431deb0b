"""Stateless turns (Runtime.respond): response.* events, function calls, cancel, billing."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from runtime import (
    CancelOutcome,
    ChatMessage,
    DemoModel,
    FunctionCall,
    InvalidRequest,
    MemoryStore,
    OutputMessage,
    ResponseCancelled,
    ResponseCompleted,
    ResponseCreated,
    ResponseFailed,
    Runtime,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
    TurnState,
    UsageChunk,
)

from ..helpers import collect, types

if TYPE_CHECKING:
    from ..fakes import FakeModel


async def test_respond_text_event_sequence(rt: Runtime, store: MemoryStore) -> None:
    """A text answer streams OpenAI's Responses event sequence and is billed once."""
    turn = await rt.respond("hi")
    assert turn.id.startswith("resp_")
    assert len(turn.id) == 5 + 32
    assert turn.session_id is None
    assert turn.is_stateless
    events = await collect(turn)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created = events[0]
    assert isinstance(created, ResponseCreated)
    assert created.response.id == turn.id
    assert created.response.status == "in_progress"
    done = events[-1]
    assert isinstance(done, ResponseCompleted)
    assert done.response.status == "completed"
    assert done.response.output_text == "hello world"
    [item] = done.response.output
    assert isinstance(item, OutputMessage)
    assert item.status == "completed"
    [record] = await store.usage_records("local")
    assert (record.response_id, record.session_id) == (turn.id, None)


async def test_respond_function_calls(rt: Runtime, model: FakeModel) -> None:
    """Client tool calls come back as function_call items with their streamed arguments."""
    model.steps = [
        [
            TextChunk("Let me check."),
            ToolCallStart("call_a", "get_weather"),
            ToolCallDelta("call_a", '{"city": '),
            ToolCallDelta("call_a", '"Paris"}'),
            UsageChunk(5, 4),
        ]
    ]
    tool = ToolSpec(name="get_weather", description="Weather by city")
    turn = await rt.respond("weather?", tools=[tool], instructions="be brief")
    events = await collect(turn)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-1]
    assert isinstance(done, ResponseCompleted)
    message, call = done.response.output
    assert isinstance(message, OutputMessage)
    assert message.text == "Let me check."
    assert isinstance(call, FunctionCall)
    assert (call.call_id, call.name, call.status) == ("call_a", "get_weather", "completed")
    assert json.loads(call.arguments) == {"city": "Paris"}
    [request] = model.requests
    assert request.tools == (tool,)
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "weather?"),
    ]


async def test_respond_cancel_mid_stream(rt: Runtime, model: FakeModel, store: MemoryStore) -> None:
    """A cancelled stateless turn ends response.cancelled with its reason, unbilled."""
    model.steps = [[TextChunk("a"), "block", TextChunk("b"), UsageChunk(1, 2)]]
    turn = await rt.respond("hi")
    await model.blocked.wait()
    assert await turn.cancel() is CancelOutcome.CANCELLING
    events = await collect(turn)
    terminal = events[-1]
    assert isinstance(terminal, ResponseCancelled)
    assert terminal.reason == "client_cancel"
    assert terminal.response.status == "cancelled"
    assert types(events).count("response.output_text.delta") == 1
    assert turn.state is TurnState.CANCELLED
    assert await store.usage_records("local") == []
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE


async def test_respond_failure(rt: Runtime, model: FakeModel, store: MemoryStore) -> None:
    """A model failure ends response.failed carrying the error, unbilled."""
    model.steps = [["raise"]]
    turn = await rt.respond("hi")
    terminal = (await collect(turn))[-1]
    assert isinstance(terminal, ResponseFailed)
    assert terminal.response.error is not None
    assert terminal.response.error == "internal_error (RuntimeError); see the server log"
    assert await store.usage_records("local") == []


async def test_respond_accepts_messages(rt: Runtime, model: FakeModel) -> None:
    """input may be a list of ChatMessage; the model sees them in order."""
    msgs = [ChatMessage(role="user", content="one"), ChatMessage(role="assistant", content="two")]
    await (await rt.respond(msgs)).wait_finished()
    assert [m.content for m in model.requests[0].messages] == ["one", "two"]


@pytest.mark.parametrize("bad", ["", "  ", []])
async def test_respond_rejects_empty_input(rt: Runtime, bad: str | list[ChatMessage]) -> None:
    """Empty input is InvalidRequest."""
    with pytest.raises(InvalidRequest):
        await rt.respond(bad)


async def test_respond_demo_model_call_lines(tmp_path: object) -> None:
    """With the demo model, 'call NAME: {json}' lines become function_call items."""
    async with Runtime.open(data_dir=str(tmp_path), model=DemoModel(tokens_per_second=None)) as rt:
        turn = await rt.respond(
            'call get_weather: {"city": "Paris"}', tools=[ToolSpec(name="get_weather")]
        )
        terminal = await turn.wait_finished()
    assert isinstance(terminal, ResponseCompleted)
    calls = [i for i in terminal.response.output if isinstance(i, FunctionCall)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]

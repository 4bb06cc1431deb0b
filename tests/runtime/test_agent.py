"""The agent loop: event blocks, tool execution in the workspace, the step cap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from runtime import (
    MessageCompleted,
    ModelChunk,
    ReasoningChunk,
    Runtime,
    TextChunk,
    ToolCallDelta,
    ToolCallRecord,
    ToolCallStart,
    ToolResult,
    ToolUseExecuting,
    Usage,
    UsageChunk,
)
from runtime._agent import MAX_STEPS

from ..helpers import collect, types

if TYPE_CHECKING:
    from ..fakes import FakeModel


def write_call(call_id: str, path: str, content: str) -> list[ModelChunk]:
    args = executing_args(path, content)
    return [ToolCallStart(call_id, "write_file"), ToolCallDelta(call_id, args)]


async def test_agent_reasoning_and_text_blocks(rt: Runtime, model: FakeModel) -> None:
    """Reasoning and text chunks become thinking.* and text.* blocks, each closed in turn."""
    model.steps = [
        [ReasoningChunk("hmm"), ReasoningChunk("..."), TextChunk("answer"), UsageChunk(1, 3)]
    ]
    session = await rt.create_session()
    events = await collect(await session.send("q"))
    assert types(events) == [
        "message.created",
        "thinking.start",
        "thinking.delta",
        "thinking.delta",
        "thinking.stop",
        "text.start",
        "text.delta",
        "text.stop",
        "message.completed",
    ]


async def test_agent_tool_call_runs_in_workspace(rt: Runtime, model: FakeModel) -> None:
    """A write_file call writes into the session's workspace; the model then sees the result."""
    model.steps = [
        [TextChunk("Writing."), *write_call("c1", "notes/a.txt", "hello"), UsageChunk(4, 2)],
        [TextChunk("Done."), UsageChunk(10, 1)],
    ]
    session = await rt.create_session()
    turn = await session.send("write it")
    events = await collect(turn)
    assert types(events) == [
        "message.created",
        "text.start",
        "text.delta",
        "text.stop",
        "tool_use.start",
        "tool_use.input_delta",
        "tool_use.executing",
        "tool_use.stop",
        "tool_result",
        "text.start",
        "text.delta",
        "text.stop",
        "message.completed",
    ]
    executing = events[6]
    assert isinstance(executing, ToolUseExecuting)
    assert executing.input == {"path": "notes/a.txt", "content": "hello"}
    result = events[8]
    assert isinstance(result, ToolResult)
    assert (result.id, result.is_error) == ("c1", False)
    assert (Path(session.workspace.root) / "notes" / "a.txt").read_text() == "hello"
    assert turn.tool_calls == [
        ToolCallRecord(
            "c1", "write_file", executing_args("notes/a.txt", "hello"), result.content, False
        )
    ]
    # Usage is summed over the steps.
    terminal = events[-1]
    assert isinstance(terminal, MessageCompleted)
    assert terminal.usage == Usage(14, 3)
    # The second step saw the call and its result.
    second = model.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "tool"]
    assert second[1].tool_calls[0].name == "write_file"
    assert second[2].tool_call_id == "c1"
    assert turn.output_text == "Writing.Done."


def executing_args(path: str, content: str) -> str:
    return json.dumps({"path": path, "content": content})


async def test_agent_bad_tool_arguments_are_a_tool_error(rt: Runtime, model: FakeModel) -> None:
    """Arguments that are not JSON give an is_error tool result; the turn completes."""
    model.steps = [
        [ToolCallStart("c1", "write_file"), ToolCallDelta("c1", "{not json"), UsageChunk(1, 1)],
        [TextChunk("sorry"), UsageChunk(1, 1)],
    ]
    session = await rt.create_session()
    events = await collect(await session.send("x"))
    [result] = [e for e in events if isinstance(e, ToolResult)]
    assert result.is_error
    assert "JSON" in result.content
    [executing] = [e for e in events if isinstance(e, ToolUseExecuting)]
    assert executing.input == "{not json"
    assert types(events)[-1] == "message.completed"


async def test_agent_stops_after_max_steps(rt: Runtime, model: FakeModel) -> None:
    """A model that always calls a tool is cut off after MAX_STEPS model round trips."""
    model.steps = [[*write_call("c", "loop.txt", "again"), UsageChunk(1, 1)]]
    session = await rt.create_session()
    events = await collect(await session.send("loop"))
    assert len(model.requests) == MAX_STEPS == 16
    assert types(events).count("tool_result") == MAX_STEPS
    terminal = events[-1]
    assert isinstance(terminal, MessageCompleted)
    assert terminal.usage == Usage(MAX_STEPS, MAX_STEPS)

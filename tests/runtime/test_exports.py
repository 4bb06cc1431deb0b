"""The public API of ``runtime`` is pinned."""

from __future__ import annotations

import runtime

EXPECTED = {
    "BUILTIN_TOOLS", "DEFAULT_ACCOUNT", "EVENT_TYPES", "SANDBOX_ROOT", "Account",
    "AgentRuntimeError",
    "IdempotencyConflict", "IdempotencyKeys", "Replayed", "Unauthorized",
    "OpenAIModel", "UpstreamError", "ResponseOptions",
    "UsageReport", "UsageWindow", "fingerprint", "usage_report",
    "CancelOutcome", "ChatMessage", "CreditMode", "DemoModel", "Event",
    "FileInfo", "FunctionCall", "InvalidRequest", "InvalidTransition", "MemoryStore",
    "MessageCancelled", "MessageCompleted", "MessageCreated", "MessageError", "Model",
    "ModelChunk", "ModelRequest", "NotFound", "OutOfCredits", "OutputMessage",
    "PathOutsideWorkspace", "Pricing", "ReasoningChunk", "ResponseCancelled",
    "ResponseCompleted", "ResponseContentPartAdded", "ResponseContentPartDone",
    "ResponseCreated", "ResponseFailed", "ResponseFunctionCallArgumentsDelta",
    "ResponseFunctionCallArgumentsDone", "ResponseInProgress", "ResponseOutputItemAdded",
    "ResponseOutputItemDone", "ResponseOutputTextDelta", "ResponseOutputTextDone",
    "ResponseSnapshot", "Runtime", "RuntimeStatistics", "Sandbox", "SandboxMode", "Session",
    "SessionBusy", "SessionClosed", "ShuttingDown", "StorageFull", "Store", "TextChunk",
    "TextDelta", "TextStart", "TextStop",
    "ThinkingDelta", "ThinkingStart", "ThinkingStop", "ToolCallDelta", "ToolCallRecord",
    "ToolCallRequest", "ToolCallStart", "ToolLimits", "ToolResult", "ToolSpec", "ToolUseExecuting",
    "ToolUseInputDelta", "ToolUseStart", "ToolUseStop", "Turn", "TurnState", "Usage",
    "UsageChunk", "UsageRecord", "Workspace",
    "IdempotencyRecord", "RateLimited", "Recovered", "SQLiteStore", "SessionRecord",
    "StoreError", "TurnRecord", "WindowLimit",
}  # fmt: skip


def test_exports_all_is_pinned() -> None:
    """__all__ is exactly the pinned public surface, and every name resolves."""
    assert set(runtime.__all__) == EXPECTED
    assert len(runtime.__all__) == len(EXPECTED)
    for name in runtime.__all__:
        assert getattr(runtime, name) is not None


def test_exports_no_private_leaks() -> None:
    """Public names do not start with an underscore; private modules are not re-exported."""
    public = {name for name in dir(runtime) if not name.startswith("_")}
    assert public == EXPECTED


def test_exports_event_types_cover_design() -> None:
    """Every session event name of DESIGN.md has a class, and terminals are flagged."""
    session_types = {
        "message.created", "text.start", "text.delta", "text.stop", "thinking.start",
        "thinking.delta", "thinking.stop", "tool_use.start", "tool_use.input_delta",
        "tool_use.executing", "tool_use.stop", "tool_result", "message.completed",
        "message.cancelled", "message.error",
    }  # fmt: skip
    assert session_types <= set(runtime.EVENT_TYPES)
    terminals = {name for name, cls in runtime.EVENT_TYPES.items() if cls.is_terminal}
    assert terminals == {
        "message.completed", "message.cancelled", "message.error",
        "response.completed", "response.cancelled", "response.failed",
    }  # fmt: skip


def test_exports_errors_carry_http_hints() -> None:
    """Every error class has an error_type and a status hint for the HTTP layer."""
    hints = {
        runtime.InvalidRequest: 400, runtime.PathOutsideWorkspace: 403, runtime.NotFound: 404,
        runtime.SessionBusy: 409, runtime.OutOfCredits: 402, runtime.ShuttingDown: 503,
    }  # fmt: skip
    for cls, status in hints.items():
        assert issubclass(cls, runtime.AgentRuntimeError)
        assert cls.status_hint == status
        assert cls.error_type

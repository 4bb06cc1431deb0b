"""``/v1/responses`` on the wire: OpenAI's Responses API shapes.

Parses a Responses request (``input`` string or item array, ``instructions``,
flat function ``tools``, ``tool_choice``, ``max_output_tokens``, ``stream``,
``metadata``) into runtime values, and renders Response objects and
``response.*`` stream events the way OpenAI's API and its SDK expect them.
Unknown fields are ignored; wrong types are 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import attrs

from runtime import (
    ChatMessage,
    Event,
    FunctionCall,
    InvalidRequest,
    OutputMessage,
    ResponseSnapshot,
    ToolCallRequest,
    ToolSpec,
    Usage,
)

MAX_TOOLS: Final = 128
MAX_TOOL_NAME: Final = 64
MAX_TOOL_DESCRIPTION: Final = 16 * 1024
_TOOL_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_ROLES: Final = {
    "user": "user",
    "system": "system",
    "developer": "system",
    "assistant": "assistant",
}


@attrs.frozen(kw_only=True)
class ResponsesRequest:
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...]
    tool_choice: str | None
    instructions: str | None
    max_output_tokens: int | None
    stream: bool
    metadata: dict[str, str]
    model: str | None


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        names = " or ".join(k.__name__ for k in _tuple(kind))
        raise InvalidRequest(f"{where} must be {names}, not {value!r:.80}")
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(_expect(content, list, where)):
        part = _expect(part, dict, f"{where}[{i}]")
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise InvalidRequest(
                f"{where}[{i}].type must be 'input_text' or 'output_text', "
                f"not {part.get('type')!r:.40}"
            )
        parts.append(_expect(part.get("text"), str, f"{where}[{i}].text"))
    return "".join(parts)


def parse_input(value: Any) -> tuple[ChatMessage, ...]:
    """``input``: a string, or Responses input items (messages, ``function_call``
    and ``function_call_output``)."""
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRequest("input must not be empty")
        return (ChatMessage(role="user", content=value),)
    items = _expect(value, list, "input")
    if not items:
        raise InvalidRequest("input must not be empty")
    messages: list[ChatMessage] = []
    for i, item in enumerate(items):
        item = _expect(item, dict, f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(str(item.get("role")))
            if role is None:
                raise InvalidRequest(
                    f"input[{i}].role must be user, system, developer or assistant, "
                    f"not {item.get('role')!r:.40}"
                )
            content = _text_content(item.get("content"), f"input[{i}].content")
            messages.append(ChatMessage(role=role, content=content))
        elif kind == "function_call":
            call = ToolCallRequest(
                id=_expect(item.get("call_id"), str, f"input[{i}].call_id"),
                name=_expect(item.get("name"), str, f"input[{i}].name"),
                arguments=_expect(item.get("arguments", ""), str, f"input[{i}].arguments"),
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                messages[-1] = attrs.evolve(last, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=(call,)))
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output) if output is not None else ""
            messages.append(
                ChatMessage(
                    role="tool",
                    content=output,
                    tool_call_id=_expect(item.get("call_id"), str, f"input[{i}].call_id"),
                )
            )
        else:
            raise InvalidRequest(f"input[{i}].type {kind!r:.40} is not supported")
    return tuple(messages)


def parse_tools(value: Any) -> tuple[ToolSpec, ...]:
    """Flat function tools: ``{"type": "function", "name", "description", "parameters"}``."""
    if value is None:
        return ()
    tools = _expect(value, list, "tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools, not {len(tools)}")
    specs = []
    for i, tool in enumerate(tools):
        tool = _expect(tool, dict, f"tools[{i}]")
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"tools[{i}].type must be 'function', not {tool.get('type')!r:.40}"
            )
        name = _expect(tool.get("name"), str, f"tools[{i}].name")
        if not _TOOL_NAME_RE.match(name) or len(name) > MAX_TOOL_NAME:
            raise InvalidRequest(
                f"tools[{i}].name must be 1-{MAX_TOOL_NAME} letters, digits, _ or -: {name!r:.80}"
            )
        description = _expect(tool.get("description") or "", str, f"tools[{i}].description")
        if len(description) > MAX_TOOL_DESCRIPTION:
            raise InvalidRequest(
                f"tools[{i}].description is over {MAX_TOOL_DESCRIPTION} characters"
            )
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        _expect(parameters, dict, f"tools[{i}].parameters")
        specs.append(ToolSpec(name=name, description=description, parameters=parameters))
    return tuple(specs)


def parse_tool_choice(value: Any, tools: tuple[ToolSpec, ...]) -> str | None:
    if value is None:
        return None
    if value in ("auto", "none", "required"):
        return str(value)
    choice = _expect(value, dict, "tool_choice")
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        if choice["name"] not in {t.name for t in tools}:
            raise InvalidRequest(f"tool_choice names {choice['name']!r:.64}, which is not in tools")
        return str(choice["name"])
    raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or a function")


def parse_request(body: dict[str, Any]) -> ResponsesRequest:
    if "input" not in body:
        raise InvalidRequest("'input' (a string or a list of input items) is required")
    tools = parse_tools(body.get("tools"))
    max_output_tokens = body.get("max_output_tokens")
    if max_output_tokens is not None:
        _expect(max_output_tokens, int, "max_output_tokens")
        if max_output_tokens < 1:
            raise InvalidRequest("max_output_tokens must be >= 1")
    metadata = body.get("metadata") or {}
    _expect(metadata, dict, "metadata")
    for key, value in metadata.items():
        _expect(value, str, f"metadata[{key!r:.40}]")
    instructions = body.get("instructions")
    if instructions is not None:
        _expect(instructions, str, "instructions")
    model = body.get("model")
    if model is not None:
        _expect(model, str, "model")
    return ResponsesRequest(
        messages=parse_input(body["input"]),
        tools=tools,
        tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
        instructions=instructions,
        max_output_tokens=max_output_tokens,
        stream=bool(_expect(body.get("stream", False), bool, "stream")),
        metadata=dict(metadata),
        model=model,
    )


# -- rendering ----------------------------------------------------------------


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def output_item(item: OutputMessage | FunctionCall) -> dict[str, Any]:
    if isinstance(item, OutputMessage):
        content = []
        if item.text or item.status == "completed":
            content = [{"type": "output_text", "text": item.text, "annotations": []}]
        return {
            "type": "message",
            "id": item.id,
            "status": item.status,
            "role": "assistant",
            "content": content,
        }
    return {
        "type": "function_call",
        "id": item.id,
        "call_id": item.call_id,
        "name": item.name,
        "arguments": item.arguments,
        "status": item.status,
    }


def response_object(snapshot: ResponseSnapshot) -> dict[str, Any]:
    """A Response object as OpenAI's API returns it (plus ``cancel_reason``, ours)."""
    options = snapshot.options
    tool_choice: Any = options.tool_choice or "auto"
    if tool_choice not in ("auto", "none", "required"):
        tool_choice = {"type": "function", "name": tool_choice}
    body: dict[str, Any] = {
        "id": snapshot.id,
        "object": "response",
        "created_at": snapshot.created_at,
        "status": snapshot.status,
        "error": None
        if snapshot.error is None
        else {"code": "server_error", "message": snapshot.error},
        "incomplete_details": None,
        "instructions": options.instructions,
        "max_output_tokens": options.max_output_tokens,
        "model": snapshot.model,
        "output": [output_item(item) for item in snapshot.output],
        "output_text": snapshot.output_text,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "temperature": None,
        "text": {"format": {"type": "text"}},
        "tool_choice": tool_choice,
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
                "strict": False,
            }
            for tool in options.tools
        ],
        "top_p": None,
        "truncation": "disabled",
        "usage": _usage(snapshot.usage),
        "user": None,
        "metadata": options.metadata,
    }
    if snapshot.cancel_reason is not None:
        body["cancel_reason"] = snapshot.cancel_reason
    return body


def response_event(event: Event) -> dict[str, Any]:
    """The ``data`` of a ``response.*`` event, in OpenAI's streaming shape."""
    data: dict[str, Any] = {
        "type": event.type,
        "sequence_number": event.sequence_number,
        "response_id": event.response_id,
    }
    fields = {f.name: getattr(event, f.name) for f in attrs.fields(type(event))}
    fields.pop("sequence_number")
    fields.pop("response_id")
    for name, value in fields.items():
        if name == "response":
            data["response"] = response_object(value)
        elif name == "item":
            data["item"] = output_item(value)
        elif name == "text" and event.type.startswith("response.content_part."):
            data["part"] = {"type": "output_text", "text": value, "annotations": []}
        else:
            data[name] = value
    if event.type in ("response.output_text.delta", "response.output_text.done"):
        data["logprobs"] = []
    if event.type == "response.created":
        data["id"] = event.response_id  # the rid on the first event's data.id
    return data

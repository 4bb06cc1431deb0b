"""JSON at the edge: runtime objects to wire dicts, and SSE frames.

The runtime never sees a dict; this module is where its attrs objects become
the JSON of DESIGN.md (and OpenAI's Responses shapes for ``response.*``).
"""

from __future__ import annotations

import json
import re
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any, Final

import attrs
import cattrs
from quart import Response

from runtime import (
    AgentRuntimeError,
    Event,
    ResponseFunctionCallArgumentsDelta,
    ResponseOutputTextDelta,
    Session,
    TextDelta,
    Turn,
    Usage,
)

from ._openai_wire import response_event

if TYPE_CHECKING:
    from collections.abc import Callable

    from runtime import TurnRecord
    from runtime._usage import UsageReport, UsageWindow

converter: Final = cattrs.Converter()

#: Characters written as ``\uXXXX`` escapes although JSON may carry them raw:
#: U+0085, U+2028 and U+2029, on which ``str.splitlines`` (so httpx's
#: ``aiter_lines`` and clients built on it) and pre-2019 JavaScript break a
#: line, which would cut an SSE ``data:`` line in two; and lone surrogates
#: (from a broken upstream), which UTF-8 cannot encode at all. JSON's own
#: escaping already covers every character below U+0020 (CR, LF, NUL, ESC,
#: VT, FF, FS, GS, RS). All JSON syntax is ASCII, so each of these can only
#: be inside a string, where its escape means the same character.
_ESCAPED: Final = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def dumps(body: Any, *, compact: bool = True, allow_nan: bool = True) -> str:
    """``body`` as JSON whose text holds no line separator any common line
    splitter honours, and encodes to UTF-8 whatever its strings hold."""
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(body, separators=separators, ensure_ascii=False, allow_nan=allow_nan)
    if text.isascii():  # the common case, O(1) in CPython
        return text
    return _ESCAPED.sub(_escape, text)


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    body: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.estimated:
        body["estimated"] = True
    return body


converter.register_unstructure_hook(Usage, usage_json)


def event_json(event: Event) -> dict[str, Any]:
    """The ``data`` of an event: its type, sequence number, response id and payload."""
    if event.type.startswith("response."):
        return response_event(event)  # OpenAI's Responses shapes
    data: dict[str, Any] = {"type": event.type}
    for field in attrs.fields(type(event)):
        data[field.name] = converter.unstructure(getattr(event, field.name))
    return data


def sse_frame(event: Event) -> bytes:
    """One SSE frame: ``id: N``, ``event: TYPE``, ``data: JSON``, blank line.

    The data is one line whatever the event's text holds (see :func:`dumps`):
    SSE decoders split lines on CR, LF and CRLF, naive ones also on U+0085,
    U+2028 and U+2029, and none of them occurs raw in it. The frame is encoded
    whole, so a write never ends inside a UTF-8 sequence (TCP still may: the
    clients' incremental decoders handle that).

    Deltas, nearly every event of a stream, take a fast path that writes the
    same bytes as :func:`_general_frame` (a test holds them equal) in a
    fifth of the time: one C string escape instead of a dict and a
    ``json.dumps``.
    """
    fast = _FAST_FRAMES.get(type(event))
    if fast is not None:
        return fast(event)
    return _general_frame(event)


def _general_frame(event: Event) -> bytes:
    data = dumps(event_json(event))
    return f"id: {event.sequence_number}\nevent: {event.type}\ndata: {data}\n\n".encode()


def _string(text: str) -> str:
    """``text`` as a JSON string, escaped as :func:`dumps` escapes it."""
    quoted: str = encode_basestring(text)
    return quoted if quoted.isascii() else _ESCAPED.sub(_escape, quoted)


def _head(event: Event) -> str:
    n = event.sequence_number
    return (
        f'id: {n}\nevent: {event.type}\ndata: {{"type":"{event.type}",'
        f'"sequence_number":{n},"response_id":{_string(event.response_id)},'
    )


def _text_delta(event: TextDelta) -> bytes:
    return f'{_head(event)}"content":{_string(event.content)}}}\n\n'.encode()


def _output_text_delta(event: ResponseOutputTextDelta) -> bytes:
    return (
        f'{_head(event)}"item_id":{_string(event.item_id)},"output_index":{event.output_index},'
        f'"content_index":{event.content_index},"delta":{_string(event.delta)},'
        f'"logprobs":[]}}\n\n'
    ).encode()


def _arguments_delta(event: ResponseFunctionCallArgumentsDelta) -> bytes:
    return (
        f'{_head(event)}"item_id":{_string(event.item_id)},"output_index":{event.output_index},'
        f'"delta":{_string(event.delta)}}}\n\n'
    ).encode()


_FAST_FRAMES: Final[dict[type[Event], Callable[[Any], bytes]]] = {
    TextDelta: _text_delta,
    ResponseOutputTextDelta: _output_text_delta,
    ResponseFunctionCallArgumentsDelta: _arguments_delta,
}


def session_json(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "created_at": session.created_at,
        "last_activity": session.last_activity,
        "busy": session.busy,
        "persistent": session.persistent,
        "ttl": session.ttl,
        "status": session.status,
        "metadata": session.metadata,
        "model": session.model,
        "active_response_id": session.active_response_id,
    }


def entry_json(entry: TurnRecord) -> dict[str, Any]:
    """A history item of ``GET /v1/sessions/{id}/messages``."""
    body: dict[str, Any] = {
        "id": entry.id,
        "status": entry.status,
        "input": entry.input,
        "output_text": entry.output_text,
        "tool_calls": [converter.unstructure(call) for call in entry.tool_calls],
        "usage": usage_json(entry.usage),
        "created_at": entry.created_at,
    }
    if entry.cancel_reason is not None:
        body["cancel_reason"] = entry.cancel_reason
    if entry.error is not None:
        body["error"] = entry.error
    return body


def turn_json(record: TurnRecord, turn: Turn | None = None) -> dict[str, Any]:
    """A response object (ours): the history item plus where the turn stands.

    ``last_sequence_number`` is there while the turn's events are buffered
    (``turn`` given), and ``null`` once only its record is left.
    """
    return {
        **entry_json(record),
        "object": "response" if record.session_id is None else "message",
        "session_id": record.session_id,
        "model": record.model,
        "last_sequence_number": None if turn is None else len(turn.buffer) - 1,
    }


def window_json(window: UsageWindow) -> dict[str, Any]:
    return converter.unstructure(window)  # type: ignore[no-any-return]


def usage_report_json(report: UsageReport) -> dict[str, Any]:
    account = report.account
    return {
        "rate_limit": {
            "caller_id": account.id,
            "buckets": {
                name: {"windows": [window_json(w) for w in windows]}
                for name, windows in report.buckets.items()
            },
        },
        "credits": {"enabled": True, "mode": account.mode.value, "balance": account.balance},
        "records": [
            {
                "response_id": r.response_id,
                "session_id": r.session_id,
                "model": r.model,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "credits": r.credits,
                "created_at": r.created_at,
                "estimated": r.estimated,
            }
            for r in report.records
        ],
    }


def error_json(exc: AgentRuntimeError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": exc.error_type, "message": str(exc)}
    response_id = getattr(exc, "response_id", None)
    if response_id is not None:
        body["response_id"] = response_id
    return body


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response (lists stay bare arrays)."""
    return Response(
        dumps(body, compact=False, allow_nan=False),
        status,
        {"Content-Type": "application/json"},
    )

"""Turns over HTTP: streaming, SSE framing, cancel, resume, idempotency, billing.

Every test runs a real server on a loopback socket (the ``harness`` fixture),
so the real clock is used and each test is guarded by ``trio.fail_after``.
Interleavings are pinned with the fake model's ``blocked`` event and by
reading events or headers, never by sleeping.
"""

from __future__ import annotations

import codecs
import json
import re
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from runtime import ModelChunk, TextChunk, UsageChunk

from .conftest import KEY, OTHER_KEY, SSE, Harness, open_harness, parse_sse

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from ..fakes import FakeModel

TIMEOUT: Final = 10
RID_RE: Final = re.compile(r"msg_[0-9a-f]{32}")
RESP_RE: Final = re.compile(r"resp_[0-9a-f]{32}")
FRAME: Final = r"id: (\d+)\nevent: ([a-z_.]+)\ndata: (\{[^\n]*\})\n\n"
SESSION_TERMINALS: Final = frozenset({"message.completed", "message.cancelled", "message.error"})
RESPONSE_TERMINALS: Final = frozenset(
    {"response.completed", "response.cancelled", "response.failed"}
)
#: The default fake model's turn: "hello " + "world", 3 input and 2 output tokens.
DEFAULT_TYPES: Final = [
    "message.created",
    "text.start",
    "text.delta",
    "text.delta",
    "text.stop",
    "message.completed",
]
#: Credits of the default turn at the harness's prices (1/input, 2/output token).
DEFAULT_COST: Final = 3 * 1 + 2 * 2
START_BALANCE: Final = 1000.0


# -- helpers ------------------------------------------------------------------


class SSEStream:
    """Reads an open ``text/event-stream`` body incrementally.

    ``raw`` is everything received so far, ``events`` every complete event
    parsed so far; ``next_event`` hands them out in order, reading more as
    needed. ``receive`` returns the next piece of text, or None at the end.
    """

    def __init__(self, receive: Callable[[], Awaitable[str | None]]) -> None:
        self.raw = ""
        self.events: list[SSE] = []
        self._receive = receive
        self._pending = ""
        self._next = 0

    @classmethod
    def of(cls, response: httpx.Response) -> SSEStream:
        """Read an httpx streamed response.

        Only for streams read to their end: after a partial read httpx's
        nested async generators cannot all be closed, and trio's warning when
        they are collected is an error here. Use :func:`open_raw` to drop a
        connection mid-stream.
        """
        chunks = response.aiter_text()

        async def receive() -> str | None:
            return await anext(chunks, None)

        return cls(receive)

    @property
    def seen(self) -> list[SSE]:
        """The events handed out so far."""
        return self.events[: self._next]

    async def _more(self) -> bool:
        chunk = await self._receive()
        if chunk is None:
            return False
        self.raw += chunk
        self._pending += chunk
        while "\n\n" in self._pending:
            block, self._pending = self._pending.split("\n\n", 1)
            self.events.extend(parse_sse(block + "\n\n"))
        return True

    async def next_event(self) -> SSE:
        """The next event; fails if the stream ends first."""
        while self._next >= len(self.events):
            if not await self._more():
                raise AssertionError(f"stream ended; received {self.raw!r}")
        event = self.events[self._next]
        self._next += 1
        return event

    async def until(self, event_type: str) -> SSE:
        """Read up to and including the next event of ``event_type``."""
        while (event := await self.next_event()).event != event_type:
            pass
        return event

    async def wait_raw(self, text: str) -> None:
        """Read until ``text`` occurs in the raw stream."""
        while text not in self.raw:
            if not await self._more():
                raise AssertionError(f"stream ended without {text!r}; received {self.raw!r}")

    async def rest(self) -> list[SSE]:
        """Read to the end of the stream; return the events not yet handed out."""
        while await self._more():
            pass
        assert self._pending == "", f"stream ended inside a frame: {self._pending!r}"
        events = self.events[self._next :]
        self._next = len(self.events)
        return events


@asynccontextmanager
async def open_raw(
    harness: Harness, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[int, dict[str, str], SSEStream]]:
    """POST ``body`` over a bare socket; yield the status, headers and the SSE body.

    HTTP/1.0, so the body ends with the connection (no chunked framing to
    undo). Leaving the block closes the socket: a client that drops the
    connection mid-stream.
    """
    url = httpx.URL(harness.base_url)
    assert url.port is not None
    data = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.0",
        f"Host: {url.host}:{url.port}",
        f"Authorization: Bearer {KEY}",
        f"Content-Length: {len(data)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    sock = await trio.open_tcp_stream(url.host, url.port)
    async with sock:
        await sock.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        received = b""
        while b"\r\n\r\n" not in received:
            more = await sock.receive_some()
            assert more, f"connection closed before the headers: {received!r}"
            received += more
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        response_headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            response_headers[name.strip().lower()] = value.strip()
        decoder = codecs.getincrementaldecoder("utf-8")()
        first = [rest] if rest else []

        async def receive() -> str | None:
            chunk = first.pop() if first else await sock.receive_some()
            return decoder.decode(chunk) if chunk else None

        yield int(status_line.split()[1]), response_headers, SSEStream(receive)


def script(harness: Harness, *steps: list[ModelChunk | str]) -> None:
    """Script the fake model: step ``k`` of the model is ``steps[min(k, len - 1)]``."""
    harness.model.steps = list(steps)


async def new_session(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    assert isinstance(sid, str)
    return sid


def messages_url(sid: str) -> str:
    return f"/v1/sessions/{sid}/messages"


def turn_url(sid: str, rid: str, tail: str = "") -> str:
    return f"/v1/sessions/{sid}/responses/{rid}{tail}"


def types(events: list[SSE]) -> list[str]:
    return [e.event for e in events]


def assert_contiguous(events: list[SSE], start: int = 0) -> None:
    """Ids ``start``, ``start + 1``…, each data naming its id; one terminal, last."""
    assert [e.id for e in events] == list(range(start, start + len(events)))
    assert all(e.data["sequence_number"] == e.id for e in events)
    assert all(e.data["type"] == e.event for e in events)
    terminals = SESSION_TERMINALS | RESPONSE_TERMINALS
    assert [e.event in terminals for e in events] == [False] * (len(events) - 1) + [True]


async def session_state(harness: Harness, sid: str) -> dict[str, Any]:
    response = await harness.client.get(f"/v1/sessions/{sid}")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def balance(harness: Harness) -> float:
    return (await harness.store.get_account(harness.account)).balance


async def replay(harness: Harness, url: str, **kwargs: Any) -> list[SSE]:
    """GET an events URL of a finished turn and parse the whole body."""
    response = await harness.client.get(url, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(response.text)


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    """The response is a JSON error ``{"error", "message"}`` with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


# -- POST /v1/sessions/{sid}/messages ---------------------------------------


async def test_messages_response_id_header_before_first_token(harness: Harness) -> None:
    """X-Response-Id arrives while the model is blocked; only message.created is sent."""
    script(harness, ["block", TextChunk("late"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "hi"}) as r:
            assert r.status_code == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            rid = r.headers["X-Response-Id"]
            assert RID_RE.fullmatch(rid)
            await harness.model.blocked.wait()
            stream = SSEStream.of(r)
            first = await stream.next_event()
            # The model has produced nothing: the wire holds exactly one frame.
            assert not harness.model.gate.is_set()
            assert stream.raw.count("\n\n") == 1
            assert first.event == "message.created"
            assert first.data["id"] == rid
            harness.model.gate.set()
            rest = await stream.rest()
    assert_contiguous([first, *rest])
    assert rest[-1].event == "message.completed"


async def test_messages_sse_framing_on_the_wire(harness: Harness) -> None:
    """Raw frames are 'id: N\\nevent: T\\ndata: JSON\\n\\n', ids contiguous from 0."""
    script(harness, [TextChunk("line1\nline2\r\n"), TextChunk("é ü"), UsageChunk(3, 2)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "hi"}) as r:
            rid = r.headers["X-Response-Id"]
            raw = (await r.aread()).decode()
    assert re.fullmatch(f"(?:{FRAME})+", raw), raw
    frames = [(int(m[1]), m[2], json.loads(m[3])) for m in re.finditer(FRAME, raw)]
    assert [f[0] for f in frames] == list(range(len(frames)))
    assert [f[1] for f in frames] == DEFAULT_TYPES
    for seq, event_type, data in frames:
        assert data["type"] == event_type
        assert data["sequence_number"] == seq
        assert data["response_id"] == rid
    created, deltas, completed = frames[0][2], frames[2:4], frames[-1][2]
    assert created == {
        "type": "message.created",
        "sequence_number": 0,
        "response_id": rid,
        "id": rid,
        "session_id": sid,
        "status": "in_progress",
    }
    assert [d[2]["content"] for d in deltas] == ["line1\nline2\r\n", "é ü"]
    assert completed["id"] == rid
    assert completed["status"] == "completed"
    assert completed["usage"] == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"{}", "missing message"),
        (b'{"message": 42}', "message not a string"),
        (b'{"message": ["hi"]}', "message a list"),
        (b'{"message": null}', "message null"),
        (b'{"message": ""}', "message empty"),
        (b'{"message": "hi"', "truncated JSON"),
        (b"message=hi", "form body"),
        (b'["hi"]', "JSON array"),
        (b"", "empty body"),
    ],
)
async def test_messages_bad_body_is_400_and_starts_nothing(
    harness: Harness, content: bytes, what: str
) -> None:
    """A malformed body is a 400 JSON error; no turn starts, the session stays idle."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(
            messages_url(sid), content=content, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 400, "invalid_request")
        state = await session_state(harness, sid)
    assert state["busy"] is False, what
    assert state["active_response_id"] is None
    assert harness.rt.get_session(sid).history() == []
    assert harness.model.requests == []


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
async def test_messages_json_body_accepted_whatever_content_type(
    harness: Harness, content_type: str | None
) -> None:
    """A JSON body is accepted with no Content-Type or curl's default form type."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(
            messages_url(sid), content=b'{"message": "hi"}', headers=headers
        )
    if content_type is None:
        assert "Content-Type" not in response.request.headers
    assert response.status_code == 200, response.text
    events = parse_sse(response.text)
    assert types(events) == DEFAULT_TYPES
    assert events[0].data["id"] == response.headers["X-Response-Id"]


async def test_messages_second_message_while_running_is_409(harness: Harness) -> None:
    """A message while a turn runs is 409 session_busy naming the running response id."""
    script(harness, ["block", TextChunk("x"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            await harness.model.blocked.wait()
            busy = await harness.client.post(messages_url(sid), json={"message": "b"})
            body = assert_error(busy, 409, "session_busy")
            assert body["response_id"] == rid
            assert rid in body["message"]
            state = await session_state(harness, sid)
            assert state["busy"] is True
            assert state["active_response_id"] == rid
            harness.model.gate.set()
            events = await SSEStream.of(r).rest()
    assert events[-1].event == "message.completed"
    assert len(harness.rt.get_session(sid).history()) == 1
    assert len(harness.model.requests) == 1


async def test_messages_out_of_credits_is_402(harness: Harness) -> None:
    """A hard-mode account without credits gets 402 out_of_credits; nothing starts."""
    harness.store.add_credits(harness.account, -10_000)
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(messages_url(sid), json={"message": "hi"})
        assert_error(response, 402, "out_of_credits")
        stateless = await harness.client.post("/v1/responses", json={"input": "hi", "stream": True})
        assert_error(stateless, 402, "out_of_credits")
        state = await session_state(harness, sid)
    assert state["busy"] is False
    assert harness.rt.get_session(sid).history() == []
    assert harness.model.requests == []
    assert await balance(harness) == START_BALANCE - 10_000


async def test_messages_other_accounts_session_is_404(harness: Harness) -> None:
    """Posting to another account's session is 404, never 403, and starts nothing."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client_for(OTHER_KEY) as other:
            response = await other.post(messages_url(sid), json={"message": "hi"})
    assert_error(response, 404, "not_found")
    assert harness.rt.get_session(sid).history() == []


# -- cancel -----------------------------------------------------------------


async def test_cancel_mid_stream_ends_with_message_cancelled_unbilled(harness: Harness) -> None:
    """Cancel mid-stream: 202 cancelling, the stream ends message.cancelled, no charge."""
    script(harness, [TextChunk("partial"), "block", TextChunk("never"), UsageChunk(5, 5)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            stream = SSEStream.of(r)
            delta = await stream.until("text.delta")
            assert delta.data["content"] == "partial"
            await harness.model.blocked.wait()
            response = await harness.client.post(turn_url(sid, rid, "/cancel"))
            assert response.status_code == 202
            assert response.json() == {"response_id": rid, "status": "cancelling"}
            rest = await stream.rest()
        again = await harness.client.post(turn_url(sid, rid, "/cancel"))
        assert again.status_code == 200
        assert again.json() == {"response_id": rid, "status": "already_complete"}
        state = await session_state(harness, sid)
        records = await harness.store.usage_records(harness.account)
        usage = (await harness.client.get("/v1/usage")).json()
    events = stream.events
    assert_contiguous(events)
    assert events[-1].event == "message.cancelled"
    assert events[-1].data == {
        "type": "message.cancelled",
        "sequence_number": events[-1].id,
        "response_id": rid,
        "id": rid,
        "reason": "client_cancel",
        "status": "cancelled",
    }
    assert "text.delta" not in types(rest)
    assert "never" not in stream.raw
    assert state["busy"] is False
    assert state["active_response_id"] is None
    assert records == []
    assert await balance(harness) == START_BALANCE
    assert usage["records"] == []
    assert usage["credits"]["balance"] == START_BALANCE


async def test_cancel_repeated_before_it_lands_is_202_again(harness: Harness) -> None:
    """A repeat cancel before the cancel lands is 202 again, 200 already_complete after."""
    script(harness, ["shielded-block", TextChunk("never"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            await harness.model.blocked.wait()
            first = await harness.client.post(turn_url(sid, rid, "/cancel"))
            # The model sits in a shielded wait: the cancel cannot land yet.
            second = await harness.client.post(turn_url(sid, rid, "/cancel"))
            status = (await harness.client.get(turn_url(sid, rid))).json()["status"]
            harness.model.gate.set()
            events = await SSEStream.of(r).rest()
        third = await harness.client.post(turn_url(sid, rid, "/cancel"))
    assert (first.status_code, first.json()["status"]) == (202, "cancelling")
    assert (second.status_code, second.json()["status"]) == (202, "cancelling")
    assert status == "cancelling"
    assert (third.status_code, third.json()) == (
        200,
        {"response_id": rid, "status": "already_complete"},
    )
    assert types(events) == ["message.created", "message.cancelled"]
    assert await harness.store.usage_records(harness.account) == []


async def test_cancel_unknown_foreign_or_cross_session_rid_is_404(harness: Harness) -> None:
    """Cancel of an unknown rid, another session's rid or another account's is 404."""
    script(harness, ["block", TextChunk("x"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        other_sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            await harness.model.blocked.wait()
            unknown = await harness.client.post(turn_url(sid, "msg_" + "0" * 32, "/cancel"))
            cross = await harness.client.post(turn_url(other_sid, rid, "/cancel"))
            async with harness.client_for(OTHER_KEY) as other:
                foreign = await other.post(turn_url(sid, rid, "/cancel"))
                foreign_get = await other.get(turn_url(sid, rid))
                foreign_events = await other.get(turn_url(sid, rid, "/events"))
            # None of that touched the turn: it completes and is billed.
            harness.model.gate.set()
            events = await SSEStream.of(r).rest()
    for response in (unknown, cross, foreign, foreign_get, foreign_events):
        assert_error(response, 404, "not_found")
    assert events[-1].event == "message.completed"
    assert len(await harness.store.usage_records(harness.account)) == 1


async def test_cancel_after_completion_is_already_complete(harness: Harness) -> None:
    """Cancel of a completed turn is 200 already_complete; the charge stays."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(messages_url(sid), json={"message": "hi"})
        rid = response.headers["X-Response-Id"]
        cancel = await harness.client.post(turn_url(sid, rid, "/cancel"))
    assert cancel.status_code == 200
    assert cancel.json() == {"response_id": rid, "status": "already_complete"}
    assert len(await harness.store.usage_records(harness.account)) == 1
    assert await balance(harness) == START_BALANCE - DEFAULT_COST


async def test_usage_completed_turn_has_one_record_in_report(harness: Harness) -> None:
    """A completed turn is charged once and GET /v1/usage shows it in the DESIGN shape."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(messages_url(sid), json={"message": "hi"})
        rid = response.headers["X-Response-Id"]
        assert parse_sse(response.text)[-1].event == "message.completed"
        # Replays and resumes never bill.
        await replay(harness, turn_url(sid, rid, "/events"))
        usage_response = await harness.client.get("/v1/usage")
    records = await harness.store.usage_records(harness.account)
    assert [r.response_id for r in records] == [rid]
    assert await balance(harness) == START_BALANCE - DEFAULT_COST
    assert usage_response.status_code == 200
    usage = usage_response.json()
    assert set(usage) == {"rate_limit", "credits", "records"}
    assert usage["rate_limit"]["caller_id"] == harness.account
    buckets = usage["rate_limit"]["buckets"]
    assert set(buckets) >= {"session_turn", "response"}
    for name, bucket in buckets.items():
        windows = bucket["windows"]
        assert [w["name"] for w in windows] == ["hour", "day"]
        for window in windows:
            assert set(window) == {
                "name",
                "duration_seconds",
                "turns",
                "max_turns",
                "tokens",
                "max_tokens",
                "enabled",
            }
            assert isinstance(window["enabled"], bool)
            expected = (1, 5) if name == "session_turn" else (0, 0)
            assert (window["turns"], window["tokens"]) == expected
    assert [w["duration_seconds"] for w in buckets["session_turn"]["windows"]] == [3600, 86400]
    assert usage["credits"] == {
        "enabled": True,
        "mode": "hard",
        "balance": START_BALANCE - DEFAULT_COST,
    }
    [record] = usage["records"]
    assert isinstance(record.pop("created_at"), float)
    assert record == {
        "response_id": rid,
        "session_id": sid,
        "model": "fake",
        "input_tokens": 3,
        "output_tokens": 2,
        "credits": DEFAULT_COST,
        "estimated": False,
    }


# -- GET …/responses/{rid} ---------------------------------------------------


async def test_get_response_status_output_and_usage(harness: Harness) -> None:
    """GET …/responses/{rid}: in_progress with the output so far, then completed with usage."""
    script(harness, [TextChunk("so "), "block", TextChunk("far"), UsageChunk(3, 2)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            stream = SSEStream.of(r)
            await stream.until("text.delta")
            await harness.model.blocked.wait()
            running = (await harness.client.get(turn_url(sid, rid))).json()
            harness.model.gate.set()
            await stream.rest()
        done = (await harness.client.get(turn_url(sid, rid))).json()
    assert running["id"] == rid
    assert running["status"] == "in_progress"
    assert running["output_text"] == "so "
    assert running["usage"] is None
    assert done["id"] == rid
    assert done["status"] == "completed"
    assert done["output_text"] == "so far"
    assert done["usage"] == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}


async def test_get_response_of_cancelled_turn(harness: Harness) -> None:
    """GET …/responses/{rid} of a cancelled turn says cancelled, without usage."""
    script(harness, [TextChunk("half"), "block", UsageChunk(3, 2)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            await harness.model.blocked.wait()
            assert (await harness.client.post(turn_url(sid, rid, "/cancel"))).status_code == 202
            await SSEStream.of(r).rest()
        body = (await harness.client.get(turn_url(sid, rid))).json()
    assert body["status"] == "cancelled"
    assert body["output_text"] == "half"
    assert body["usage"] is None


# -- resume -----------------------------------------------------------------


async def test_resume_without_cursor_replays_from_zero(harness: Harness) -> None:
    """GET …/events without a cursor replays every event from id 0."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(messages_url(sid), json={"message": "hi"})
        rid = response.headers["X-Response-Id"]
        original = parse_sse(response.text)
        replayed = await replay(harness, turn_url(sid, rid, "/events"))
        resume = await harness.client.get(turn_url(sid, rid, "/events"))
    assert replayed == original
    assert types(replayed) == DEFAULT_TYPES
    assert resume.headers["X-Response-Id"] == rid


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_after_cursor_then_follows_live(harness: Harness, how: str) -> None:
    """Last-Event-ID (header or query) gives events N+1… then follows live to the terminal."""
    script(harness, [TextChunk("a"), "block", TextChunk("b"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            rid = r.headers["X-Response-Id"]
            first = SSEStream.of(r)
            delta = await first.until("text.delta")
            await harness.model.blocked.wait()
            cursor = delta.id - 1
            kwargs: dict[str, Any] = (
                {"headers": {"Last-Event-ID": str(cursor)}}
                if how == "header"
                else {"params": {"last_event_id": str(cursor)}}
            )
            url = turn_url(sid, rid, "/events")
            async with harness.client.stream("GET", url, **kwargs) as resumed_response:
                assert resumed_response.status_code == 200
                resumed = SSEStream.of(resumed_response)
                live_from = await resumed.next_event()
                assert live_from == delta
                harness.model.gate.set()
                resumed_events = [live_from, *await resumed.rest()]
            original = [*first.events[: first.events.index(delta) + 1], *await first.rest()]
    assert_contiguous(original)
    assert_contiguous(resumed_events, start=cursor + 1)
    assert resumed_events == original[cursor + 1 :]
    assert resumed_events[-1].event == "message.completed"


async def test_resume_after_client_disconnect_turn_keeps_running(harness: Harness) -> None:
    """A dropped stream leaves the turn running; resuming at its cursor loses nothing."""
    script(harness, [TextChunk("a"), "block", TextChunk("b"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with open_raw(harness, messages_url(sid), {"message": "a"}) as (status, head, first):
            assert status == 200
            rid = head["x-response-id"]
            await first.until("text.delta")
            await harness.model.blocked.wait()
            seen = first.seen
        # The socket is closed: the turn must go on regardless.
        state = await session_state(harness, sid)
        running = (await harness.client.get(turn_url(sid, rid))).json()
        url = turn_url(sid, rid, "/events")
        headers = {"Last-Event-ID": str(seen[-1].id)}
        async with harness.client.stream("GET", url, headers=headers) as resumed_response:
            assert resumed_response.status_code == 200
            harness.model.gate.set()
            resumed = await SSEStream.of(resumed_response).rest()
        full = await replay(harness, url)
    assert state["busy"] is True
    assert state["active_response_id"] == rid
    assert running["status"] == "in_progress"
    assert_contiguous(resumed, start=seen[-1].id + 1)
    assert seen + resumed == full
    assert_contiguous(full)
    assert full[-1].event == "message.completed"
    assert "".join(e.data["content"] for e in full if e.event == "text.delta") == "ab"
    assert len(await harness.store.usage_records(harness.account)) == 1


async def test_resume_sees_cancel_fired_while_disconnected(harness: Harness) -> None:
    """A cancel fired while no client is connected is seen on reconnect."""
    script(harness, [TextChunk("a"), "block", TextChunk("b"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        async with open_raw(harness, messages_url(sid), {"message": "a"}) as (status, head, first):
            assert status == 200
            rid = head["x-response-id"]
            last = await first.until("text.delta")
            await harness.model.blocked.wait()
        cancel = await harness.client.post(turn_url(sid, rid, "/cancel"))
        resumed = await replay(
            harness, turn_url(sid, rid, "/events"), headers={"Last-Event-ID": str(last.id)}
        )
    assert cancel.status_code == 202
    assert_contiguous(resumed, start=last.id + 1)
    assert resumed[-1].event == "message.cancelled"
    assert resumed[-1].data["reason"] == "client_cancel"
    assert "text.delta" not in types(resumed)
    assert await harness.store.usage_records(harness.account) == []


@pytest.mark.parametrize("cursor", ["abc", "1.5", "-2"])
async def test_resume_bad_last_event_id_is_400(harness: Harness, cursor: str) -> None:
    """A Last-Event-ID that is not an integer >= -1 is a 400 (header and query)."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        rid = (await harness.client.post(messages_url(sid), json={"message": "hi"})).headers[
            "X-Response-Id"
        ]
        url = turn_url(sid, rid, "/events")
        by_header = await harness.client.get(url, headers={"Last-Event-ID": cursor})
        by_query = await harness.client.get(url, params={"last_event_id": cursor})
    assert_error(by_header, 400, "invalid_request")
    assert_error(by_query, 400, "invalid_request")


async def test_resume_unknown_or_cross_session_rid_is_404(harness: Harness) -> None:
    """Resuming an unknown rid, or a rid under another session, is 404."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        other_sid = await new_session(harness.client)
        rid = (await harness.client.post(messages_url(sid), json={"message": "hi"})).headers[
            "X-Response-Id"
        ]
        unknown = await harness.client.get(turn_url(sid, "msg_" + "f" * 32, "/events"))
        cross = await harness.client.get(turn_url(other_sid, rid, "/events"))
        cross_get = await harness.client.get(turn_url(other_sid, rid))
    for response in (unknown, cross, cross_get):
        assert_error(response, 404, "not_found")


# -- idempotency keys -------------------------------------------------------


async def test_idempotency_same_key_replays_the_same_turn(harness: Harness) -> None:
    """Same key and body: same X-Response-Id, full replay from 0, one turn, one charge."""
    headers = {"Idempotency-Key": "key-1"}
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        first = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers=headers
        )
        # Same JSON, other spelling: the body is compared as JSON.
        again = await harness.client.post(
            messages_url(sid), content=b'{ "message" : "hi" }', headers=headers
        )
    assert first.status_code == again.status_code == 200
    rid = first.headers["X-Response-Id"]
    assert again.headers["X-Response-Id"] == rid
    assert parse_sse(again.text) == parse_sse(first.text)
    assert types(parse_sse(again.text)) == DEFAULT_TYPES
    assert len(harness.rt.get_session(sid).history()) == 1
    assert len(harness.model.requests) == 1
    assert [r.response_id for r in await harness.store.usage_records(harness.account)] == [rid]


async def test_idempotency_key_with_other_body_or_session_is_422(harness: Harness) -> None:
    """A key reused with another body or on another session is 422 idempotency_conflict."""
    headers = {"Idempotency-Key": "key-2"}
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        other_sid = await new_session(harness.client)
        first = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers=headers
        )
        other_body = await harness.client.post(
            messages_url(sid), json={"message": "bye"}, headers=headers
        )
        other_session = await harness.client.post(
            messages_url(other_sid), json={"message": "hi"}, headers=headers
        )
        stateless = await harness.client.post(
            "/v1/responses", json={"input": "hi", "stream": True}, headers=headers
        )
        # Keys are per account: another account may use the same key.
        async with harness.client_for(OTHER_KEY) as other:
            other_account_sid = await new_session(other)
            other_account = await other.post(
                messages_url(other_account_sid), json={"message": "hi"}, headers=headers
            )
    assert first.status_code == 200
    for response in (other_body, other_session, stateless):
        assert_error(response, 422, "idempotency_conflict")
    assert other_account.status_code == 200
    assert other_account.headers["X-Response-Id"] != first.headers["X-Response-Id"]
    assert len(harness.rt.get_session(sid).history()) == 1
    assert harness.rt.get_session(other_sid).history() == []


async def test_idempotency_concurrent_requests_start_one_turn(harness: Harness) -> None:
    """Five concurrent requests with one key all stream the same single turn."""
    script(harness, ["block", TextChunk("once"), UsageChunk(3, 2)])
    headers = {"Idempotency-Key": "key-concurrent"}
    rids: list[str] = []
    streams: list[list[SSE]] = []
    all_started = trio.Event()
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)

        async def one() -> None:
            async with harness.client.stream(
                "POST", messages_url(sid), json={"message": "hi"}, headers=headers
            ) as r:
                assert r.status_code == 200, await r.aread()
                rids.append(r.headers["X-Response-Id"])
                if len(rids) == 5:
                    all_started.set()
                streams.append(await SSEStream.of(r).rest())

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
            await all_started.wait()
            harness.model.gate.set()
    assert len(set(rids)) == 1
    assert all(events == streams[0] for events in streams)
    assert_contiguous(streams[0])
    assert streams[0][-1].event == "message.completed"
    assert len(harness.rt.get_session(sid).history()) == 1
    assert len(harness.model.requests) == 1
    assert len(await harness.store.usage_records(harness.account)) == 1


async def test_idempotency_cancelled_turn_keeps_its_key(harness: Harness) -> None:
    """A cancelled turn keeps its key (a retry replays it); a new key starts a new turn."""
    script(harness, ["block", TextChunk("never")], [TextChunk("fresh"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        headers = {"Idempotency-Key": "key-cancelled"}
        async with harness.client.stream(
            "POST", messages_url(sid), json={"message": "hi"}, headers=headers
        ) as r:
            rid = r.headers["X-Response-Id"]
            await harness.model.blocked.wait()
            assert (await harness.client.post(turn_url(sid, rid, "/cancel"))).status_code == 202
            original = await SSEStream.of(r).rest()
        retry = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers=headers
        )
        fresh = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers={"Idempotency-Key": "key-new"}
        )
    assert retry.status_code == 200
    assert retry.headers["X-Response-Id"] == rid
    replayed = parse_sse(retry.text)
    assert replayed == original
    assert replayed[-1].event == "message.cancelled"
    assert fresh.status_code == 200
    assert fresh.headers["X-Response-Id"] != rid
    assert parse_sse(fresh.text)[-1].event == "message.completed"
    assert [t.id for t in harness.rt.get_session(sid).history()] == [
        rid,
        fresh.headers["X-Response-Id"],
    ]
    records = await harness.store.usage_records(harness.account)
    assert [r.response_id for r in records] == [fresh.headers["X-Response-Id"]]


async def test_idempotency_failed_start_releases_the_key(harness: Harness) -> None:
    """A key whose request was refused (409 busy) starts a turn when retried later."""
    script(harness, ["block", TextChunk("x"), UsageChunk(1, 1)], [UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        headers = {"Idempotency-Key": "key-retry"}
        async with harness.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
            await harness.model.blocked.wait()
            busy = await harness.client.post(
                messages_url(sid), json={"message": "b"}, headers=headers
            )
            harness.model.gate.set()
            await SSEStream.of(r).rest()
        retry = await harness.client.post(messages_url(sid), json={"message": "b"}, headers=headers)
    assert_error(busy, 409, "session_busy")
    assert retry.status_code == 200
    assert parse_sse(retry.text)[-1].event == "message.completed"
    assert len(harness.rt.get_session(sid).history()) == 2


async def test_idempotency_after_eviction_is_replayed_json(harness: Harness) -> None:
    """Once the key's turn is evicted, a retry is 200 JSON status replayed, no new turn."""
    headers = {"Idempotency-Key": "key-evicted"}
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        first = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers=headers
        )
        rid = first.headers["X-Response-Id"]
        # Evict by hand: the grace window is 120 s of real time and this test
        # cannot use a mock clock (real sockets). The eviction loop only pops
        # the turn from this registry.
        harness.rt._turns.pop(rid)
        retry = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers=headers
        )
        events = await harness.client.get(turn_url(sid, rid, "/events"))
        cancel = await harness.client.post(turn_url(sid, rid, "/cancel"))
    assert retry.status_code == 200
    assert retry.headers["Content-Type"].startswith("application/json")
    body = retry.json()
    assert set(body) == {"response_id", "status", "note", "response"}
    assert body["response_id"] == rid
    assert body["status"] == "replayed"
    assert isinstance(body["note"], str)
    assert body["note"]
    # The final state of the turn, from the store: the same as GET .../responses/{rid}.
    assert body["response"]["id"] == rid
    assert body["response"]["status"] == "completed"
    assert body["response"]["last_sequence_number"] is None
    got = await harness.client.get(turn_url(sid, rid, ""))
    assert got.status_code == 200
    assert got.json() == body["response"]
    assert_error(events, 404, "not_found")
    assert_error(cancel, 404, "not_found")
    assert len(harness.rt.get_session(sid).history()) == 1
    assert len(await harness.store.usage_records(harness.account)) == 1


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_idempotency_bad_key_is_400(harness: Harness, key: str) -> None:
    """An empty or over-long Idempotency-Key is a 400 and starts nothing."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        response = await harness.client.post(
            messages_url(sid), json={"message": "hi"}, headers={"Idempotency-Key": key}
        )
    assert_error(response, 400, "invalid_request")
    assert harness.rt.get_session(sid).history() == []


# -- POST /v1/responses -----------------------------------------------------


async def test_responses_stream_created_to_completed(harness: Harness) -> None:
    """POST /v1/responses streams response.* from response.created (id = rid) to completed."""
    with trio.fail_after(TIMEOUT):
        async with harness.client.stream(
            "POST", "/v1/responses", json={"input": "hi", "stream": True}
        ) as r:
            assert r.status_code == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            rid = r.headers["X-Response-Id"]
            raw = (await r.aread()).decode()
        got = await harness.client.get(f"/v1/responses/{rid}")
    assert RESP_RE.fullmatch(rid)
    assert re.fullmatch(f"(?:{FRAME})+", raw), raw
    events = parse_sse(raw)
    assert_contiguous(events)
    assert all(e.data["response_id"] == rid for e in events)
    created = events[0]
    assert created.event == "response.created"
    assert created.data["id"] == rid
    assert created.data["response"]["id"] == rid
    assert created.data["response"]["status"] == "in_progress"
    deltas = [e.data["delta"] for e in events if e.event == "response.output_text.delta"]
    assert deltas == ["hello ", "world"]
    completed = events[-1]
    assert completed.event == "response.completed"
    assert completed.data["response"]["status"] == "completed"
    assert completed.data["response"]["output_text"] == "hello world"
    assert completed.data["response"]["usage"] == {
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
        "input_tokens": 3,
        "output_tokens": 2,
        "total_tokens": 5,
    }
    assert got.status_code == 200
    body = got.json()
    assert (body["id"], body["status"], body["output_text"]) == (rid, "completed", "hello world")
    assert body["usage"] == completed.data["response"]["usage"]
    [record] = await harness.store.usage_records(harness.account)
    assert (record.response_id, record.session_id) == (rid, None)


async def test_responses_cancel_mid_stream(harness: Harness) -> None:
    """POST /v1/responses/{rid}/cancel: 202, stream ends response.cancelled, unbilled."""
    script(harness, [TextChunk("part"), "block", TextChunk("never"), UsageChunk(1, 1)])
    with trio.fail_after(TIMEOUT):
        async with harness.client.stream(
            "POST", "/v1/responses", json={"input": "hi", "stream": True}
        ) as r:
            rid = r.headers["X-Response-Id"]
            stream = SSEStream.of(r)
            await stream.until("response.output_text.delta")
            await harness.model.blocked.wait()
            cancel = await harness.client.post(f"/v1/responses/{rid}/cancel")
            rest = await stream.rest()
        again = await harness.client.post(f"/v1/responses/{rid}/cancel")
        got = (await harness.client.get(f"/v1/responses/{rid}")).json()
        resumed = await replay(
            harness, f"/v1/responses/{rid}/events", headers={"Last-Event-ID": "1"}
        )
    assert cancel.status_code == 202
    assert cancel.json() == {"response_id": rid, "status": "cancelling"}
    assert_contiguous(stream.events)
    terminal = stream.events[-1]
    assert terminal.event == "response.cancelled"
    assert terminal.data["reason"] == "client_cancel"
    assert terminal.data["response"]["status"] == "cancelled"
    assert "response.output_text.delta" not in types(rest)
    assert "never" not in stream.raw
    assert again.status_code == 200
    assert again.json() == {"response_id": rid, "status": "already_complete"}
    assert (got["status"], got["output_text"], got["usage"]) == ("cancelled", "part", None)
    assert resumed == stream.events[2:]
    assert await harness.store.usage_records(harness.account) == []
    assert await balance(harness) == START_BALANCE


async def test_responses_and_session_rids_do_not_cross(harness: Harness) -> None:
    """A session rid is 404 on /v1/responses/…, and a stateless rid under a session."""
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        msg = (await harness.client.post(messages_url(sid), json={"message": "hi"})).headers[
            "X-Response-Id"
        ]
        resp = (
            await harness.client.post("/v1/responses", json={"input": "hi", "stream": True})
        ).headers["X-Response-Id"]
        responses = [
            await harness.client.get(f"/v1/responses/{msg}"),
            await harness.client.get(f"/v1/responses/{msg}/events"),
            await harness.client.post(f"/v1/responses/{msg}/cancel"),
            await harness.client.get(turn_url(sid, resp)),
            await harness.client.get(turn_url(sid, resp, "/events")),
            await harness.client.post(turn_url(sid, resp, "/cancel")),
        ]
        async with harness.client_for(OTHER_KEY) as other:
            responses.append(await other.get(f"/v1/responses/{resp}"))
            responses.append(await other.post(f"/v1/responses/{resp}/cancel"))
    for response in responses:
        assert_error(response, 404, "not_found")


async def test_responses_idempotency_key_replays(harness: Harness) -> None:
    """A streamed /v1/responses retried with its key replays the same response."""
    headers = {"Idempotency-Key": "key-stateless"}
    with trio.fail_after(TIMEOUT):
        first = await harness.client.post(
            "/v1/responses", json={"input": "hi", "stream": True}, headers=headers
        )
        again = await harness.client.post(
            "/v1/responses", json={"input": "hi", "stream": True}, headers=headers
        )
        other = await harness.client.post(
            "/v1/responses", json={"input": "yo", "stream": True}, headers=headers
        )
    assert first.status_code == again.status_code == 200
    assert again.headers["X-Response-Id"] == first.headers["X-Response-Id"]
    assert parse_sse(again.text) == parse_sse(first.text)
    assert_error(other, 422, "idempotency_conflict")
    assert len(harness.model.requests) == 1
    assert len(await harness.store.usage_records(harness.account)) == 1


async def test_responses_stream_false_returns_json(harness: Harness) -> None:
    """POST /v1/responses with "stream": false answers the response object as JSON."""
    with trio.fail_after(TIMEOUT):
        response = await harness.client.post("/v1/responses", json={"input": "hi", "stream": False})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert (body["object"], body["status"]) == ("response", "completed")


async def test_responses_input_item_array_is_accepted(harness: Harness) -> None:
    """POST /v1/responses accepts ``input`` as an array of message items."""
    body = {"input": [{"role": "user", "content": "hi"}], "stream": True}
    with trio.fail_after(TIMEOUT):
        response = await harness.client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert parse_sse(response.text)[-1].event == "response.completed"


async def test_responses_tools_reach_the_model(harness: Harness) -> None:
    """Flat function tools in the body are offered to the model."""
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    body = {"input": "hi", "tools": [tool], "stream": True}
    with trio.fail_after(TIMEOUT):
        response = await harness.client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert [t.name for t in harness.model.requests[-1].tools] == ["lookup"]


# -- pings and the seed -------------------------------------------------------


async def test_stream_idle_pings_before_first_token(tmp_path: Path, model: FakeModel) -> None:
    """An idle stream carries ': ping' comment lines; the events still parse."""
    model.steps = [["block", TextChunk("late"), UsageChunk(1, 1)]]
    with trio.fail_after(TIMEOUT):
        async with open_harness(tmp_path, model, ping_interval=0.2) as h:
            sid = await new_session(h.client)
            async with h.client.stream("POST", messages_url(sid), json={"message": "a"}) as r:
                stream = SSEStream.of(r)
                await model.blocked.wait()
                await stream.wait_raw("\n\n: ping\n\n")
                before_token = stream.raw
                model.gate.set()
                await stream.rest()
    assert "text.delta" not in before_token
    assert before_token.startswith("id: 0\nevent: message.created\n")
    assert ": ping\n" in stream.raw.split("event: text.delta")[0]
    assert_contiguous(stream.events)
    assert stream.events[-1].event == "message.completed"


async def test_seed_cancel_an_in_flight_stream(harness: Harness) -> None:
    """The seed page's flow: persistent session, stream, cancel, 'event: message.cancelled'."""
    script(harness, [TextChunk("Cryptography "), "block", TextChunk("is"), UsageChunk(9, 9)])
    rid_ready = trio.Event()
    holder: dict[str, str] = {}
    matched: list[str] = []
    with trio.fail_after(TIMEOUT):
        created = await harness.client.post("/v1/sessions", json={"persistent": True})
        assert created.status_code == 201
        assert created.json()["persistent"] is True
        sid = created.json()["id"]

        async def reader() -> None:
            async with harness.client.stream(
                "POST",
                messages_url(sid),
                json={"message": "Write a 5000-word essay on cryptography"},
            ) as r:
                holder["rid"] = r.headers["X-Response-Id"]
                rid_ready.set()
                # The seed returns at the match; this reads on to the end of
                # the stream (the terminal is its last event), because httpx
                # leaves unclosed async generators behind a partial read.
                async for line in r.aiter_lines():
                    if line.startswith("event: message.cancelled"):
                        matched.append(line)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await rid_ready.wait()
            await harness.model.blocked.wait()
            rid = holder["rid"]
            cancel = await harness.client.post(turn_url(sid, rid, "/cancel"))
    assert cancel.status_code == 202
    assert cancel.json() == {"response_id": rid, "status": "cancelling"}
    assert matched == ["event: message.cancelled"]
    assert await harness.store.usage_records(harness.account) == []
    assert (await session_state(harness, sid))["busy"] is False

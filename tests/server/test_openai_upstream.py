"""OpenAIModel through the HTTP API, against the fake OpenAI upstream.

The whole real path: httpx -> hypercorn -> runtime -> OpenAIModel -> httpx ->
the fake chat-completions server (tests/fake_upstream.py), all on loopback
sockets with the real clock, each test under ``trio.fail_after``. The model is
named ``"fake"`` because the harness prices only that name (1 credit per
input token, 2 per output token), so billing shows.
"""

from __future__ import annotations

import gc
import json
import socket
import warnings
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, cast

import pytest
import trio

from bench.fake_upstream import (
    Hang,
    Response,
    Status,
    Stream,
    finish,
    open_fake_upstream,
    raw,
    reasoning,
    text,
    tool_args,
    tool_start,
    usage,
)
from runtime import OpenAIModel
from runtime._buffer import EventBuffer

from .conftest import SSE, Harness, open_harness, parse_sse
from .test_turns_api import (
    SSEStream,
    assert_contiguous,
    messages_url,
    new_session,
    turn_url,
    types,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from bench.fake_upstream import FakeUpstream

    from ..fakes import FakeModel

TIMEOUT: Final = 10
SECRET: Final = "sk-secret-123"
#: "hello world" with usage 11 in / 4 out.
GOOD: Final = Stream(chunks=[text("hello "), text("world"), finish("stop"), usage(11, 4)])
#: trio's warning for an httpx/httpcore async generator collected half-read.
ABANDONED: Final = "Async generator 'http"
TEXT_TYPES: Final = [
    "message.created",
    "text.start",
    "text.delta",
    "text.delta",
    "text.stop",
    "message.completed",
]


@asynccontextmanager
async def open_stack(
    tmp_path: Path, script: list[Response], **model_kwargs: Any
) -> AsyncIterator[tuple[Harness, FakeUpstream]]:
    """The fake upstream, an OpenAIModel on it, and the server on that model."""
    async with (
        open_fake_upstream(script) as up,
        OpenAIModel(base_url=up.base_url, model="fake", **model_kwargs) as model,
        # The harness annotates its model as FakeModel but only hands it to
        # Runtime.open, which takes any Model.
        open_harness(tmp_path, cast("FakeModel", model)) as harness,
    ):
        yield harness, up


async def send(harness: Harness, message: str = "hi") -> tuple[str, str, list[SSE]]:
    """A new session, one message read to its end: (sid, rid, events)."""
    sid = await new_session(harness.client)
    response = await harness.client.post(messages_url(sid), json={"message": message})
    assert response.status_code == 200, response.text
    events = parse_sse(response.text)
    assert_contiguous(events)
    return sid, response.headers["X-Response-Id"], events


def deltas(events: list[SSE], event_type: str = "text.delta") -> list[str]:
    return [e.data["content"] for e in events if e.event == event_type]


def assert_upstream_error(events: list[SSE], secret: str | None = None) -> str:
    """The turn ended message.error naming upstream_error; return the error text."""
    terminal = events[-1]
    assert terminal.event == "message.error", types(events)
    error = terminal.data["error"]
    assert isinstance(error, str)
    assert "upstream_error" in error
    if secret is not None:
        assert secret not in error
    return error


async def assert_unbilled(harness: Harness) -> None:
    assert await harness.store.usage_records(harness.account) == []


# -- streaming and billing ---------------------------------------------------------


@pytest.mark.parametrize("api_key", [None, SECRET])
async def test_openai_text_streams_through_and_is_billed(
    tmp_path: Path, api_key: str | None
) -> None:
    """Text deltas stream through in order; usage comes from the usage chunk and is
    billed once; the upstream gets a streaming request with the key only if set."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [GOOD], api_key=api_key) as (harness, up):
            sid, rid, events = await send(harness)
            records = await harness.store.usage_records(harness.account)
    assert types(events) == TEXT_TYPES
    assert deltas(events) == ["hello ", "world"]
    completed = events[-1].data
    assert completed["usage"] == {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}
    [record] = records
    assert (record.response_id, record.session_id, record.model) == (rid, sid, "fake")
    assert (record.input_tokens, record.output_tokens) == (11, 4)
    assert record.credits == 11 * 1 + 4 * 2
    [request] = up.requests
    assert (request["method"], request["path"]) == ("POST", "/v1/chat/completions")
    body = request["json"]
    assert body["model"] == "fake"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    tool_names = {t["function"]["name"] for t in body["tools"]}
    assert tool_names == {"write_file", "run_shell", "read_file", "list_files"}
    for tool in body["tools"]:
        assert tool["type"] == "function"
        assert set(tool["function"]) == {"name", "description", "parameters"}
    if api_key is None:
        assert "authorization" not in request["headers"]
    else:
        assert request["headers"]["authorization"] == f"Bearer {SECRET}"
        assert SECRET not in json.dumps([e.data for e in events])


async def test_openai_second_turn_sends_the_conversation(tmp_path: Path) -> None:
    """A session's second turn sends the first turn's user and assistant messages."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [GOOD]) as (harness, up):
            sid, _, _ = await send(harness, "first")
            response = await harness.client.post(messages_url(sid), json={"message": "second"})
    assert parse_sse(response.text)[-1].event == "message.completed"
    assert up.requests[1]["json"]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "second"},
    ]


async def test_openai_tool_call_round_trip(tmp_path: Path) -> None:
    """A write_file call whose arguments arrive in 3 fragments runs in the workspace;
    the next upstream request carries the assistant tool_calls and the tool result."""
    fragments = ['{"path": "notes/a.t', 'xt", "content": "hi', ' there"}']
    step1 = Stream(
        chunks=[
            tool_start(0, "call_1", "write_file"),
            *(tool_args(0, f) for f in fragments),
            finish("tool_calls"),
            usage(10, 5),
        ]
    )
    step2 = Stream(chunks=[text("done"), finish("stop"), usage(20, 2)])
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [step1, step2]) as (harness, up):
            sid, _, events = await send(harness, "write it")
            written = (harness.rt.data_dir / "workspaces" / sid / "notes" / "a.txt").read_text()
            records = await harness.store.usage_records(harness.account)
    assert types(events) == [
        "message.created",
        "tool_use.start",
        "tool_use.input_delta",
        "tool_use.input_delta",
        "tool_use.input_delta",
        "tool_use.executing",
        "tool_use.stop",
        "tool_result",
        "text.start",
        "text.delta",
        "text.stop",
        "message.completed",
    ]
    by_type = {e.event: e.data for e in events}
    assert (by_type["tool_use.start"]["name"], by_type["tool_use.start"]["id"]) == (
        "write_file",
        "call_1",
    )
    assert deltas(events, "tool_use.input_delta") == fragments
    assert by_type["tool_use.executing"]["input"] == {"path": "notes/a.txt", "content": "hi there"}
    result = by_type["tool_result"]
    assert (result["id"], result["is_error"]) == ("call_1", False)
    assert written == "hi there"
    assert events[-1].data["usage"] == {"input_tokens": 30, "output_tokens": 7, "total_tokens": 37}
    [record] = records
    assert (record.input_tokens, record.output_tokens) == (30, 7)
    assert len(up.requests) == 2
    messages = up.requests[1]["json"]["messages"]
    assert messages[0] == {"role": "user", "content": "write it"}
    assistant, tool = messages[1:]
    assert assistant["role"] == "assistant"
    assert not assistant.get("content")
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "write_file", "arguments": "".join(fragments)},
        }
    ]
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": result["content"]}


async def test_openai_parallel_tool_calls_interleaved(tmp_path: Path) -> None:
    """Two tool calls whose fragments interleave (by index) both run, in order; the
    next request carries both calls and both results."""
    step1 = Stream(
        chunks=[
            tool_start(0, "call_a", "write_file"),
            tool_start(1, "call_b", "write_file"),
            tool_args(0, '{"path": "a.txt", '),
            tool_args(1, '{"path": "b.txt", '),
            tool_args(1, '"content": "B"}'),
            tool_args(0, '"content": "A"}'),
            finish("tool_calls"),
            usage(1, 1),
        ]
    )
    step2 = Stream(chunks=[text("ok"), usage(1, 1)])
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [step1, step2]) as (harness, up):
            sid, _, events = await send(harness)
            workspace = harness.rt.data_dir / "workspaces" / sid
            written = {name: (workspace / name).read_text() for name in ("a.txt", "b.txt")}
    assert written == {"a.txt": "A", "b.txt": "B"}
    executing = [e.data for e in events if e.event == "tool_use.executing"]
    assert [(e["id"], e["input"]) for e in executing] == [
        ("call_a", {"path": "a.txt", "content": "A"}),
        ("call_b", {"path": "b.txt", "content": "B"}),
    ]
    assert events[-1].event == "message.completed"
    messages = up.requests[1]["json"]["messages"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_a", "call_b"]
    assert [(m["role"], m["tool_call_id"]) for m in messages[2:]] == [
        ("tool", "call_a"),
        ("tool", "call_b"),
    ]


async def test_openai_reasoning_content_becomes_thinking(tmp_path: Path) -> None:
    """reasoning_content deltas become a thinking block before the text block."""
    script: list[Response] = [
        Stream(chunks=[reasoning("let me "), reasoning("think"), text("42"), usage(3, 3)])
    ]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, _):
            _, _, events = await send(harness)
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
    assert deltas(events, "thinking.delta") == ["let me ", "think"]
    assert deltas(events) == ["42"]


async def test_openai_without_usage_chunk_bills_an_estimate(tmp_path: Path) -> None:
    """An upstream that sends no usage chunk still completes; the usage is marked estimated."""
    script: list[Response] = [Stream(chunks=[text("hello world")])]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, _):
            _, _, events = await send(harness)
            [record] = await harness.store.usage_records(harness.account)
    assert events[-1].event == "message.completed"
    assert events[-1].data["usage"]["estimated"] is True
    assert record.output_tokens > 0


# -- cancel -------------------------------------------------------------------------


async def test_openai_cancel_mid_stream_closes_the_upstream_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel of an endless upstream stream: 202, message.cancelled, the upstream sees
    the disconnect within a second, nothing billed, no event after the cancel was
    accepted but the terminal."""
    # A spy on the moment of acceptance: the buffer is sealed then, synchronously.
    at_seal: dict[str, int] = {}
    seal = EventBuffer.seal

    def spy(self: EventBuffer) -> None:
        at_seal.setdefault(self.response_id, len(self))
        seal(self)

    monkeypatch.setattr(EventBuffer, "seal", spy)
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [Stream.endless(delay=0.01)]) as (harness, up):
            sid = await new_session(harness.client)
            url = messages_url(sid)
            async with harness.client.stream("POST", url, json={"message": "go"}) as r:
                rid = r.headers["X-Response-Id"]
                stream = SSEStream.of(r)
                await stream.until("text.delta")
                await stream.until("text.delta")
                cancel = await harness.client.post(turn_url(sid, rid, "/cancel"))
                await stream.rest()
            with trio.fail_after(1):
                await up.wait_disconnected(0)
            sent = up.chunks_sent[0]
            body = (await harness.client.get(turn_url(sid, rid))).json()
            await trio.sleep(0.05)  # five paces: the fake must not write again
            assert up.chunks_sent[0] == sent
            await assert_unbilled(harness)
    assert cancel.status_code == 202
    assert cancel.json() == {"response_id": rid, "status": "cancelling"}
    events = stream.events
    assert_contiguous(events)
    assert events[-1].event == "message.cancelled"
    assert events[-1].data["reason"] == "client_cancel"
    assert [e.event for e in events[at_seal[rid] :]] == ["message.cancelled"]
    assert set(types(events[:-1])) == {"message.created", "text.start", "text.delta"}
    assert body["status"] == "cancelled"
    assert body["output_text"] == "".join(deltas(events))
    assert 2 <= len(deltas(events)) <= sent
    assert len(up.requests) == 1


async def test_openai_stateless_cancel_closes_the_upstream_connection(tmp_path: Path) -> None:
    """POST /v1/responses/{rid}/cancel: response.cancelled and the upstream sees it."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [Stream.endless(delay=0.01)]) as (harness, up):
            async with harness.client.stream(
                "POST", "/v1/responses", json={"input": "go", "stream": True}
            ) as r:
                rid = r.headers["X-Response-Id"]
                stream = SSEStream.of(r)
                await stream.until("response.output_text.delta")
                cancel = await harness.client.post(f"/v1/responses/{rid}/cancel")
                await stream.rest()
            with trio.fail_after(1):
                await up.wait_disconnected(0)
            await assert_unbilled(harness)
    assert cancel.status_code == 202
    assert stream.events[-1].event == "response.cancelled"


@pytest.mark.parametrize("case", ["no headers", "retry wait"])
async def test_openai_cancel_before_the_first_token(tmp_path: Path, case: str) -> None:
    """A cancel while the upstream has not answered, or while the model waits to
    retry a 429 (Retry-After: 20), lands at once: message.cancelled, no retry."""
    scripts: dict[str, list[Response]] = {
        "no headers": [Hang()],
        "retry wait": [Status(code=429, headers={"Retry-After": "20"}), GOOD],
    }
    script = scripts[case]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, up):
            sid = await new_session(harness.client)
            url = messages_url(sid)
            async with harness.client.stream("POST", url, json={"message": "go"}) as r:
                rid = r.headers["X-Response-Id"]
                await up.wait_requests(1)
                cancel = await harness.client.post(turn_url(sid, rid, "/cancel"))
                events = await SSEStream.of(r).rest()
            if case == "no headers":
                with trio.fail_after(1):
                    await up.wait_disconnected(0)
            await assert_unbilled(harness)
    assert cancel.status_code == 202
    assert types(events) == ["message.created", "message.cancelled"]
    assert len(up.requests) == 1


# -- retries --------------------------------------------------------------------------


async def test_openai_retries_429_and_500_before_output(tmp_path: Path) -> None:
    """429 then 500 (Retry-After: 0) then a good stream: completes after 3 requests,
    each the same request; billed once."""
    script: list[Response] = [
        Status(code=429, headers={"Retry-After": "0"}),
        Status(code=500, headers={"Retry-After": "0"}),
        GOOD,
    ]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, up):
            _, _, events = await send(harness)
            records = await harness.store.usage_records(harness.account)
    assert types(events) == TEXT_TYPES
    assert len(up.requests) == 3
    assert all(r["json"] == up.requests[0]["json"] for r in up.requests)
    assert len(records) == 1


async def test_openai_retry_honours_retry_after(tmp_path: Path) -> None:
    """A 429 with Retry-After: 1 is retried no sooner than a second later."""
    script: list[Response] = [Status(code=429, headers={"Retry-After": "1"}), GOOD]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, up):
            _, _, events = await send(harness)
    assert events[-1].event == "message.completed"
    first, second = up.requests
    assert second["at"] - first["at"] >= 0.95


async def test_openai_429_every_try_fails_the_turn(tmp_path: Path) -> None:
    """429 on each of the 3 tries: message.error with upstream_error, unbilled."""
    script: list[Response] = [Status(code=429, headers={"Retry-After": "0"})]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script, max_tries=3) as (harness, up):
            _, _, events = await send(harness)
            await assert_unbilled(harness)
    assert types(events) == ["message.created", "message.error"]
    assert "429" in assert_upstream_error(events)
    assert len(up.requests) == 3


async def test_openai_long_retry_after_is_not_waited_for(tmp_path: Path) -> None:
    """A 429 asking for an hour's wait fails the turn at once instead of sleeping."""
    script: list[Response] = [Status(code=429, headers={"Retry-After": "3600"}), GOOD]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, up):
            _, _, events = await send(harness)
    assert "429" in assert_upstream_error(events)
    assert len(up.requests) == 1


async def test_openai_no_retry_once_output_streamed(tmp_path: Path) -> None:
    """A stream that resets after its first text fails the turn; it is not retried."""
    script: list[Response] = [
        Stream(chunks=[text("partial "), text("never")], reset_after=1),
        GOOD,
    ]
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, up):
            _, _, events = await send(harness)
            await assert_unbilled(harness)
    assert deltas(events) == ["partial "]
    assert_upstream_error(events)
    assert len(up.requests) == 1


@pytest.mark.parametrize("code", [400, 401, 404, 422])
async def test_openai_4xx_is_not_retried(tmp_path: Path, code: int) -> None:
    """An upstream 4xx (but 429) fails the turn at once: one request, upstream_error."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [Status(code=code)]) as (harness, up):
            _, _, events = await send(harness)
            await assert_unbilled(harness)
    assert types(events) == ["message.created", "message.error"]
    assert str(code) in assert_upstream_error(events)
    assert len(up.requests) == 1


async def test_openai_unreachable_upstream_fails_the_turn(tmp_path: Path) -> None:
    """Nothing listening at base_url: message.error with upstream_error, unbilled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is closed again: connecting is refused.
    with trio.fail_after(TIMEOUT):
        async with (
            OpenAIModel(base_url=f"http://127.0.0.1:{port}/v1", model="fake", max_tries=1) as model,
            open_harness(tmp_path, cast("FakeModel", model)) as harness,
        ):
            _, _, events = await send(harness)
            await assert_unbilled(harness)
    assert types(events) == ["message.created", "message.error"]
    assert_upstream_error(events)


# -- broken streams -------------------------------------------------------------------

BROKEN: Final[dict[str, Response]] = {
    "malformed chunk": Stream(chunks=[text("a"), raw(b"data: {not json\n\n"), usage(1, 1)]),
    "no [DONE]": Stream(chunks=[text("a"), usage(1, 1)], done=False),
    "error object": Stream(chunks=[text("a"), {"error": {"message": "overloaded"}}]),
    "stall": Stream(chunks=[text("a")], stall_after=1),
    "no headers": Hang(),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_openai_broken_stream_fails_turn_and_server_keeps_serving(
    tmp_path: Path, case: str
) -> None:
    """A malformed chunk, a stream without [DONE], an error object, a stall or no
    answer past read_timeout: message.error with upstream_error, unbilled, the
    upstream connection closed; the next turn on a good upstream completes."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [BROKEN[case]], read_timeout=0.5) as (harness, up):
            _, _, events = await send(harness)
            assert_upstream_error(events)
            await assert_unbilled(harness)
            if case in ("stall", "no headers"):
                with trio.fail_after(1):
                    await up.wait_disconnected(0)
            up.script = [GOOD]
            _, _, after = await send(harness)
            records = await harness.store.usage_records(harness.account)
    assert len(up.requests) == 2
    assert types(after) == TEXT_TYPES
    assert len(records) == 1


# -- the API key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        [GOOD],
        [Status(code=400)],
        [Stream(chunks=[text("a"), raw(b"data: {oops\n\n")])],
        [Stream(chunks=[text("a")], reset_after=1)],
        [Status(code=503, headers={"Retry-After": "0"})],
    ],
    ids=["ok", "400", "malformed", "reset", "503"],
)
async def test_openai_api_key_never_in_events(tmp_path: Path, script: list[Response]) -> None:
    """The API key appears in no event, error, history or response body."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script, api_key=SECRET) as (harness, up):
            sid = await new_session(harness.client)
            response = await harness.client.post(messages_url(sid), json={"message": "hi"})
            rid = response.headers["X-Response-Id"]
            looked_up = await harness.client.get(turn_url(sid, rid))
            history = await harness.client.get(messages_url(sid))
            stateless = await harness.client.post(
                "/v1/responses", json={"input": "hi", "stream": True}
            )
    assert up.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    for body in (response.text, looked_up.text, history.text, stateless.text):
        assert SECRET not in body
    assert SECRET not in repr(harness.rt.model)


async def test_openai_api_key_echoed_by_upstream_is_not_repeated(tmp_path: Path) -> None:
    """An upstream error body that quotes the key does not carry it into the error text."""
    body = {"error": {"message": f"Incorrect API key provided: {SECRET}", "code": 401}}
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [Status(code=401, body=body)], api_key=SECRET) as (
            harness,
            _,
        ):
            _, _, events = await send(harness)
    assert_upstream_error(events, secret=SECRET)


# -- stateless ------------------------------------------------------------------------


async def test_openai_stateless_response_streams_to_completed(tmp_path: Path) -> None:
    """POST /v1/responses on the OpenAI model streams response.* to response.completed;
    no tools are offered."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [GOOD]) as (harness, up):
            response = await harness.client.post(
                "/v1/responses", json={"input": "hi", "stream": True}
            )
            records = await harness.store.usage_records(harness.account)
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert_contiguous(events)
    assert events[0].event == "response.created"
    assert [e.data["delta"] for e in events if e.event == "response.output_text.delta"] == [
        "hello ",
        "world",
    ]
    completed = events[-1]
    assert completed.event == "response.completed"
    assert completed.data["response"]["output_text"] == "hello world"
    assert completed.data["response"]["usage"] == {
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
        "input_tokens": 11,
        "output_tokens": 4,
        "total_tokens": 15,
    }
    [record] = records
    assert record.session_id is None
    [request] = up.requests
    assert request["json"]["messages"][-1] == {"role": "user", "content": "hi"}
    assert "tools" not in request["json"]


@pytest.mark.parametrize(
    "script",
    [[Status(code=400)], [Stream(chunks=[text("a")], done=False)]],
    ids=["400", "no-done"],
)
async def test_openai_stateless_failure_is_response_failed(
    tmp_path: Path, script: list[Response]
) -> None:
    """An upstream failure ends a stateless turn response.failed with upstream_error."""
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, script) as (harness, _):
            response = await harness.client.post(
                "/v1/responses", json={"input": "hi", "stream": True}
            )
            await assert_unbilled(harness)
    events = parse_sse(response.text)
    assert_contiguous(events)
    failed = events[-1]
    assert failed.event == "response.failed"
    assert failed.data["response"]["status"] == "failed"
    assert "upstream_error" in failed.data["response"]["error"]["message"]


# -- resources ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "done",
        "malformed",
        "cancel",
    ],
)
async def test_openai_leaves_no_half_read_httpx_generators(tmp_path: Path, case: str) -> None:
    """However a stream ends (at [DONE], on a bad chunk, by cancel), every httpx
    generator is finished: none is left for the garbage collector to warn about."""
    scripts: dict[str, list[Response]] = {
        "done": [GOOD],
        "malformed": [Stream(chunks=[text("a"), raw(b"data: {nope\n\n")])],
        "cancel": [Stream.endless(delay=0.01)],
    }
    script = scripts[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trio.fail_after(TIMEOUT):
            async with open_stack(tmp_path, script) as (harness, _):
                sid = await new_session(harness.client)
                url = messages_url(sid)
                async with harness.client.stream("POST", url, json={"message": "hi"}) as r:
                    stream = SSEStream.of(r)
                    if case == "cancel":
                        await stream.until("text.delta")
                        rid = r.headers["X-Response-Id"]
                        await harness.client.post(turn_url(sid, rid, "/cancel"))
                    await stream.rest()
                gc.collect()
    abandoned = [str(w.message) for w in caught if str(w.message).startswith(ABANDONED)]
    assert abandoned == []


async def test_openai_stateless_function_call_round_trip(tmp_path: Path) -> None:
    """Client tools reach the upstream as chat-completions tools; its tool call comes back
    as a function_call item; a function_call_output continues the conversation."""
    call = Stream(
        chunks=[
            tool_start(0, "call_w", "get_weather"),
            tool_args(0, '{"city": '),
            tool_args(0, '"Paris"}'),
            finish("tool_calls"),
            usage(20, 6),
        ]
    )
    answer = Stream(chunks=[text("It is sunny."), finish("stop"), usage(30, 4)])
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    with trio.fail_after(TIMEOUT):
        async with open_stack(tmp_path, [call, answer]) as (harness, up):
            first = await harness.client.post(
                "/v1/responses",
                json={"input": "weather?", "tools": [tool], "tool_choice": "required"},
            )
            [item] = [i for i in first.json()["output"] if i["type"] == "function_call"]
            second = await harness.client.post(
                "/v1/responses",
                json={
                    "tools": [tool],
                    "input": [
                        {"role": "user", "content": "weather?"},
                        {k: item[k] for k in ("type", "call_id", "name", "arguments")},
                        {"type": "function_call_output", "call_id": "call_w", "output": "sunny"},
                    ],
                },
            )
    assert (item["call_id"], item["name"], item["status"]) == ("call_w", "get_weather", "completed")
    assert json.loads(item["arguments"]) == {"city": "Paris"}
    assert second.json()["output_text"] == "It is sunny."
    sent_first, sent_second = (r["json"] for r in up.chat_requests())
    assert sent_first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": tool["parameters"],
            },
        }
    ]
    assert sent_first["tool_choice"] == "required"
    assert sent_second["messages"][1]["tool_calls"][0]["id"] == "call_w"
    assert sent_second["messages"][2] == {
        "role": "tool",
        "tool_call_id": "call_w",
        "content": "sunny",
    }

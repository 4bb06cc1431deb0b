"""Self-tests of the fake OpenAI upstream (tests/fake_upstream.py) with plain clients.

Real sockets and the real clock, each test under a ``trio.fail_after`` guard.
Mid-stream disconnects use a bare socket: closing an httpx stream after a
partial read leaves its nested async generators to the garbage collector.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from bench.fake_upstream import (
    FakeUpstream,
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

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

TIMEOUT: Final = 10
BODY: Final = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def data_lines(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line.removeprefix("data: ") for line in body.split("\n") if line.startswith("data: ")]


async def post(up: FakeUpstream, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(**kwargs) as client:
        return await client.post(
            f"{up.base_url}/chat/completions", json=BODY, headers={"Authorization": "Bearer k"}
        )


class RawStream:
    """A chat-completions request over a bare socket, read chunk by chunk."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.received = b""

    async def until(self, data: bytes) -> None:
        """Receive until ``data`` has been seen."""
        while data not in self.received:
            more = await self.sock.receive_some()
            assert more, f"closed before {data!r}; received {self.received!r}"
            self.received += more


@asynccontextmanager
async def open_raw(up: FakeUpstream) -> AsyncIterator[RawStream]:
    """POST over a bare socket; leaving the block closes it (a client going away)."""
    url = httpx.URL(up.base_url)
    assert url.port is not None
    body = json.dumps(BODY).encode()
    sock = await trio.open_tcp_stream(url.host, url.port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    async with sock:
        await sock.send_all(head.encode() + body)
        yield RawStream(sock)


async def test_fake_upstream_streams_chunks_and_done() -> None:
    """A Stream is chunked SSE: one chat.completion.chunk per chunk, then [DONE]."""
    chunks = [
        reasoning("hmm"),
        text("hel"),
        text("lo"),
        tool_start(0, "call_1", "write_file"),
        tool_args(0, '{"path":'),
        finish("tool_calls"),
        usage(7, 3),
    ]
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream([Stream(chunks=chunks)]) as up:
            response = await post(up)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    *frames, done = data_lines(response.text)
    assert done == "[DONE]"
    parsed = [json.loads(f) for f in frames]
    for frame in parsed:
        assert frame.pop("id") == "chatcmpl-fake"
        assert frame.pop("object") == "chat.completion.chunk"
        assert frame.pop("created") == 0
        assert frame.pop("model") == "gpt-test"
    assert parsed == chunks
    assert parsed[0]["choices"][0]["delta"] == {"reasoning_content": "hmm"}
    assert parsed[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    [request] = up.requests
    assert (request["method"], request["path"]) == ("POST", "/v1/chat/completions")
    assert request["headers"]["authorization"] == "Bearer k"
    assert request["json"] == BODY
    assert up.chunks_sent == {0: len(chunks)}
    assert up.disconnected_at == {}
    assert up.active == 0


async def test_fake_upstream_without_done_and_raw_bytes() -> None:
    """done=False ends the body cleanly without [DONE]; raw() bytes go out verbatim."""
    script = [Stream(chunks=[text("a"), raw(b"data: {not json\n\n")], done=False)]
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream(script) as up:
            response = await post(up)
    assert response.status_code == 200
    assert response.text.endswith("data: {not json\n\n")
    assert "[DONE]" not in response.text


async def test_fake_upstream_status_429_retry_after_then_script_moves_on() -> None:
    """Status answers its code, headers and a JSON error; each request takes the next
    response of the script, and the last one repeats."""
    script: list[Response] = [
        Status(code=429, headers={"Retry-After": "1"}),
        Stream(chunks=[text("ok")]),
    ]
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream(script) as up:
            first = await post(up)
            second = await post(up)
            third = await post(up)
            async with httpx.AsyncClient() as client:
                missing = await client.get(f"{up.base_url}/models")
    assert first.status_code == 429
    assert first.headers["retry-after"] == "1"
    assert first.json()["error"]["code"] == 429
    assert [second.status_code, third.status_code] == [200, 200]
    assert data_lines(third.text)[-1] == "[DONE]"
    assert missing.status_code == 404
    assert len(up.requests) == 4
    assert len(up.chat_requests()) == 3


async def test_fake_upstream_records_disconnect_within_50ms_mid_stream() -> None:
    """A client closing mid-stream is recorded at once, with the chunks sent before."""
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream([Stream.endless(delay=0.2)]) as up:
            async with open_raw(up) as client:
                await client.until(b"tok ")
                closed_at = trio.current_time()
            gone_at = await up.wait_disconnected(0)
            # Half the pace: the fake noticed the FIN, not a failing write.
            assert gone_at - closed_at < 0.05
            assert up.chunks_sent[0] == 1
    assert up.active == 0


async def test_fake_upstream_stall_holds_until_the_client_goes() -> None:
    """stall_after=k sends k chunks, then nothing; the client's close is recorded."""
    script = [Stream(chunks=[text("a"), text("b")], stall_after=1)]
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream(script) as up:
            async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.3)) as client:
                url = f"{up.base_url}/chat/completions"
                async with client.stream("POST", url, json=BODY) as response:
                    assert response.status_code == 200
                    with pytest.raises(httpx.ReadTimeout):
                        await response.aread()
            await up.wait_disconnected(0)
    assert up.chunks_sent == {0: 1}


async def test_fake_upstream_hang_sends_no_headers() -> None:
    """Hang answers nothing: the client's read times out; its close is recorded."""
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream([Hang()]) as up:
            with pytest.raises(httpx.ReadTimeout):
                await post(up, timeout=httpx.Timeout(5, read=0.2))
            await up.wait_disconnected(0)


async def test_fake_upstream_reset_after_k_chunks() -> None:
    """reset_after=k resets the connection after k chunks; not recorded as a disconnect."""
    script = [Stream(chunks=[text("a"), text("b"), text("c")], reset_after=2)]
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream(script) as up:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await post(up)
    assert up.chunks_sent == {0: 2}
    assert up.disconnected_at == {}


async def test_fake_upstream_serves_many_connections_at_once() -> None:
    """Twenty paced streams run concurrently (the benchmark's load)."""
    script = [Stream(chunks=[text(str(i)) for i in range(5)], delay=0.05)]
    with trio.fail_after(TIMEOUT):
        async with open_fake_upstream(script) as up:
            results: list[httpx.Response] = []
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:

                async def one() -> None:
                    url = f"{up.base_url}/chat/completions"
                    results.append(await client.post(url, json=BODY))

                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(one)
    assert [r.status_code for r in results] == [200] * 20
    assert all(len(data_lines(r.text)) == 6 for r in results)
    assert up.max_active == 20
    assert up.active == 0

"""A fake OpenAI-compatible chat-completions server on trio sockets, for tests and benchmarks.

Theory of operation
-------------------
``open_fake_upstream(script)`` serves HTTP/1.1 on ``127.0.0.1:0`` with
``trio.serve_tcp``; every connection is one handler task, which reads one
request (headers and a ``Content-Length`` body), records it in
``up.requests``, answers it and closes the connection (``Connection: close``:
no keep-alive, so each request of a client is a new connection and a test can
tell requests apart by index).

``POST /v1/chat/completions`` consumes the next response of ``up.script``
(the last one repeats; ``up.script`` may be replaced between requests):

* :class:`Stream` answers ``200 text/event-stream`` with a chunked body, one
  HTTP chunk per SSE frame ``data: {json}\\n\\n``; then ``data: [DONE]``
  unless ``done=False``; then the terminating zero-length chunk. It can
  stall forever or reset the connection (RST, via ``SO_LINGER`` 0) after k
  chunks, or stream text forever (:meth:`Stream.endless`).
* :class:`Status` answers a non-streaming status with a JSON error body.
* :class:`Hang` answers nothing at all (a read timeout before the headers).

While a :class:`Stream` or :class:`Hang` is answered, a second task of the
handler sits in ``receive_some`` on the same socket: the client sends nothing
after its request, so that call returns only when the client closes (``b""``
on FIN, ``BrokenResourceError`` on RST). That is how an idle or slowly paced
stream notices a client that went away at once rather than at its next write;
a failing write is the other way. Either records ``up.disconnected_at[i]``
(``trio.current_time()``) and wakes :meth:`FakeUpstream.wait_disconnected`;
``up.chunks_sent[i]`` counts the chunks written before the stream ended,
however it ended, and ``up.chunk_times[i]`` holds when each was written
(``trio.current_time()`` after its ``send_all``, ascending), so a benchmark
can count the tokens produced after a given moment. A stream that the fake
itself finished or reset is not a disconnect.
"""

from __future__ import annotations

import json
import socket
import struct
from contextlib import asynccontextmanager
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

#: Largest request head (request line and headers) the fake accepts.
MAX_HEAD: Final = 64 * 1024
CHAT_PATH: Final = "/v1/chat/completions"


# -- script -------------------------------------------------------------------


@attrs.frozen
class Raw:
    """Bytes written to the stream verbatim (no ``data: `` framing added)."""

    data: bytes


#: A stream chunk: a dict serialised as an OpenAI ``chat.completion.chunk``
#: (``id``, ``object``, ``created`` and ``model`` are added), or raw bytes.
Chunk = dict[str, Any] | Raw


@attrs.frozen(kw_only=True)
class Stream:
    """A ``200 text/event-stream`` answer.

    Args:
      chunks: written in order, ``delay`` seconds apart.
      done: end with ``data: [DONE]`` (False: the body just ends).
      delay: seconds between consecutive chunks (not before the first).
      stall_after: after this many chunks, send nothing more until the client
        goes away.
      reset_after: after this many chunks, reset the connection (RST).
      forever: after ``chunks``, write this chunk again and again (every
        ``delay`` seconds) until the client goes away; see :meth:`endless`.
    """

    chunks: Sequence[Chunk] = ()
    done: bool = True
    delay: float = 0.0
    stall_after: int | None = None
    reset_after: int | None = None
    forever: Chunk | None = None

    @classmethod
    def endless(cls, text_chunk: str = "tok ", delay: float = 0.01) -> Stream:
        """Stream ``text_chunk`` forever, one chunk every ``delay`` seconds."""
        return cls(forever=text(text_chunk), delay=delay, done=False)

    def iter_chunks(self) -> Iterator[Chunk]:
        yield from self.chunks
        if self.forever is not None:
            while True:
                yield self.forever


@attrs.frozen(kw_only=True)
class Status:
    """A plain (non-streaming) answer: ``code`` with ``headers`` and ``body``.

    ``body`` None is an OpenAI-style JSON error; a dict is sent as JSON, a
    str or bytes as is.
    """

    code: int
    headers: dict[str, str] = attrs.field(factory=dict)
    body: dict[str, Any] | str | bytes | None = None

    def payload(self) -> tuple[bytes, str]:
        """The body's bytes and content type."""
        body = self.body
        if body is None:
            body = {
                "error": {
                    "message": f"fake upstream says {self.code}",
                    "type": "fake_error",
                    "code": self.code,
                }
            }
        if isinstance(body, dict):
            return json.dumps(body).encode(), "application/json"
        if isinstance(body, str):
            return body.encode(), "text/plain; charset=utf-8"
        return body, "application/octet-stream"


@attrs.frozen
class Hang:
    """Read the request, then answer nothing until the client goes away."""


Response = Stream | Status | Hang


# -- chunk constructors --------------------------------------------------------


def _delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta}]}


def text(s: str) -> dict[str, Any]:
    """A content delta."""
    return _delta({"content": s})


def reasoning(s: str) -> dict[str, Any]:
    """A ``reasoning_content`` delta (DeepSeek / vLLM style reasoning)."""
    return _delta({"reasoning_content": s})


def tool_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    """The first delta of tool call ``index``: its id, its name, no arguments yet."""
    call = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    return _delta({"tool_calls": [call]})


def tool_args(index: int, fragment: str) -> dict[str, Any]:
    """A fragment of tool call ``index``'s JSON arguments."""
    return _delta({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})


def usage(prompt: int, completion: int) -> dict[str, Any]:
    """The final usage chunk (``stream_options.include_usage``): no choices."""
    return {
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def finish(reason: str = "stop") -> dict[str, Any]:
    """The chunk carrying ``finish_reason`` (``stop``, ``tool_calls``, ``length``…)."""
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def raw(data: bytes) -> Raw:
    """Bytes written as they are: malformed frames, comments, partial lines."""
    return Raw(data)


# -- the server ----------------------------------------------------------------


class _BadRequest(Exception):
    pass


@final
@attrs.define(eq=False)
class FakeUpstream:
    """A running fake upstream; see the module docstring. Get one from
    :func:`open_fake_upstream`."""

    script: list[Response]
    base_url: str = ""
    #: Every request, in arrival order: ``method``, ``path``, ``headers``
    #: (lowercased names), ``json`` (None if the body is not JSON), ``body``,
    #: ``at`` (``trio.current_time()`` when it was read).
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    #: Request index -> ``trio.current_time()`` when the client was seen gone.
    disconnected_at: dict[int, float] = attrs.field(factory=dict)
    #: Request index -> chunks written (``[DONE]`` not counted).
    chunks_sent: dict[int, int] = attrs.field(factory=dict)
    #: Request index -> ``trio.current_time()`` when each of those chunks was
    #: written, ascending (``len(chunk_times[i]) == chunks_sent[i]``).
    chunk_times: dict[int, list[float]] = attrs.field(factory=dict)
    #: Connections open now, and the most open at once.
    active: int = 0
    max_active: int = 0
    _served: int = attrs.field(default=0, init=False)
    _disconnects: dict[int, trio.Event] = attrs.field(factory=dict, init=False)
    _arrivals: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def wait_disconnected(self, index: int) -> float:
        """Wait until the client of request ``index`` has gone; return when it went."""
        await self._disconnect_event(index).wait()
        return self.disconnected_at[index]

    async def wait_requests(self, count: int) -> None:
        """Wait until ``count`` requests have arrived."""
        while len(self.requests) < count:
            await self._arrivals.wait()
        await trio.lowlevel.checkpoint()

    def chat_requests(self) -> list[dict[str, Any]]:
        """The recorded ``POST /v1/chat/completions`` requests."""
        return [r for r in self.requests if (r["method"], r["path"]) == ("POST", CHAT_PATH)]

    def _disconnect_event(self, index: int) -> trio.Event:
        return self._disconnects.setdefault(index, trio.Event())

    def _gone(self, index: int) -> None:
        if index not in self.disconnected_at:
            self.disconnected_at[index] = trio.current_time()
            self._disconnect_event(index).set()

    def _next_response(self) -> Response:
        if not self.script:
            raise RuntimeError("the fake upstream has an empty script")
        response = self.script[min(self._served, len(self.script) - 1)]
        self._served += 1
        return response

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection: one request, one answer, close."""
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            async with stream:
                await self._serve_one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; what it needs to know is recorded
        finally:
            self.active -= 1

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        try:
            request = await _read_request(stream)
        except _BadRequest as exc:
            await _send_status(stream, Status(code=400, body=str(exc)))
            return
        if request is None:
            return
        index = len(self.requests)
        self.requests.append(request)
        self._arrivals.set()
        self._arrivals = trio.Event()
        if request["path"] != CHAT_PATH:
            await _send_status(stream, Status(code=404))
            return
        if request["method"] != "POST":
            await _send_status(stream, Status(code=405, headers={"Allow": "POST"}))
            return
        response = self._next_response()
        if isinstance(response, Status):
            await _send_status(stream, response)
        else:
            model = request["json"].get("model") if isinstance(request["json"], dict) else None
            await self._stream(stream, index, response, str(model))

    async def _stream(
        self, stream: trio.SocketStream, index: int, response: Stream | Hang, model: str
    ) -> None:
        self.chunks_sent[index] = 0
        self.chunk_times[index] = []
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                # The only bytes after the request would be a pipelined
                # request, which httpx never sends; wait for the close.
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
                self._gone(index)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                if isinstance(response, Hang):
                    await trio.sleep_forever()
                else:
                    await self._write_stream(stream, index, response, model, nursery)
            except trio.BrokenResourceError:
                self._gone(index)
            nursery.cancel_scope.cancel()

    async def _write_stream(
        self,
        stream: trio.SocketStream,
        index: int,
        response: Stream,
        model: str,
        nursery: trio.Nursery,
    ) -> None:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        sent = 0
        times = self.chunk_times[index]
        for chunk in response.iter_chunks():
            if await self._interrupt(stream, response, sent, nursery):
                return
            if sent and response.delay:
                await trio.sleep(response.delay)
            data = _frame(chunk, model)
            if data:  # an empty HTTP chunk would end the body
                await stream.send_all(_http_chunk(data))
            sent += 1
            self.chunks_sent[index] = sent
            times.append(trio.current_time())
        if await self._interrupt(stream, response, sent, nursery):
            return
        if response.done:
            if sent and response.delay:
                await trio.sleep(response.delay)
            await stream.send_all(_http_chunk(b"data: [DONE]\n\n"))
        await stream.send_all(b"0\r\n\r\n")

    async def _interrupt(
        self, stream: trio.SocketStream, response: Stream, sent: int, nursery: trio.Nursery
    ) -> bool:
        """Stall (forever) or reset here if the response says so after ``sent`` chunks."""
        if response.stall_after is not None and sent >= response.stall_after:
            await trio.sleep_forever()
        if response.reset_after is not None and sent >= response.reset_after:
            # Stop the watcher first: closing a socket under a pending
            # receive would look like a client disconnect.
            nursery.cancel_scope.cancel()
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            return True
        return False


@asynccontextmanager
async def open_fake_upstream(script: Sequence[Response]) -> AsyncIterator[FakeUpstream]:
    """Serve ``script`` on a free loopback port until the block exits.

    Cancellation: leaving the block cancels the listener and every open
    connection (clients see them closed).
    """
    up = FakeUpstream(script=list(script))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, up.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        up.base_url = f"http://127.0.0.1:{port}/v1"
        try:
            yield up
        finally:
            nursery.cancel_scope.cancel()


# -- HTTP/1.1, just enough -----------------------------------------------------


async def _read_request(stream: trio.SocketStream) -> dict[str, Any] | None:
    """One request with its ``Content-Length`` body; None if the client sent nothing."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise _BadRequest("request head too large")
        more = await stream.receive_some()
        if not more:
            if data:
                raise _BadRequest("connection closed inside the request head")
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = request_line.split(" ")
    except ValueError:
        raise _BadRequest(f"bad request line {request_line!r}") from None
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest("chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest("bad Content-Length") from None
    while len(body) < length:
        more = await stream.receive_some()
        if not more:
            raise _BadRequest("connection closed inside the request body")
        body += more
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return {
        "method": method,
        "path": target.partition("?")[0],
        "headers": headers,
        "json": parsed,
        "body": body,
        "at": trio.current_time(),
    }


async def _send_status(stream: trio.SocketStream, response: Status) -> None:
    payload, content_type = response.payload()
    try:
        phrase = HTTPStatus(response.code).phrase
    except ValueError:
        phrase = "Unknown"
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(payload)),
        "Connection": "close",
        **response.headers,
    }
    head = f"HTTP/1.1 {response.code} {phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    await stream.send_all(head.encode("latin-1") + b"\r\n" + payload)


def _frame(chunk: Chunk, model: str) -> bytes:
    if isinstance(chunk, Raw):
        return chunk.data
    envelope = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        **chunk,
    }
    return b"data: " + json.dumps(envelope).encode() + b"\n\n"


def _http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"

"""A minimal HTTP/1.1 + SSE client on raw trio streams, for the load generator.

The benchmark's client must cost the server's measurement as little as
possible: per event it de-chunks, splits SSE frames at ``\n\n`` and reads the
event type, without decoding the JSON of deltas. httpx costs ~2 ms per
request here (measured): it would measure itself.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import time
from typing import Any, Final, final
from urllib.parse import urlsplit

import attrs
import trio

#: Bytes per ``receive_some``.
RECV_SIZE: Final = 65536
#: Largest response head, and largest SSE frame, the client accepts.
MAX_HEAD: Final = 64 * 1024
MAX_FRAME: Final = 1024 * 1024


class ProtocolError(Exception):
    """The server's bytes are not the HTTP/SSE this client expects."""


# -- HTTP/1.1 on a raw stream ------------------------------------------------------


@attrs.frozen
class Origin:
    """Where requests go: connection target, Host header, path prefix, TLS."""

    host: str
    port: int
    tls: bool
    prefix: str
    #: Request head lines every request carries (Host, Authorization).
    common: bytes

    @classmethod
    def parse(cls, url: str, api_key: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if tls else 80)
        netloc = parts.netloc.rpartition("@")[2]
        common = f"Host: {netloc}\r\nAuthorization: Bearer {api_key}\r\n".encode()
        return cls(host, port, tls, parts.path.rstrip("/"), common)

    @property
    def is_loopback(self) -> bool:
        """The server runs on this machine (its processes are ours to observe)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    async def connect(self) -> Connection:
        tcp = await trio.open_tcp_stream(self.host, self.port)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.tls:
            return Connection(tcp, self)
        tls = trio.SSLStream(
            tcp, ssl.create_default_context(), server_hostname=self.host, https_compatible=True
        )
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return Connection(tls, self)


@attrs.frozen
class Head:
    """A response's status line and headers (names lower-cased)."""

    status: int
    headers: dict[str, str]


@final
class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder: feed bytes, get the data."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._left = 0  # data bytes of the current chunk not yet read
        self._crlf = False  # the CRLF after a chunk's data is due
        self._trailer = False  # after the last chunk: trailer lines until an empty one
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if not (self._pending or self._left or self._crlf or self._trailer):
            # Fast path: ``data`` is exactly one whole chunk (one read of a
            # server that writes a chunk per batch of events; the usual case).
            end = data.find(b"\r\n", 0, 18)
            if end > 0 and data.endswith(b"\r\n"):
                try:
                    size = int(data[:end], 16)
                except ValueError:
                    size = 0  # chunk extensions: the general path below
                if size and len(data) == end + size + 4:
                    return data[end + 2 : end + 2 + size]
        pending = self._pending
        pending += data
        out = bytearray()
        while not self.done:
            if self._left:
                take = pending[: self._left]
                out += take
                del pending[: len(take)]
                self._left -= len(take)
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if len(pending) < 2:
                    break
                if pending[:2] != b"\r\n":
                    raise ProtocolError("a chunk's data is not followed by CRLF")
                del pending[:2]
                self._crlf = False
            end = pending.find(b"\r\n")
            if end < 0:
                if len(pending) > 1024:
                    raise ProtocolError("chunk size line too long")
                break
            line = bytes(pending[:end])
            del pending[: end + 2]
            if self._trailer:
                self.done = not line
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                self._trailer = True
            else:
                self._left = size
        return bytes(out)

    def leftover(self) -> bytes:
        """Bytes fed after the end of the body (the next response's)."""
        return bytes(self._pending)


@final
class Connection:
    """One HTTP/1.1 keep-alive connection; requests on it are sequential."""

    def __init__(self, stream: trio.abc.Stream, origin: Origin) -> None:
        self._stream = stream
        self._origin = origin
        self._buf = bytearray()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    def encode(self, method: str, path: str, body: bytes = b"") -> bytes:
        """A request's bytes (JSON body, if any)."""
        origin = self._origin
        if body or method in ("POST", "PUT"):
            length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        else:
            length = "\r\n"
        line = f"{method} {origin.prefix}{path} HTTP/1.1\r\n"
        return line.encode() + origin.common + length.encode() + body

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def send(self, method: str, path: str, body: bytes = b"") -> float:
        """Write a request; return ``time.perf_counter()`` from just before the write."""
        data = self.encode(method, path, body)
        sent = time.perf_counter()
        await self._stream.send_all(data)
        return sent

    async def _receive(self) -> bytes:
        # bytes() of a bytes object is that object: no copy on sockets.
        return bytes(await self._stream.receive_some(RECV_SIZE))

    async def read_head(self) -> Head:
        """Read the status line and headers (1xx answers are skipped)."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            while end < 0:
                if len(self._buf) > MAX_HEAD:
                    raise ProtocolError("response head too large")
                chunk = await self._receive()
                if not chunk:
                    raise ProtocolError("the server closed the connection before answering")
                self._buf += chunk
                end = self._buf.find(b"\r\n\r\n", max(0, len(self._buf) - len(chunk) - 3))
            lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            status_line = lines[0].split(" ", 2)
            if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
                raise ProtocolError(f"bad status line {lines[0][:80]!r}")
            status = int(status_line[1])
            if 100 <= status < 200:
                continue
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            return Head(status, headers)

    def body(self, head: Head) -> Body:
        """The body of the response whose head was just read."""
        return Body(self, head)

    async def read_body(self, head: Head) -> bytes:
        body = self.body(head)
        parts = []
        while chunk := await body.receive():
            parts.append(chunk)
        return b"".join(parts)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[Head, bytes]:
        await self.send(method, path, body)
        head = await self.read_head()
        return head, await self.read_body(head)


@final
class Body:
    """A response body read as it arrives: :meth:`receive` gives the next
    decoded bytes, ``b""`` at its end."""

    def __init__(self, conn: Connection, head: Head) -> None:
        self._conn = conn
        self._chunked: ChunkedDecoder | None = None
        self._left: int | None = None  # Content-Length bytes still to read
        if head.status in (204, 304):
            self._left = 0
        elif "chunked" in head.headers.get("transfer-encoding", "").lower():
            self._chunked = ChunkedDecoder()
        elif "content-length" in head.headers:
            self._left = int(head.headers["content-length"])
        # else: the body runs to the end of the connection

    async def _next_raw(self) -> bytes:
        conn = self._conn
        if conn._buf:
            data = bytes(conn._buf)
            conn._buf.clear()
            return data
        return await conn._receive()

    async def receive(self) -> bytes:
        decoder = self._chunked
        if decoder is not None:
            while not decoder.done:
                data = await self._next_raw()
                if not data:
                    raise ProtocolError("the connection closed inside a chunked body")
                out = decoder.feed(data)
                if decoder.done:
                    self._conn._buf[:0] = decoder.leftover()
                if out:
                    return out
            return b""
        if self._left is None:
            return await self._next_raw()
        if self._left == 0:
            return b""
        data = await self._next_raw()
        if not data:
            raise ProtocolError(f"the connection closed with {self._left} body bytes to come")
        if len(data) > self._left:
            self._conn._buf[:0] = data[self._left :]
            data = data[: self._left]
        self._left -= len(data)
        return data


# -- SSE, minimally ------------------------------------------------------------------


@final
class FrameSplitter:
    """Splits an SSE body into frames at blank lines (``\\n\\n``)."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._tail + data if self._tail else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        if b"\n\n" not in buf:
            if len(buf) > MAX_FRAME:
                raise ProtocolError("an SSE frame larger than 1 MiB")
            self._tail = buf
            return []
        frames = buf.split(b"\n\n")
        self._tail = frames.pop()
        return frames


def event_type(frame: bytes) -> bytes | None:
    """The ``event:`` of an SSE frame; ``b"message"`` for an unnamed data frame,
    None for a comment (``: ping``) or an empty frame."""
    if frame.startswith(b"event: "):
        start = 7
    else:
        at = frame.find(b"\nevent: ")
        if at < 0:
            if frame.startswith(b"data:") or b"\ndata:" in frame:
                return b"message"
            return None
        start = at + 8
    end = frame.find(b"\n", start)
    return frame[start:] if end < 0 else frame[start:end]


def frame_data(frame: bytes) -> Any:
    """The JSON of a frame's ``data:`` lines (only for the rare frame we must read)."""
    lines = [line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:")]
    return json.loads(b"\n".join(lines))

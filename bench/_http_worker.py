"""One load-generator process of ``bench cancel --url``: cancelled turns over raw sockets.

Run as ``python -m bench._http_worker``; :mod:`bench._http` starts one or more.

Theory of operation
-------------------
The client must measure the server, not itself, so each worker is its own
process (its own core when the machine has one) and keeps per-event work
tiny: HTTP/1.1 is spoken directly on trio sockets; a streamed body is
de-chunked per received chunk, split into frames at blank lines, and of each
frame only the ``event:`` line is read. Deltas are counted by comparing that
type, never JSON-decoded; only the terminal frame of a ``delete`` turn is
decoded (to check its reason).

Per turn (``n`` of this worker, tag ``f"{worker}-{n}"`` in its input), two
connections: the *stream* connection carries the turn's SSE response, the
*control* connection (opened first and kept alive) creates the session, sends
the cancel (or DELETE), polls files and deletes the session at the end. Two
tasks share the turn: the reader reads the stream to its terminal event and
never has a read cancelled (safe for TLS too); the canceller waits for the
cancel point the reader signals (after K events, or a uniform random delay
after the first event drawn from ``random.Random(seed * 1000 + worker)`` in
turn order), then sends the cancel. Scenarios: ``stream`` (and ``upstream``,
the same turns against a server whose model is the fake upstream) cancels
mid-text; ``tool`` asks for a ``run_shell`` call, learns the shell's pid from
the file it writes, cancels (``cancel_at`` does not apply) and, when the
server is on this machine, polls ``killpg(pid, 0)`` until the group is gone;
``delete`` sends ``DELETE`` for the session instead of the cancel and then
checks that its files answer 404. Times are ``time.perf_counter()`` taken
right *before* a request is written (a write yields to the scheduler after
the syscall, so a time taken after it could come after the answer) and right
after the answer's bytes are read.

Line protocol
-------------
stdin: one JSON line, a :class:`WorkerConfig` (``cancel_at`` as its string
form, e.g. ``"20e"`` or ``"0.05-0.2"``); then the worker answers
``{"ready": PID}`` and waits for stdin to close (EOF), which is the start
signal, so that a parent can start several workers' load at one instant.
stdout: then one line ``{"sample": TurnSample}`` per turn (unstructured with
:data:`bench._samples.converter`) as turns end, and last
``{"stats": WorkerStats}``; exit status 0. A bad config gives one line
``{"error": "..."}`` and exit status 2. A turn's failure is its sample's
``error``; it never stops the worker.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import socket
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import urlsplit

import attrs
import cattrs
import trio
from cattrs.v import format_exception

from ._samples import SCENARIOS, CancelAt, TurnSample, converter

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

#: Bytes per ``receive_some``.
RECV_SIZE: Final = 65536
#: Largest response head, and largest SSE frame, the client accepts.
MAX_HEAD: Final = 64 * 1024
MAX_FRAME: Final = 1024 * 1024
#: The ``tool`` scenario's command: the shell (the group leader, ``sh -c`` in
#: its own process group with cwd = the workspace) writes its pid, then
#: becomes ``sleep`` (``exec``: the group stays one process, reaped by the
#: server; an orphaned grandchild would linger as a zombie where init does not
#: reap, and look alive to ``killpg(pgid, 0)``).
TOOL_COMMAND: Final = "echo $$ > bench.pid && exec sleep 60"
PID_FILE: Final = "bench.pid"
#: How often the pid file and the process group are polled, seconds.
PID_POLL: Final = 0.002
GROUP_POLL: Final = 0.0005
#: How often the loop-lag probe wakes, seconds.
LAG_PROBE: Final = 0.01
TERMINALS: Final = frozenset(
    {
        b"message.completed",
        b"message.cancelled",
        b"message.error",
        b"response.completed",
        b"response.cancelled",
        b"response.failed",
        b"response.incomplete",
        b"error",
    }
)


class ProtocolError(Exception):
    """The server's bytes are not the HTTP/SSE this client expects."""


class UnexpectedStatus(Exception):
    """A request was answered with a status the scenario does not expect, or
    the turn went another way than the scenario's."""


class StageError(Exception):
    """A turn's stage failed; the message starts with the stage's name."""


def _error_text(exc: BaseException) -> str:
    """A one-line account of ``exc`` (of the first leaf of a group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, StageError | UnexpectedStatus):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# -- configuration --------------------------------------------------------------


@attrs.frozen(kw_only=True)
class WorkerConfig:
    """What one worker runs: ``turns`` turns, ``concurrency`` at a time."""

    url: str
    api_key: str
    scenario: str
    turns: int
    concurrency: int
    cancel_at: CancelAt
    #: The level's total concurrency (what samples report), across workers.
    level: int
    seed: int = 0
    stateless: bool = False
    #: This worker's index: part of each turn's tag and of its random seed.
    worker: int = 0
    #: Bound on each wait of a turn, seconds.
    timeout: float = 30.0

    def __attrs_post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {SCENARIOS}")
        if self.stateless and self.scenario not in ("stream", "upstream"):
            raise ValueError(f"--stateless has no sessions: no {self.scenario!r} scenario")
        if self.turns < 0 or self.concurrency < 1 or self.level < 1:
            raise ValueError(
                f"turns must be >= 0 and concurrency >= 1, not {self.turns}/{self.concurrency}"
            )
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, not {self.timeout!r}")
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"the URL must be http:// or https://, not {self.url!r}")


@attrs.frozen(kw_only=True)
class WorkerStats:
    """What a worker cost: its last line."""

    #: CPU time (user + system) and wall time from the start signal to the end.
    cpu_seconds: float
    wall_seconds: float
    #: How late a 10 ms timer woke, p99 and max (ms): the worker's loop lag,
    #: which every latency it measured may include.
    loop_lag_p99_ms: float
    loop_lag_max_ms: float


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


# -- one turn ----------------------------------------------------------------------------


@attrs.define(eq=False)
class _Turn:
    """The state of one turn while it runs; :meth:`sample` freezes it."""

    worker: _Worker
    n: int
    #: Seconds after the first event to cancel (``cancel_at`` as a range).
    delay: float | None
    tag: str = ""
    sid: str | None = None
    rid: str | None = None
    headers_ms: float | None = None
    first_event_ms: float | None = None
    ack_ms: float | None = None
    stop_ms: float | None = None
    group_gone_ms: float | None = None
    deltas_after_ack: int = 0
    terminal: str | None = None
    terminal_frame: bytes = b""
    workspace_gone: bool | None = None
    error: str | None = None
    t_first: float | None = None
    t_cancel: float | None = None
    t_ack: float | None = None
    events: int = 0
    first_event: trio.Event = attrs.field(factory=trio.Event)
    cancel_point: trio.Event = attrs.field(factory=trio.Event)

    def sample(self) -> TurnSample:
        return TurnSample(
            scenario=self.worker.config.scenario,
            concurrency=self.worker.config.level,
            response_id=self.rid,
            headers_ms=self.headers_ms,
            first_event_ms=self.first_event_ms,
            ack_ms=self.ack_ms,
            stop_ms=self.stop_ms,
            group_gone_ms=self.group_gone_ms,
            deltas_after_ack=self.deltas_after_ack,
            terminal=self.terminal,
            workspace_gone=self.workspace_gone,
            error=self.error,
            tag=self.tag,
            t_cancel=self.t_cancel,
            t_ack=self.t_ack,
        )

    @contextlib.contextmanager
    def step(self, name: str, seconds: float | None = None) -> Iterator[None]:
        """One stage of the turn, bounded by ``seconds`` (default: the config's
        timeout); an error inside it becomes a :class:`StageError` naming it."""
        seconds = self.worker.config.timeout if seconds is None else seconds
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            raise StageError(f"{name}: no answer within {seconds:g} s") from None
        except StageError:
            raise
        except Exception as exc:
            raise StageError(f"{name}: {_error_text(exc)}") from exc

    async def run(self) -> None:
        control: Connection | None = None
        try:
            try:
                with self.step("connect"):
                    control = await self.worker.origin.connect()
                await self._run(control)
            except Exception as exc:  # never crash the worker: the sample says what failed
                self.error = _error_text(exc)
            if self.sid is not None:
                # After a failure the control connection may hold half an answer.
                await self._delete_session(control if self.error is None else None)
        finally:
            if control is not None:
                await control.aclose()

    async def _delete_session(self, control: Connection | None) -> None:
        """Delete the session (untimed; keeps the server clean). A 404 is fine:
        the ``delete`` scenario deleted it already."""
        cfg = self.worker.config
        try:
            with trio.move_on_after(cfg.timeout):
                conn = control if control is not None else await self.worker.origin.connect()
                try:
                    head, _ = await conn.request("DELETE", f"/v1/sessions/{self.sid}")
                finally:
                    if conn is not control:
                        await conn.aclose()
                if head.status not in (204, 404) and self.error is None:
                    self.error = f"cleanup: DELETE session answered {head.status}"
        except Exception as exc:
            if self.error is None:
                self.error = f"cleanup: {_error_text(exc)}"

    async def _run(self, control: Connection) -> None:
        w = self.worker
        cfg = w.config
        text = f"Write a 100000-word essay on cancellation [bench {self.tag}]"
        if cfg.scenario == "tool":
            text = f"run: {TOOL_COMMAND}\n[bench {self.tag}]"
        if cfg.stateless:
            path = "/v1/responses"
            body = json.dumps({"input": text, "stream": True}).encode()
        else:
            with self.step("create session"):
                head, raw = await control.request("POST", "/v1/sessions", b"{}")
                _expect(head, raw, 201, 200)
                self.sid = json.loads(raw)["id"]
            path = f"/v1/sessions/{self.sid}/messages"
            body = json.dumps({"message": text}).encode()
        with self.step("connect stream"):
            stream = await w.origin.connect()
        try:
            with self.step("start turn"):
                t0 = await stream.send("POST", path, body)
                head = await stream.read_head()
                self.headers_ms = (time.perf_counter() - t0) * 1e3
                if head.status != 200:
                    _expect(head, await stream.read_body(head), 200)
                self.rid = head.headers.get("x-response-id")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel, control)
                await self._read(stream.body(head), t0)
                if self.t_cancel is None:
                    raise UnexpectedStatus(
                        f"the turn ended {self.terminal} before the cancel was sent: "
                        f"{self.terminal_frame[-300:].decode(errors='replace')}"
                    )
        finally:
            await stream.aclose()
        if cfg.scenario == "delete" and self.terminal == "message.cancelled":
            reason = frame_data(self.terminal_frame).get("reason")
            if reason != "session_deleted":
                self.error = (
                    f"terminal: message.cancelled with reason {reason!r}, not session_deleted"
                )

    async def _read(self, body: Body, t0: float) -> None:
        """Read the stream to its terminal event (the hot loop: keep it lean)."""
        cfg = self.worker.config
        delta = b"response.output_text.delta" if cfg.stateless else b"text.delta"
        wait_for = b"tool_use.executing" if cfg.scenario == "tool" else None
        events_to_cancel = cfg.cancel_at.events
        splitter = FrameSplitter()
        with self.step("first event"):
            while self.t_first is None:
                data = await body.receive()
                now = time.perf_counter()
                if not data:
                    raise ProtocolError("the stream ended before any event")
                for frame in splitter.feed(data):
                    kind = event_type(frame)
                    if kind is None:
                        continue
                    if self.t_first is None:
                        self.t_first = now
                        self.first_event_ms = (now - t0) * 1e3
                        self.first_event.set()
                    if self._on_event(kind, frame, now, delta, wait_for, events_to_cancel):
                        return
        # One bound for the rest (not a scope per read): waiting for the cancel
        # point, the tool's pid, the cancel, and the terminal after it.
        with self.step("read stream", 3 * cfg.timeout + (self.delay or 0.0)):
            while True:
                data = await body.receive()
                now = time.perf_counter()
                if not data:
                    raise ProtocolError(
                        f"the stream ended after {self.events} events, with no terminal event"
                    )
                for frame in splitter.feed(data):
                    kind = event_type(frame)
                    if kind is not None and self._on_event(
                        kind, frame, now, delta, wait_for, events_to_cancel
                    ):
                        return

    def _on_event(
        self,
        kind: bytes,
        frame: bytes,
        now: float,
        delta: bytes,
        wait_for: bytes | None,
        events_to_cancel: int | None,
    ) -> bool:
        """Account for one event; True once it was the terminal."""
        self.events += 1
        if kind == delta:
            if self.t_ack is not None:
                self.deltas_after_ack += 1
        elif kind in TERMINALS:
            self.terminal = kind.decode()
            self.terminal_frame = frame
            if self.t_cancel is not None:
                self.stop_ms = (now - self.t_cancel) * 1e3
            return True
        elif self.rid is None and self.events == 1:
            # No X-Response-Id header: the first event names the response.
            data = frame_data(frame)
            rid = data.get("id") or data.get("response_id")
            self.rid = rid if isinstance(rid, str) else None
        if wait_for is not None:
            if kind == wait_for:
                self.cancel_point.set()
        elif events_to_cancel is not None and self.events >= events_to_cancel:
            self.cancel_point.set()
        return False

    async def _cancel(self, control: Connection) -> None:
        """Wait for the cancel point, then cancel (or DELETE) on the control connection."""
        cfg = self.worker.config
        if cfg.scenario == "tool" or cfg.cancel_at.events is not None:
            await self.cancel_point.wait()  # the reader's wait is bounded
        else:
            await self.first_event.wait()
            assert self.t_first is not None
            assert self.delay is not None
            await trio.sleep(max(0.0, self.t_first + self.delay - time.perf_counter()))
        if self.rid is None:
            raise ProtocolError("no X-Response-Id header and no id in the first event")
        pid = await self._tool_pid(control) if cfg.scenario == "tool" else None
        async with trio.open_nursery() as nursery:
            with self.step("cancel"):
                if cfg.scenario == "delete":
                    method, path, expected = "DELETE", f"/v1/sessions/{self.sid}", 204
                elif cfg.stateless:
                    method, path, expected = "POST", f"/v1/responses/{self.rid}/cancel", 202
                else:
                    path = f"/v1/sessions/{self.sid}/responses/{self.rid}/cancel"
                    method, expected = "POST", 202
                request = control.encode(method, path)
                # Set before the write: the write yields after its syscall, and
                # the reader may see the terminal event before it returns.
                self.t_cancel = time.perf_counter()
                await control.write(request)
                if pid is not None:
                    nursery.start_soon(self._watch_group, pid, self.t_cancel)
                head = await control.read_head()
                self.t_ack = time.perf_counter()
                self.ack_ms = (self.t_ack - self.t_cancel) * 1e3
                _expect(head, await control.read_body(head), expected)
            if cfg.scenario == "delete":
                with self.step("workspace check"):
                    head, _ = await control.request("GET", f"/v1/sessions/{self.sid}/files")
                    self.workspace_gone = head.status == 404

    async def _tool_pid(self, control: Connection) -> int | None:
        """The tool's group leader, from the pid file it writes; None if this
        machine cannot see that process (remote server, other PID namespace)."""
        with self.step("tool pid file"):
            while True:
                head, raw = await control.request(
                    "GET", f"/v1/sessions/{self.sid}/files/{PID_FILE}"
                )
                if head.status == 200 and raw.endswith(b"\n"):
                    break
                if head.status not in (200, 404):
                    _expect(head, raw, 200)
                await trio.sleep(PID_POLL)
        pid = int(raw)
        if not self.worker.origin.is_loopback:
            return None
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return None  # not ours to see
        except PermissionError:
            pass
        return pid

    async def _watch_group(self, pid: int, t_cancel: float) -> None:
        """Poll until process group ``pid`` is gone; record when."""
        with self.step("process group gone"):
            while True:
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    self.group_gone_ms = (time.perf_counter() - t_cancel) * 1e3
                    return
                except PermissionError:
                    pass
                await trio.sleep(GROUP_POLL)


def _expect(head: Head, body: bytes, *statuses: int) -> None:
    if head.status not in statuses:
        text = body[:200].decode("utf-8", errors="replace")
        raise UnexpectedStatus(f"HTTP {head.status} (expected {statuses[0]}): {text}")


# -- the worker -------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Worker:
    config: WorkerConfig
    origin: Origin

    async def run(self, emit: Callable[[TurnSample], Awaitable[None]]) -> None:
        cfg = self.config
        rng = random.Random(cfg.seed * 1000 + cfg.worker)
        at = cfg.cancel_at
        # Drawn up front in turn order: the same seed gives the same delays
        # whatever order the turns happen to run in.
        delays = [
            rng.uniform(at.low, at.high) if at.events is None else None for _ in range(cfg.turns)
        ]
        numbers = iter(range(cfg.turns))

        async def runner() -> None:
            for n in numbers:  # shared: each runner takes the next turn
                turn = _Turn(self, n, delays[n], tag=f"{cfg.worker}-{n}")
                await turn.run()
                await emit(turn.sample())

        async with trio.open_nursery() as nursery:
            for _ in range(min(cfg.concurrency, cfg.turns)):
                nursery.start_soon(runner)


async def _probe_lag(lags: list[float]) -> None:
    while True:
        start = time.perf_counter()
        await trio.sleep(LAG_PROBE)
        lags.append(time.perf_counter() - start - LAG_PROBE)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run_worker(config: WorkerConfig, out: trio.abc.SendStream) -> WorkerStats:
    """Run ``config``'s turns, writing a ``{"sample": ...}`` line to ``out`` per turn.

    Returns:
      what the worker cost, from the call to the last turn's end.
    """
    lock = trio.StrictFIFOLock()

    async def emit(sample: TurnSample) -> None:
        line = json.dumps({"sample": converter.unstructure(sample)}).encode() + b"\n"
        async with lock:
            await out.send_all(line)

    lags: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_probe_lag, lags)
        await _Worker(config, Origin.parse(config.url, config.api_key)).run(emit)
        nursery.cancel_scope.cancel()
    return WorkerStats(
        cpu_seconds=time.process_time() - cpu0,
        wall_seconds=time.perf_counter() - wall0,
        loop_lag_p99_ms=_percentile(lags, 99) * 1e3,
        loop_lag_max_ms=max(lags, default=0.0) * 1e3,
    )


async def _main(config: WorkerConfig) -> None:
    async with trio.lowlevel.FdStream(os.dup(sys.stdout.fileno())) as out:
        stats = await run_worker(config, out)
        await out.send_all(json.dumps({"stats": converter.unstructure(stats)}).encode() + b"\n")


def _format_invalid(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, ValueError):
        return str(exc)  # ours, from WorkerConfig or parse_cancel_at: already explicit
    return format_exception(exc, type_)


def main() -> int:
    """The process: config line in, ready line out, wait for EOF, run, report."""
    stdin, stdout = sys.stdin.buffer, sys.stdout
    try:
        config = converter.structure(json.loads(stdin.readline()), WorkerConfig)
    except Exception as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            why = "; ".join(cattrs.transform_error(exc, format_exception=_format_invalid))
        else:
            why = _error_text(exc)
        stdout.write(json.dumps({"error": f"bad worker config: {why}"}) + "\n")
        stdout.flush()
        return 2
    stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    stdout.flush()
    stdin.read()  # the start signal: the parent closes our stdin
    trio.run(_main, config)
    return 0


if __name__ == "__main__":
    # Run the canonical module, not a second copy named __main__ (cattrs
    # resolves WorkerConfig's annotations in its module's namespace).
    from bench._http_worker import main as _canonical_main

    sys.exit(_canonical_main())

"""``agent-runtime bench sessions``: what idle sessions and held-open streams cost.

Two measurements of one server (issue 8):

* **idle**: the server's resident memory and open file descriptors before
  and after ``count`` sessions are created over HTTP (``POST /v1/sessions``)
  and left idle;
* **streams**: ``streams`` message streams (each on its own new session,
  ``POST /v1/sessions/{sid}/messages`` with a 100,000-word essay on a demo
  model paced at 1 word/s) opened at once and held open: time to each
  stream's first event, errors (non-200, resets, early ends, timeouts), and
  the server's memory, descriptors and CPU while they are all open.

By default the benchmark starts its own ``agent-runtime serve`` subprocess
(temporary data dir, random key) and stops it at the end (SIGTERM, SIGKILL
after a grace), leaving no process and no directory behind. ``url=`` measures
a running server instead: memory and descriptors then only if it listens on
this machine (found by its port with psutil), and every session created is
deleted at the end. ``embedded=True`` creates the idle sessions in-process
(``Runtime.open``) and measures this process; there are no streams then.

The load generator is a minimal HTTP/1.1 client on trio sockets (the server,
not the client, should be what is measured); its CPU use is reported.

The document :func:`run_sessions_bench` returns (JSON-able, no NaN; None
where a value could not be measured, with a line in ``notes``)::

    {"kind": "sessions", "schema", "machine", "options", "started_at",
     "finished_at", "load_average": {"start", "end"},
     "idle": {"count", "created", "errors", "error_kinds", "rss_before_mb",
              "rss_after_mb", "rss_per_session_kb", "fds_before", "fds_after",
              "seconds", "create_per_second"},
     "streams": {"count", "held", "errors", "error_kinds", "rss_mb",
                 "rss_peak_mb", "fds", "fds_before", "fds_after_close",
                 "close_seconds", "first_event_p50_ms", "first_event_p99_ms",
                 "first_event_max_ms", "headers_p50_ms", "headers_p99_ms",
                 "seconds", "hold_seconds", "events_received",
                 "client_cpu_percent", "server_cpu_percent",
                 "client_cpu_hold_percent", "server_cpu_hold_percent"} | None,
     "server": {"pids", "spawned", ...} | None,
     "targets": [{"name", "unit", "value", "met", "note"}, ...],
     "notes": [...]}
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import psutil
import trio
from rich.markup import escape
from rich.table import Table

from ._samples import machine_info, redact_url
from ._stats import percentile as _percentile

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from rich.console import Console

    _Progress = Callable[[str, int, int], None]

#: The JSON document's ``schema`` value; bump when its shape changes.
SCHEMA: Final = "agent-runtime.bench.sessions/1"
#: The targets of issue 8.
IDLE_TARGET_SESSIONS: Final = 10_000
IDLE_TARGET_MB: Final = 300.0
STREAMS_TARGET: Final = 1_000
IDLE_TARGET_NAME: Final = "10,000 idle sessions <= 300 MB"
STREAMS_TARGET_NAME: Final = "1,000 streams held, no errors"
#: What each stream asks for: long enough to stay open for the whole run.
STREAM_MESSAGE: Final = "Write a 100000-word essay"
#: Demo model pace of the server this benchmark starts (words per second).
TOKENS_PER_SECOND: Final = 1.0
#: Client connections creating (and deleting) sessions at once.
CREATE_CONCURRENCY: Final = 8
#: Seconds the streams stay open after the last one got its first event.
HOLD_SECONDS: Final = 5.0
#: Bound on one request, and on all streams getting their first event.
REQUEST_TIMEOUT: Final = 30.0
FIRST_EVENT_TIMEOUT: Final = 60.0
#: How long the server may take to close its side of the streams we closed.
CLOSE_TIMEOUT: Final = 10.0
#: Bound on our server's start, and on its drain after SIGTERM before SIGKILL.
START_TIMEOUT: Final = 30.0
STOP_GRACE: Final = 30.0
#: The project root (``server`` importable from here when run from a checkout).
ROOT: Final = Path(__file__).resolve().parent.parent
SERVER_MAIN: Final = "from server._cli import main; raise SystemExit(main())"

_TERMINAL_RE: Final = re.compile(
    rb"event: ((?:message|response)\.(?:completed|cancelled|error|failed|incomplete))\n"
)
_EVENT: Final = b"event: "


class HttpError(Exception):
    """The server answered something that is not HTTP/1.1, or closed early."""


# -- a minimal HTTP/1.1 client ------------------------------------------------


@attrs.frozen
class Endpoint:
    """Where requests go: ``http(s)://host:port/prefix`` and the API key."""

    scheme: str
    host: str
    port: int
    prefix: str
    api_key: str = attrs.field(repr=False)

    @classmethod
    def parse(cls, url: str, api_key: str) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the URL must look like http://HOST:PORT, not {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), api_key)

    async def connect(self) -> trio.abc.Stream:
        if self.scheme == "https":
            return await trio.open_ssl_over_tcp_stream(
                self.host, self.port, ssl_context=ssl.create_default_context()
            )
        stream = await trio.open_tcp_stream(self.host, self.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return stream

    def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return (
            f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
            f"Authorization: Bearer {self.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body


async def _more(stream: trio.abc.ReceiveStream, buf: bytearray) -> None:
    chunk = await stream.receive_some(65536)
    if not chunk:
        raise HttpError("eof")
    buf += chunk


async def read_head(stream: trio.abc.ReceiveStream, buf: bytearray) -> tuple[int, dict[str, str]]:
    """Read a response's status line and headers from ``stream`` (``buf`` keeps the rest)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > 65536:
            raise HttpError("response head over 64 KiB")
        await _more(stream, buf)
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise HttpError(f"bad status line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body(
    stream: trio.abc.ReceiveStream, buf: bytearray, headers: dict[str, str]
) -> bytes:
    """The body after :func:`read_head`: by Content-Length, chunked, or to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                await _more(stream, buf)
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            del buf[: eol + 2]
            if size == 0:
                while (eol := buf.find(b"\r\n")) != 0:  # trailers, then a blank line
                    if eol > 0:
                        del buf[: eol + 2]
                    else:
                        await _more(stream, buf)
                del buf[:2]
                return bytes(body)
            while len(buf) < size + 2:
                await _more(stream, buf)
            body += buf[:size]
            del buf[: size + 2]
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buf) < length:
            await _more(stream, buf)
        body_bytes = bytes(buf[:length])
        del buf[:length]
        return body_bytes
    with contextlib.suppress(HttpError):
        while True:
            await _more(stream, buf)
    body_bytes = bytes(buf)
    buf.clear()
    return body_bytes


class Connection:
    """One keep-alive connection for plain requests; reconnects when needed."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.stream: trio.abc.Stream | None = None
        self.buf = bytearray()

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.stream is None:
            self.stream = await self.endpoint.connect()
            self.buf.clear()
        try:
            await self.stream.send_all(self.endpoint.request(method, path, body))
            status, headers = await read_head(self.stream, self.buf)
            data = await read_body(self.stream, self.buf, headers)
        except BaseException:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)


def error_kind(exc: BaseException) -> str:
    """A short, countable name for what went wrong with a request."""
    if isinstance(exc, HttpError):
        return "server closed the connection" if str(exc) == "eof" else f"bad response: {exc}"
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__
        return f"reset ({type(cause).__name__})" if cause is not None else "reset"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {os.strerror(exc.errno) if exc.errno else exc}"
    return type(exc).__name__


# -- measuring a process --------------------------------------------------------


class Probe:
    """RSS, open descriptors and CPU time of some processes (summed); None if unknown."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]

    def rss_mb(self) -> float | None:
        try:
            total = sum(p.memory_info().rss for p in self.processes)
        except psutil.Error:
            return None
        return total / 2**20 if self.processes else None

    def fds(self) -> int | None:
        try:
            total = sum(p.num_fds() for p in self.processes)
        except psutil.Error:
            return None
        return total if self.processes else None

    def peak_rss_mb(self) -> float | None:
        """Peak resident set size so far (Linux ``VmHWM``), summed."""
        total = 0
        try:
            for process in self.processes:
                with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
                    total += next(
                        int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")
                    )
        except (OSError, StopIteration, ValueError):
            return None
        return total / 2**20 if self.processes else None

    def cpu_seconds(self) -> float | None:
        try:
            times = [p.cpu_times() for p in self.processes]
        except psutil.Error:
            return None
        return sum(t.user + t.system for t in times) if self.processes else None


def _client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuClock:
    """CPU use of this process (the client) and of the probed server, per lap."""

    def __init__(self, probe: Probe | None) -> None:
        self.probe = probe
        self.wall = time.perf_counter()
        self.client = _client_cpu_seconds()
        self.server = probe.cpu_seconds() if probe else None

    def lap(self) -> tuple[float, float | None]:
        """Percent of one core used by the client and the server since the last lap."""
        wall, client = time.perf_counter(), _client_cpu_seconds()
        server = self.probe.cpu_seconds() if self.probe else None
        elapsed = max(wall - self.wall, 1e-9)
        client_percent = (client - self.client) / elapsed * 100
        server_percent = (
            (server - self.server) / elapsed * 100
            if server is not None and self.server is not None
            else None
        )
        self.wall, self.client, self.server = wall, client, server
        return client_percent, server_percent


async def find_local_pids(endpoint: Endpoint) -> list[int]:
    """The processes of this machine listening on the endpoint's port, if its
    host is an address of this machine; [] otherwise (or without permission)."""
    try:
        infos = await trio.socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    targets = {str(info[4][0]) for info in infos}
    local = {"0.0.0.0", "::"} | {
        addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs
    }
    if not targets & local:
        return []
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted(
        {
            c.pid
            for c in connections
            if c.status == psutil.CONN_LISTEN
            and c.laddr
            and c.laddr.port == endpoint.port
            and c.pid
        }
    )


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward its hard limit if below
    ``needed``; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard)
        )
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (None if unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The percentile of every bench command (:func:`bench._stats.percentile`),
    or None if there are no values."""
    return _percentile(values, q) if values else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# -- our own server ---------------------------------------------------------------


@attrs.define
class Server:
    """A running ``agent-runtime serve`` subprocess."""

    process: trio.Process
    url: str
    api_key: str = attrs.field(repr=False)
    log: Path
    #: The temporary directory (data dir, log), removed after the server stops.
    directory: Path
    #: Seconds from SIGTERM to exit, and its exit code (set once stopped).
    stop_seconds: float | None = None
    returncode: int | None = None
    killed: bool = False


@contextlib.asynccontextmanager
async def run_server(
    tokens_per_second: float = TOKENS_PER_SECOND, on_progress: _Progress | None = None
) -> AsyncIterator[Server]:
    """Start ``agent-runtime serve`` (port 0, temporary data dir, random key);
    on exit SIGTERM its process group, SIGKILL after :data:`STOP_GRACE`, and
    remove the directory."""
    with tempfile.TemporaryDirectory(prefix="agent-runtime-bench-sessions-") as tmp:
        key = "pk_bench_" + secrets.token_hex(16)
        log = Path(tmp) / "server.log"
        command = [
            sys.executable, "-c", SERVER_MAIN, "serve", "--port", "0",
            "--data-dir", str(Path(tmp) / "data"), "--api-key", key,
            "--demo-tokens-per-second", f"{tokens_per_second:g}",
        ]  # fmt: skip
        cwd = ROOT if (ROOT / "server" / "_cli.py").exists() else None
        with log.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                # Its own process group: a terminal's Ctrl-C reaches only us,
                # and we stop the server (and anything it started) ourselves.
                start_new_session=True,
            )
        server = Server(process, "", key, log, Path(tmp))
        try:
            with trio.fail_after(START_TIMEOUT):
                while True:
                    text = (await trio.Path(log).read_bytes()).decode(errors="replace")
                    if (match := re.search(r"serving on (https?://\S+)", text)) is not None:
                        server.url = match.group(1).rstrip(",")
                        break
                    if process.returncode is not None:
                        raise RuntimeError(
                            f"the server exited ({process.returncode}) before serving:\n"
                            + text[-2000:]
                        )
                    await trio.sleep(0.05)
            yield server
        finally:
            with trio.CancelScope(shield=True):
                if on_progress is not None:
                    on_progress("stopping server", 0, 1)
                await _stop(server)
                if on_progress is not None:
                    on_progress("stopping server", 1, 1)


async def _stop(server: Server) -> None:
    process = server.process
    started = time.perf_counter()

    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    if process.returncode is None:
        signal_group(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
    if process.returncode is None:
        server.killed = True
    # The group may outlive its leader (tools it started): clear it either way.
    signal_group(signal.SIGKILL)
    with trio.move_on_after(10):
        await process.wait()
    server.stop_seconds = time.perf_counter() - started
    server.returncode = process.returncode


# -- the phases -----------------------------------------------------------------


@attrs.define
class RequestsResult:
    """What a batch of plain requests got back (None where a request failed)."""

    answers: list[tuple[int, bytes] | None]
    errors: collections.Counter[str]
    seconds: float


async def run_requests(
    endpoint: Endpoint,
    jobs: Sequence[tuple[str, str, bytes]],
    *,
    expect: int,
    phase: str,
    on_progress: _Progress | None,
    concurrency: int = CREATE_CONCURRENCY,
) -> RequestsResult:
    """Send ``(method, path, body)`` jobs over ``concurrency`` keep-alive
    connections; a status other than ``expect`` counts as an error."""
    answers: list[tuple[int, bytes] | None] = [None] * len(jobs)
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    step = max(1, len(jobs) // 100)
    next_job = iter(range(len(jobs)))

    async def worker() -> None:
        nonlocal done
        conn = Connection(endpoint)
        try:
            for index in next_job:
                method, path, body = jobs[index]
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        answer = await conn.call(method, path, body)
                except trio.TooSlowError:
                    await conn.close()
                    errors["timeout"] += 1
                except (OSError, HttpError, trio.BrokenResourceError, ValueError) as exc:
                    errors[error_kind(exc)] += 1
                else:
                    if answer[0] == expect:
                        answers[index] = answer
                    else:
                        errors[f"status {answer[0]}"] += 1
                done += 1
                if on_progress is not None and (done % step == 0 or done == len(jobs)):
                    on_progress(phase, done, len(jobs))
        finally:
            await conn.close()

    started = time.perf_counter()
    # Bounded as a whole too: a server that answers, but slowly, ends the phase.
    with trio.move_on_after(60 + len(jobs) * REQUEST_TIMEOUT / 1000) as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, min(concurrency, len(jobs)))):
                nursery.start_soon(worker)
    if scope.cancelled_caught:
        errors["phase timed out"] += len(jobs) - done
    return RequestsResult(answers, errors, time.perf_counter() - started)


async def create_sessions(
    endpoint: Endpoint, count: int, *, phase: str, on_progress: _Progress | None
) -> tuple[list[str], collections.Counter[str], float]:
    """Create ``count`` sessions; return their ids, the errors and the seconds."""
    result = await run_requests(
        endpoint,
        [("POST", "/v1/sessions", b"{}")] * count,
        expect=201,
        phase=phase,
        on_progress=on_progress,
    )
    ids: list[str] = []
    for answer in result.answers:
        if answer is None:
            continue
        try:
            ids.append(str(json.loads(answer[1])["id"]))
        except (ValueError, KeyError, TypeError):
            result.errors["bad session JSON"] += 1
    return ids, result.errors, result.seconds


async def _settle() -> None:
    """Let the server finish closing connections before a descriptor count."""
    await trio.sleep(0.5)


async def wait_fds_below(probe: Probe, limit: int, within: float) -> tuple[int | None, float]:
    """Poll until the server holds at most ``limit`` descriptors (for at most
    ``within`` seconds); return the last count and the seconds it took."""
    started = time.perf_counter()
    with trio.move_on_after(within):
        while True:
            fds = probe.fds()
            if fds is None or fds <= limit:
                break
            await trio.sleep(0.1)
    return probe.fds(), time.perf_counter() - started


async def idle_phase(
    endpoint: Endpoint, count: int, probe: Probe | None, on_progress: _Progress | None
) -> tuple[dict[str, Any], list[str]]:
    # Warm up: the first session pays for lazy initialisation, not per session.
    warm, _, _ = await create_sessions(endpoint, 1, phase="warm-up", on_progress=None)
    if warm:
        await run_requests(
            endpoint, [("DELETE", f"/v1/sessions/{warm[0]}", b"")], expect=204,
            phase="warm-up", on_progress=None,
        )  # fmt: skip
    await _settle()
    rss_before = probe.rss_mb() if probe else None
    fds_before = probe.fds() if probe else None
    ids, errors, seconds = await create_sessions(
        endpoint, count, phase="idle sessions", on_progress=on_progress
    )
    await _settle()
    rss_after = probe.rss_mb() if probe else None
    fds_after = probe.fds() if probe else None
    return _idle_dict(count, len(ids), errors, rss_before, rss_after, fds_before, fds_after,
                      seconds), ids  # fmt: skip


def _idle_dict(
    count: int,
    created: int,
    errors: collections.Counter[str],
    rss_before: float | None,
    rss_after: float | None,
    fds_before: int | None,
    fds_after: int | None,
    seconds: float,
) -> dict[str, Any]:
    per_session = (
        (rss_after - rss_before) * 1024 / created
        if rss_before is not None and rss_after is not None and created
        else None
    )
    return {
        "count": count,
        "created": created,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "rss_before_mb": _round(rss_before),
        "rss_after_mb": _round(rss_after),
        "rss_per_session_kb": _round(per_session),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "seconds": round(seconds, 3),
        "create_per_second": round(created / seconds, 1) if seconds > 0 else None,
    }


@attrs.define
class _StreamsState:
    total: int
    #: Streams that got their first event, and those that failed before it.
    ready: int = 0
    failed: int = 0
    failed_during_hold: int = 0
    events: int = 0
    first_event_ms: list[float] = attrs.Factory(list)
    headers_ms: list[float] = attrs.Factory(list)
    errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    all_in: trio.Event = attrs.Factory(trio.Event)

    def settle(self) -> None:
        if self.ready + self.failed >= self.total:
            self.all_in.set()


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def hold_stream(endpoint: Endpoint, sid: str, deadline: float, state: _StreamsState) -> None:
    """Open one stream, read to its first event (by ``deadline``), then keep
    reading until cancelled; an early end counts as an error."""
    request = endpoint.request(
        "POST", f"/v1/sessions/{sid}/messages", json.dumps({"message": STREAM_MESSAGE}).encode()
    )
    buf = bytearray()
    stream: trio.abc.Stream | None = None
    ready = False
    try:
        with trio.move_on_at(deadline):
            started = time.perf_counter()
            stream = await endpoint.connect()
            await stream.send_all(request)
            status, _ = await read_head(stream, buf)
            if status != 200:
                raise _Refused(status)
            state.headers_ms.append((time.perf_counter() - started) * 1e3)
            while _EVENT not in buf:
                await _more(stream, buf)
            state.first_event_ms.append((time.perf_counter() - started) * 1e3)
            ready = True
            state.ready += 1
            state.settle()
        if not ready:
            raise trio.TooSlowError
        assert stream is not None
        tail = bytes(buf)
        while True:
            if (match := _TERMINAL_RE.search(tail)) is not None:
                raise HttpError(f"ended early: {match.group(1).decode()}")
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise HttpError("eof")
            state.events += (tail[-(len(_EVENT) - 1) :] + chunk).count(_EVENT)
            tail = tail[-64:] + chunk
    except trio.TooSlowError:
        state.errors["timeout (no first event)"] += 1
    except _Refused as exc:
        state.errors[f"status {exc.status}"] += 1
    except (OSError, HttpError, trio.BrokenResourceError, ValueError) as exc:
        if ready:
            state.failed_during_hold += 1
        state.errors[error_kind(exc)] += 1
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if not ready:
            state.failed += 1
            state.settle()


async def streams_phase(
    endpoint: Endpoint,
    streams: int,
    probe: Probe | None,
    hold_seconds: float,
    on_progress: _Progress | None,
) -> tuple[dict[str, Any], list[str]]:
    ids, session_errors, _ = await create_sessions(
        endpoint, streams, phase="stream sessions", on_progress=on_progress
    )
    state = _StreamsState(total=len(ids))
    state.errors.update({f"session: {k}": v for k, v in session_errors.items()})
    await _settle()
    fds_before = probe.fds() if probe else None
    cpu = CpuClock(probe)
    started = time.perf_counter()
    deadline = trio.current_time() + FIRST_EVENT_TIMEOUT
    measured: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for sid in ids:
            nursery.start_soon(hold_stream, endpoint, sid, deadline, state)
        if not ids:
            state.all_in.set()
        with trio.move_on_at(deadline + 1):
            while not state.all_in.is_set():
                if on_progress is not None:
                    on_progress("streams", state.ready, streams)
                with trio.move_on_after(0.25):
                    await state.all_in.wait()
        if on_progress is not None:
            on_progress("streams", state.ready, streams)
        opened_seconds = time.perf_counter() - started
        measured["cpu_open"] = cpu.lap()
        with trio.move_on_after(hold_seconds):
            while True:
                if on_progress is not None:
                    elapsed = time.perf_counter() - started - opened_seconds
                    on_progress("holding", round(elapsed), round(hold_seconds))
                await trio.sleep(0.5)
        measured["cpu_hold"] = cpu.lap()
        measured["held"] = state.ready - state.failed_during_hold
        measured["rss_mb"] = probe.rss_mb() if probe else None
        measured["fds"] = probe.fds() if probe else None
        measured["rss_peak_mb"] = probe.peak_rss_mb() if probe else None
        nursery.cancel_scope.cancel(reason="streams measured")
    # Every stream is closed on our side: the server should let go of its
    # sockets (a leak would show here, STACK-NOTES 1).
    fds_after_close, close_seconds = (
        await wait_fds_below(probe, fds_before + 4, CLOSE_TIMEOUT)
        if probe is not None and fds_before is not None
        else (None, None)
    )
    errors = state.errors
    result = {
        "count": streams,
        "held": measured["held"],
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "rss_mb": _round(measured["rss_mb"]),
        "fds": measured["fds"],
        "first_event_p50_ms": _round(percentile(state.first_event_ms, 50)),
        "first_event_p99_ms": _round(percentile(state.first_event_ms, 99)),
        "first_event_max_ms": _round(max(state.first_event_ms, default=None)),
        "headers_p50_ms": _round(percentile(state.headers_ms, 50)),
        "headers_p99_ms": _round(percentile(state.headers_ms, 99)),
        "seconds": round(opened_seconds, 3),
        "hold_seconds": hold_seconds,
        "events_received": state.events,
        # Percent of one core, while the streams were opening and while held.
        "client_cpu_percent": _round(measured["cpu_open"][0], 1),
        "server_cpu_percent": _round(measured["cpu_open"][1], 1),
        "client_cpu_hold_percent": _round(measured["cpu_hold"][0], 1),
        "server_cpu_hold_percent": _round(measured["cpu_hold"][1], 1),
        "rss_peak_mb": _round(measured["rss_peak_mb"]),
        "fds_before": fds_before,
        "fds_after_close": fds_after_close,
        "close_seconds": _round(close_seconds, 3),
    }
    return result, ids


async def embedded_idle(count: int, on_progress: _Progress | None) -> dict[str, Any]:
    """``count`` idle sessions of an in-process runtime; memory of this process."""
    from runtime import Runtime

    probe = Probe([os.getpid()])
    with tempfile.TemporaryDirectory(prefix="agent-runtime-bench-sessions-") as tmp:
        async with Runtime.open(data_dir=tmp) as rt:
            warm = await rt.create_session()
            await rt.delete_session(warm.id)
            rss_before, fds_before = probe.rss_mb(), probe.fds()
            started = time.perf_counter()
            step = max(1, count // 100)
            for done in range(1, count + 1):
                await rt.create_session()
                if on_progress is not None and (done % step == 0 or done == count):
                    on_progress("idle sessions", done, count)
            seconds = time.perf_counter() - started
            rss_after, fds_after = probe.rss_mb(), probe.fds()
            created = rt.statistics().sessions
    return _idle_dict(count, created, collections.Counter(), rss_before, rss_after, fds_before,
                      fds_after, seconds)  # fmt: skip


# -- the benchmark ----------------------------------------------------------------


async def run_sessions_bench(
    *,
    count: int,
    streams: int,
    url: str | None,
    api_key: str | None,
    embedded: bool,
    on_progress: Callable[[str, int, int], None] | None = None,
    hold_seconds: float = HOLD_SECONDS,
) -> dict[str, Any]:
    """Measure ``count`` idle sessions and ``streams`` held-open streams.

    Targets: the server itself (default, a subprocess started and stopped
    here), ``url`` (a running server; needs ``api_key``) or ``embedded``
    (idle sessions in-process; no streams). Returns a JSON-able document (no
    NaN); values that could not be measured are None, with a note saying why.
    ``on_progress(phase, done, total)`` is called as phases advance.
    """
    if count < 1 or streams < 0:
        raise ValueError("count must be >= 1 and streams >= 0")
    if embedded and url is not None:
        raise ValueError("--embedded and --url exclude each other")
    if url is not None and not api_key:
        raise ValueError("--url needs --api-key")
    if hold_seconds < 0:
        raise ValueError("hold_seconds must be >= 0")
    try:
        return await _run(count, streams, url, api_key, embedded, on_progress, hold_seconds)
    except BaseExceptionGroup as group:
        # Ctrl-C lands in whichever task was running: give the caller a plain
        # KeyboardInterrupt (everything is cleaned up by now), not a group.
        interrupts, rest = group.split(KeyboardInterrupt)
        if interrupts is not None and rest is None:
            raise KeyboardInterrupt from None
        raise


async def _run(
    count: int,
    streams: int,
    url: str | None,
    api_key: str | None,
    embedded: bool,
    on_progress: _Progress | None,
    hold_seconds: float,
) -> dict[str, Any]:
    notes: list[str] = []
    options: dict[str, Any] = {
        "target": "embedded" if embedded else "url" if url is not None else "server",
        "count": count,
        "streams": None if embedded else streams,
        "url": redact_url(url),
        "hold_seconds": None if embedded else hold_seconds,
        "concurrency": None if embedded else CREATE_CONCURRENCY,
        "tokens_per_second": TOKENS_PER_SECOND if url is None and not embedded else None,
        "message": None if embedded else STREAM_MESSAGE,
    }
    doc: dict[str, Any] = {
        "kind": "sessions",
        "schema": SCHEMA,
        "machine": machine_info(),
        "options": options,
        "started_at": time.time(),
        "load_average": {"start": _load_average(), "end": None},
        "idle": None,
        "streams": None,
        "server": None,
        "notes": notes,
    }
    if embedded:
        doc["idle"] = await embedded_idle(count, on_progress)
        notes.append("embedded: RSS and descriptors of this process (runtime in-process)")
        notes.append("embedded: no streams (no HTTP)")
    else:
        soft = raise_fd_limit(streams + 2 * CREATE_CONCURRENCY + 64)
        if soft < streams + 64:
            raise ValueError(
                f"{streams} streams need more open files than RLIMIT_NOFILE allows ({soft})"
            )
        if url is not None:
            assert api_key is not None
            endpoint = Endpoint.parse(url, api_key)
            pids = await find_local_pids(endpoint)
            probe = Probe(pids) if pids else None
            doc["server"] = {"pids": pids, "spawned": False}
            if probe is None:
                notes.append(
                    "RSS and descriptors: null; the server is not a process of this machine "
                    "(or its listening socket's pid could not be seen)"
                )
            elif len(pids) > 1:
                notes.append(f"RSS and descriptors are summed over {len(pids)} processes")
            await _measure_http(doc, endpoint, probe, count, streams, hold_seconds, on_progress,
                                cleanup=True)  # fmt: skip
        else:
            async with run_server(on_progress=on_progress) as server:
                endpoint = Endpoint.parse(server.url, server.api_key)
                doc["server"] = {
                    "pids": [server.process.pid],
                    "spawned": True,
                    "directory": str(server.directory),
                }
                await _measure_http(doc, endpoint, Probe([server.process.pid]), count, streams,
                                    hold_seconds, on_progress, cleanup=False)  # fmt: skip
            doc["server"].update(
                stop_seconds=_round(server.stop_seconds, 3),
                returncode=server.returncode,
                killed=server.killed,
            )
            if server.killed:
                notes.append(f"the server did not exit within {STOP_GRACE:g} s of SIGTERM")
    doc["targets"] = targets(doc)
    doc["finished_at"] = time.time()
    doc["load_average"]["end"] = _load_average()
    return doc


async def _measure_http(
    doc: dict[str, Any],
    endpoint: Endpoint,
    probe: Probe | None,
    count: int,
    streams: int,
    hold_seconds: float,
    on_progress: _Progress | None,
    *,
    cleanup: bool,
) -> None:
    created: list[str] = []
    try:
        doc["idle"], ids = await idle_phase(endpoint, count, probe, on_progress)
        created += ids
        if streams:
            doc["streams"], ids = await streams_phase(
                endpoint, streams, probe, hold_seconds, on_progress
            )
            created += ids
            client_cpu = doc["streams"]["client_cpu_percent"]
            if client_cpu is not None and client_cpu > 80:
                doc["notes"].append(
                    f"the client used {client_cpu:.0f}% of a core while the streams opened: "
                    "it may have been the bottleneck"
                )
        else:
            doc["notes"].append("streams: none asked for (streams=0)")
    finally:
        if cleanup and created:
            # Someone else's server: leave it as we found it (deleting a
            # session also cancels its running turn).
            with trio.CancelScope(shield=True), trio.move_on_after(120):
                result = await run_requests(
                    endpoint,
                    [("DELETE", f"/v1/sessions/{sid}", b"") for sid in created],
                    expect=204,
                    phase="cleanup",
                    on_progress=on_progress,
                )
                if result.errors:
                    doc["notes"].append(f"cleanup: {sum(result.errors.values())} deletes failed")


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two targets, judged on ``doc`` (``met`` None: not measured)."""
    idle = doc.get("idle") or {}
    rss_after, per_kb = idle.get("rss_after_mb"), idle.get("rss_per_session_kb")
    idle_target: dict[str, Any] = {"name": IDLE_TARGET_NAME, "unit": "MB", "value": None,
                                   "met": None, "note": None}  # fmt: skip
    if rss_after is None:
        idle_target["note"] = "RSS not measured"
    elif idle.get("created", 0) == IDLE_TARGET_SESSIONS:
        idle_target["value"] = rss_after
    elif per_kb is not None:
        projected = idle["rss_before_mb"] + per_kb * IDLE_TARGET_SESSIONS / 1024
        idle_target["value"] = round(projected, 2)
        idle_target["note"] = f"projected from {idle['created']:,} sessions"
    if idle_target["value"] is not None:
        idle_target["met"] = bool(idle_target["value"] <= IDLE_TARGET_MB and not idle["errors"])
    streams = doc.get("streams")
    stream_target: dict[str, Any] = {"name": STREAMS_TARGET_NAME, "unit": "streams",
                                     "value": None, "met": None, "note": None}  # fmt: skip
    if streams is None:
        stream_target["note"] = "streams not measured"
    else:
        stream_target["value"] = streams["held"]
        ok = streams["held"] == streams["count"] and streams["errors"] == 0
        if streams["count"] >= STREAMS_TARGET:
            stream_target["met"] = ok
        else:
            stream_target["note"] = (
                f"only {streams['count']} streams run, {'no errors' if ok else 'with errors'}"
            )
    return [idle_target, stream_target]


# -- the report -------------------------------------------------------------------


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "[dim]n/a[/dim]"
    return f"{value:{spec}}{suffix}"


def _errors(count: int, kinds: dict[str, int]) -> str:
    if not count:
        return "[green]0[/green]"
    detail = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"[red]{count}[/red] ({escape(detail)})"


def _metrics_table(title: str, caption: str | None, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, caption=caption, show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def print_sessions_report(doc: dict[str, Any], console: Console) -> None:
    """Print a ``bench sessions`` document as tables (targets green/red)."""
    options = doc["options"]
    if options["target"] == "embedded":
        where = "in-process runtime (this process)"
    elif options["target"] == "url":
        where = f"server at {options.get('url')}"
    else:
        where = f"server subprocess, demo model at {options.get('tokens_per_second')} word/s"
    console.print(f"[bold]bench sessions[/bold]: {escape(where)}")
    idle = doc.get("idle")
    if idle is not None:
        rows = [
            ("created", f"{idle['created']:,}"),
            ("errors", _errors(idle["errors"], idle["error_kinds"])),
            ("seconds", _fmt(idle["seconds"], ".2f", " s")),
            ("created / s", _fmt(idle["create_per_second"], ",.0f")),
            ("RSS before", _fmt(idle["rss_before_mb"], ".1f", " MB")),
            ("RSS after", _fmt(idle["rss_after_mb"], ".1f", " MB")),
            ("RSS per session", _fmt(idle["rss_per_session_kb"], ".2f", " KiB")),
            ("fds before / after", f"{_fmt(idle['fds_before'])} / {_fmt(idle['fds_after'])}"),
        ]
        console.print(_metrics_table(f"{idle['count']:,} idle sessions", None, rows))
    streams = doc.get("streams")
    if streams is not None:
        first = " / ".join(
            _fmt(streams[f"first_event_{q}_ms"], ",.1f") for q in ("p50", "p99", "max")
        )
        rows = [
            ("held", f"{streams['held']:,}"),
            ("errors", _errors(streams["errors"], streams["error_kinds"])),
            ("all open after", _fmt(streams["seconds"], ".2f", " s")),
            ("first event p50 / p99 / max", f"{first} ms"),
            ("events received while held", f"{streams['events_received']:,}"),
            ("server RSS (all open)", _fmt(streams["rss_mb"], ".1f", " MB")),
            ("server RSS peak", _fmt(streams["rss_peak_mb"], ".1f", " MB")),
            ("server fds before / all open",
             f"{_fmt(streams['fds_before'])} / {_fmt(streams['fds'])}"),
            ("server fds after close",
             f"{_fmt(streams['fds_after_close'])} "
             f"(in {_fmt(streams['close_seconds'], '.1f', ' s')})"),
            ("server / client CPU, opening",
             f"{_fmt(streams['server_cpu_percent'], '.0f', '%')} / "
             f"{_fmt(streams['client_cpu_percent'], '.0f', '%')}"),
            ("server / client CPU, held",
             f"{_fmt(streams['server_cpu_hold_percent'], '.0f', '%')} / "
             f"{_fmt(streams['client_cpu_hold_percent'], '.0f', '%')}"),
        ]  # fmt: skip
        caption = f"held {streams['hold_seconds']:g} s after the last first event"
        console.print(_metrics_table(f"{streams['count']:,} concurrent streams", caption, rows))
    table = Table(title="targets", title_justify="left")
    table.add_column("target")
    table.add_column("value", justify="right")
    table.add_column("verdict")
    for target in doc.get("targets", []):
        met = target["met"]
        verdict = (
            "[green]met[/green]"
            if met
            else "[red]missed[/red]"
            if met is False
            else "[yellow]n/a[/yellow]"
        )
        if target.get("note"):
            verdict += f" [dim]({escape(target['note'])})[/dim]"
        table.add_row(target["name"], _fmt(target["value"], ",", f" {target['unit']}"), verdict)
    console.print(table)
    load = doc.get("load_average") or {}
    if load.get("start") is not None:
        console.print(
            f"[dim]load average (1/5/15 min): {load['start']} at start, "
            f"{load.get('end')} at the end[/dim]"
        )
    for note in doc.get("notes", []):
        console.print(f"[dim]note: {escape(note)}[/dim]")

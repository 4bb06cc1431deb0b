"""The floors under issue 9's load target (``benchmarks/stream_floor.py``).

Issue 9 asks for 1,000 streaming turns at 20 tokens/s (20,000 SSE events/s)
with delivery lag p99 < 250 ms, served by one trio process on this machine
with the client on the same machine. This module measures what the stack
under the runtime costs, with none of the runtime in the way, so the load
benchmark's numbers can be read against a floor instead of a guess.

Theory of operation
-------------------
Two measurements; in both the server is *this* process (one trio loop, so one
core at most) and the client is a separate Python process (``python -m
bench._floor``, spawned with ``trio.lowlevel.open_process``, reading raw
sockets with ``selectors``). The client prints ``{"ready": ...}`` once it is
set up and one JSON line with its counts and its own CPU time at the end. The
server's CPU is ``time.process_time()`` between those two lines; the client's
is reported too, so a busy client shows up instead of silently becoming the
bottleneck. Every client is bounded in time (its own deadline, and the
server's ``fail_after``), killed if the server side fails, and always reaped:
``client_pid`` is in every result so a test can check that it is gone.

* :func:`write_cost`: server CPU per socket write of one SSE frame
  (:data:`FRAME`, the same bytes for every server). ``writes`` frames are
  sent over ``connections`` HTTP/1.1 responses on 127.0.0.1 (port 0), by:

  - ``trio``: ``trio.serve_listeners`` and one ``SocketStream.send_all`` per
    frame: no HTTP library, the floor of a write;
  - ``hypercorn``: hypercorn's trio worker with a bare ASGI app (one
    ``http.response.body`` per frame, lifespan handled);
  - ``quart``: hypercorn + a quart-trio app returning an async generator of
    frames, as ``server/`` returns its SSE body.

  The client counts :data:`MARKER` in each connection's bytes (a frame split
  across reads is counted once), so ``delivered`` must equal ``writes``.

* :func:`stream_floor`: the load target with no HTTP at all. ``streams``
  socketpairs; per stream a model task producing ``tokens_per_second`` events
  on an absolute schedule (event k due at start + k / rate; with ``phases``
  ``spread`` the streams' starts are spread evenly over one period, as
  streams opened one after the other are, with ``aligned`` they all start at
  once, so their events fall due together) into a per-stream list +
  ``ParkingLot``, and a writer task that
  encodes what is pending (``json.dumps`` per event, SSE framing) and writes
  it with one ``send_all``, then waits for the next shared tick of ``tick``
  seconds (0: writes as soon as anything is pending, about one write per
  event). The model sleeps with ``pacer``: ``shared`` is the runtime's
  :func:`runtime._pace.sleep_until` (one trio timer per millisecond slot),
  ``trio`` a ``trio.sleep_until`` per sleeper. Each event carries its
  production time (``CLOCK_MONOTONIC``) and how late the model was; the client
  reads the same clock when the bytes arrive and reports delivery lag (read -
  production, as ``benchmarks/load.py`` measures it), the model's lateness,
  and lag from the due time (read - due: what a reader of a model producing
  on time would see; a saturated loop shows up here, not in the first).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import selectors
import socket
import subprocess
import sys
import time
import urllib.parse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._stats import p50_p99_max

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
    from quart_trio import QuartTrio

SCHEMA: Final = "agent-runtime.bench.stream_floor/1"
ROOT: Final = Path(__file__).resolve().parent.parent
#: One SSE frame of about the size of a streamed delta event (167 bytes).
FRAME: Final = b"event: x\ndata: " + b"y" * 150 + b"\n\n"
#: What the write-cost client counts: once per frame, never overlapping itself.
MARKER: Final = b"event: x\n"
#: The last chunk of a chunked HTTP/1.1 body: a hypercorn response is over.
CHUNKED_END: Final = b"0\r\n\r\n"
#: Servers of :func:`write_cost`.
SERVERS: Final = ("trio", "hypercorn", "quart")
#: Pacers of :func:`stream_floor`.
PACERS: Final = ("shared", "trio")
#: How the streams' schedules relate in :func:`stream_floor`.
PHASES: Final = ("spread", "aligned")
#: Issue 9's lag target, ms.
LAG_P99_TARGET_MS: Final = 250.0
#: Seconds for a client to start and say it is ready.
START_TIMEOUT: Final = 30.0
#: Seconds a finished client gets to exit before it is killed.
EXIT_GRACE: Final = 5.0
_EVENT: Final = "response.output_text.delta"
_DELTA_KEY: Final = b'"delta":"'


@attrs.frozen(kw_only=True)
class WriteCost:
    """One :func:`write_cost` measurement."""

    server: str
    connections: int
    #: Frames the server was asked to write (``connections`` x per connection).
    writes: int
    #: Frames the client counted.
    delivered: int
    frame_bytes: int
    server_cpu_seconds: float
    wall_seconds: float
    #: Server CPU per write, µs.
    us_per_write: float
    #: Connections whose response did not start with ``HTTP/1.1 200``.
    bad_responses: int
    client_cpu_percent: float
    client_pid: int


@attrs.frozen(kw_only=True)
class StreamFloor:
    """One :func:`stream_floor` measurement; lag summaries in ms (p50/p99/max)."""

    pacer: str
    tick: float
    phases: str
    streams: int
    tokens_per_second: float
    duration: float
    events_expected: int
    events_delivered: int
    wall_seconds: float
    events_per_second: float
    server_cpu_percent: float
    #: Server CPU per event, µs.
    us_per_event: float
    #: Client read time - production stamp (what ``benchmarks/load.py`` reports).
    lag_ms: dict[str, float | None]
    #: How late the model produced each event (production - due).
    model_late_ms: dict[str, float | None]
    #: Client read time - due time.
    due_lag_ms: dict[str, float | None]
    reads: int
    deltas_per_read: float
    client_cpu_percent: float
    client_pid: int


# -- the client process ---------------------------------------------------------------


@final
@attrs.define(eq=False)
class _Client:
    """A running client process and its JSON lines."""

    process: trio.Process
    _buf: bytearray = attrs.field(factory=bytearray, init=False)

    async def line(self) -> dict[str, Any]:
        """The client's next JSON line (RuntimeError if it exits first)."""
        stdout = self.process.stdout
        assert stdout is not None
        while (end := self._buf.find(b"\n")) < 0:
            chunk = await stdout.receive_some()
            if not chunk:
                await self.process.wait()
                raise RuntimeError(
                    f"floor client {self.process.pid} exited ({self.process.returncode}) "
                    f"after {bytes(self._buf)!r}"
                )
            self._buf += chunk
        value = json.loads(bytes(self._buf[:end]))
        del self._buf[: end + 1]
        if not isinstance(value, dict):
            raise RuntimeError(f"floor client sent {value!r}")
        if "error" in value:
            raise RuntimeError(f"floor client failed: {value['error']}")
        return value


@contextlib.asynccontextmanager
async def _open_client(args: list[str], pass_fds: Iterable[int] = ()) -> AsyncIterator[_Client]:
    """Start ``python -m bench._floor ARGS``, wait for its ready line; on exit
    wait for it (killing it at once if the block raised, after
    :data:`EXIT_GRACE` otherwise)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench._floor", *args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        pass_fds=tuple(pass_fds),
    )
    client = _Client(process)
    try:
        with trio.fail_after(START_TIMEOUT):
            ready = await client.line()
        if "ready" not in ready:
            raise RuntimeError(f"floor client sent {ready!r} instead of ready")
        yield client
    except BaseException:
        process.kill()
        raise
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(EXIT_GRACE):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


@final
class _Conn:
    __slots__ = ("head", "tail")

    def __init__(self) -> None:
        self.head = b""
        self.tail = b""


def _tcp_client(port: int, connections: int, path: str, timeout: float) -> dict[str, Any]:
    """Open ``connections`` GETs of ``path``, read every response to its end,
    count :data:`MARKER`."""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    keep = len(MARKER) - 1  # a tail shorter than the marker: never counted twice
    _emit({"ready": True})
    cpu0, wall0 = time.process_time(), time.monotonic()
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.sendall(request)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, _Conn())
    frames = reads = bad = 0
    open_ = connections
    while open_:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{open_} of {connections} responses unfinished")
        for key, _ in sel.select(1.0):
            conn: _Conn = key.data
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            data = ready.recv(1 << 20)
            if data:
                reads += 1
                if len(conn.head) < 12:
                    conn.head += data[: 12 - len(conn.head)]
                buf = conn.tail + data
                frames += buf.count(MARKER)
                conn.tail = buf[-keep:]
            if not data or buf.endswith(CHUNKED_END):
                bad += not conn.head.startswith(b"HTTP/1.1 200")
                sel.unregister(ready)
                ready.close()
                open_ -= 1
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {
        "frames": frames,
        "reads": reads,
        "bad_responses": bad,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
    }


def _pairs_client(fds: list[int], timeout: float) -> dict[str, Any]:
    """Read every socket to EOF; per event: lag, model lateness, lag from due."""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [b""])
    lags: list[float] = []
    lates: list[float] = []
    due_lags: list[float] = []
    reads = 0
    open_ = len(fds)
    _emit({"ready": True})
    cpu0, wall0 = time.process_time(), time.monotonic()
    while open_:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{open_} of {len(fds)} streams unfinished")
        for key, _ in sel.select(1.0):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            rest: list[bytes] = key.data
            data = ready.recv(1 << 16)
            if not data:
                if rest[0]:
                    raise RuntimeError(f"a stream ended mid-frame: {rest[0][:80]!r}")
                sel.unregister(ready)
                ready.close()
                open_ -= 1
                continue
            now = time.clock_gettime(time.CLOCK_MONOTONIC)
            reads += 1
            frames = (rest[0] + data).split(b"\n\n")
            rest[0] = frames.pop()
            for frame in frames:
                start = frame.index(_DELTA_KEY) + len(_DELTA_KEY)
                stamp, _, late = frame[start : frame.index(b" ", start)].partition(b":")
                produced = float(stamp)
                late_ms = float(late)
                lags.append((now - produced) * 1000)
                lates.append(late_ms)
                due_lags.append((now - produced) * 1000 + late_ms)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {
        "events": len(lags),
        "reads": reads,
        "lag_ms": p50_p99_max(lags),
        "model_late_ms": p50_p99_max(lates),
        "due_lag_ms": p50_p99_max(due_lags),
        "cpu_seconds": cpu,
        "wall_seconds": wall,
    }


def client_main(argv: list[str]) -> int:
    """``python -m bench._floor tcp PORT CONNECTIONS PATH TIMEOUT`` or
    ``python -m bench._floor pairs TIMEOUT FD,FD,...``: one JSON line when
    ready, one with the result (or ``{"error": ...}``)."""
    try:
        if argv[0] == "tcp":
            result = _tcp_client(int(argv[1]), int(argv[2]), argv[3], float(argv[4]))
        elif argv[0] == "pairs":
            result = _pairs_client([int(fd) for fd in argv[2].split(",")], float(argv[1]))
        else:
            raise ValueError(f"unknown client mode {argv[0]!r}")
    except Exception as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit({"result": result})
    return 0


# -- write cost ---------------------------------------------------------------------


def _count(query: bytes | str) -> int:
    """``n`` of a query string ``n=123``."""
    text = query.decode() if isinstance(query, bytes) else query
    return int(urllib.parse.parse_qs(text)["n"][0])


async def _trio_handler(stream: trio.SocketStream) -> None:
    """Read the request head, answer with ``n`` frames, one ``send_all`` each."""
    async with stream:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        target = head.split(b" ", 2)[1]
        n = _count(target.partition(b"?")[2])
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for _ in range(n):
            await stream.send_all(FRAME)


async def _asgi_app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """A bare ASGI app: lifespan, and ``n`` body messages of one frame each."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    n = _count(scope["query_string"])
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
            "trailers": False,
        }
    )
    for _ in range(n):
        await send({"type": "http.response.body", "body": FRAME, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _quart_app() -> QuartTrio:
    """A quart-trio app whose one route returns an async generator of ``n`` frames."""
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio(__name__, static_folder=None)

    @app.get("/s")
    async def frames() -> Response:
        n = int(request.args["n"])

        async def body() -> AsyncIterator[bytes]:
            for _ in range(n):
                yield FRAME

        response = Response(body(), 200, {"Content-Type": "text/event-stream"})
        response.timeout = None  # no 60 s cut (STACK-NOTES 2)
        return response

    return app


@contextlib.asynccontextmanager
async def _serving(server: str) -> AsyncIterator[int]:
    """``server`` listening on 127.0.0.1, port 0; yields the port, stops on exit."""
    async with trio.open_nursery() as nursery:
        if server == "trio":
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(trio.serve_listeners, _trio_handler, listeners)
            sock = listeners[0].socket
            port = int(sock.getsockname()[1])
        else:
            from hypercorn.config import Config
            from hypercorn.trio import serve

            config = Config()
            config.bind = ["127.0.0.1:0"]
            config.backlog = 4096
            config.accesslog = None
            config.errorlog = None
            app = _asgi_app if server == "hypercorn" else _quart_app()
            binds: list[str] = await nursery.start(
                partial(serve, app, config, shutdown_trigger=trio.sleep_forever)
            )
            port = int(binds[0].rsplit(":", 1)[1])
        yield port
        nursery.cancel_scope.cancel()


async def write_cost(
    server: str, connections: int, writes: int, max_seconds: float | None = None
) -> WriteCost:
    """Server CPU per write of :data:`FRAME` through ``server`` (one of
    :data:`SERVERS`), ``writes // connections`` frames on each of
    ``connections`` responses.

    Raises:
      ValueError: an unknown server, or fewer writes than connections.
      RuntimeError: the client failed; trio.TooSlowError: past ``max_seconds``
      (the client's deadline; default: 60 s + 1 ms per write).
    """
    if server not in SERVERS:
        raise ValueError(f"server must be one of {SERVERS}, not {server!r}")
    per = writes // connections if connections > 0 else 0
    if per < 1:
        raise ValueError(f"{writes} writes cannot be spread over {connections} connections")
    timeout = 60.0 + writes / 1000 if max_seconds is None else max_seconds
    with trio.fail_after(timeout + START_TIMEOUT + EXIT_GRACE):
        async with _serving(server) as port:
            gc.collect()
            args = ["tcp", str(port), str(connections), f"/s?n={per}", str(timeout)]
            async with _open_client(args) as client:
                cpu0, wall0 = time.process_time(), time.monotonic()
                result = (await client.line())["result"]
                cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    total = per * connections
    return WriteCost(
        server=server,
        connections=connections,
        writes=total,
        delivered=result["frames"],
        frame_bytes=len(FRAME),
        server_cpu_seconds=round(cpu, 4),
        wall_seconds=round(wall, 4),
        us_per_write=round(cpu / total * 1e6, 2),
        bad_responses=result["bad_responses"],
        client_cpu_percent=_percent(result["cpu_seconds"], result["wall_seconds"]),
        client_pid=client.process.pid,
    )


def _percent(cpu: float, wall: float) -> float:
    return round(100 * cpu / wall, 1) if wall > 0 else 0.0


# -- stream floor -------------------------------------------------------------------


@final
class _Ticker:
    """A shared tick: :meth:`wait` returns at the next one."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    async def run(self, period: float) -> None:
        deadline = trio.current_time()
        while True:
            deadline += period
            await trio.sleep_until(deadline)
            event, self._event = self._event, trio.Event()
            event.set()

    async def wait(self) -> None:
        await self._event.wait()


@final
class _Pending:
    """One stream's events, appended by its model, taken by its writer."""

    __slots__ = ("done", "events", "lot")

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lot = trio.lowlevel.ParkingLot()
        self.done = False


async def _model(
    pending: _Pending,
    sleep_until: Callable[[float], Awaitable[None]],
    start: float,
    rate: float,
    count: int,
) -> None:
    """``count`` events, event k due at ``start + k / rate``."""
    try:
        for k in range(1, count + 1):
            due = start + k / rate
            await sleep_until(due)
            late_ms = (trio.current_time() - due) * 1000
            stamp = time.clock_gettime(time.CLOCK_MONOTONIC)
            pending.events.append(
                {
                    "type": _EVENT,
                    "item_id": "msg_floor",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": f"{stamp:.6f}:{late_ms:.3f} ",
                    "sequence_number": k,
                }
            )
            pending.lot.unpark_all()
    finally:
        pending.done = True
        pending.lot.unpark_all()


def _encode(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {_EVENT}\ndata: {data}\n\n".encode()


async def _writer(pending: _Pending, stream: trio.SocketStream, ticker: _Ticker | None) -> None:
    """Write what is pending in one ``send_all``; then wait for the tick, if any."""
    async with stream:
        sent = 0
        while True:
            if sent == len(pending.events):
                if pending.done:
                    return
                await pending.lot.park()
                continue
            batch = pending.events[sent:]
            sent += len(batch)
            await stream.send_all(b"".join(map(_encode, batch)))
            if ticker is not None:
                await ticker.wait()


async def stream_floor(
    streams: int,
    tokens_per_second: float,
    duration: float,
    *,
    tick: float,
    pacer: str,
    phases: str = "spread",
    max_seconds: float | None = None,
) -> StreamFloor:
    """``streams`` paced streams over socketpairs to a client process, no HTTP.

    Args:
      tick: seconds between a stream's writes (0: write whenever anything is pending).
      pacer: ``shared`` (:func:`runtime._pace.sleep_until`) or ``trio``
        (``trio.sleep_until``).
      phases: ``spread`` (stream i starts i / (streams x rate) after the
        first) or ``aligned`` (all at once).
      max_seconds: the client's deadline, and about the run's (default: 10 x
        duration + 60 s).

    Raises:
      ValueError: bad arguments. RuntimeError: the client failed.
      trio.TooSlowError: past ``max_seconds``.
    """
    from runtime import _pace

    if pacer not in PACERS:
        raise ValueError(f"pacer must be one of {PACERS}, not {pacer!r}")
    if phases not in PHASES:
        raise ValueError(f"phases must be one of {PHASES}, not {phases!r}")
    count = math.floor(duration * tokens_per_second)
    if streams < 1 or count < 1 or tick < 0:
        raise ValueError(f"nothing to measure: {streams} streams of {count} events, tick {tick}")
    sleep_until = _pace.sleep_until if pacer == "shared" else trio.sleep_until
    spread = phases == "spread"
    timeout = 10 * duration + 60.0 if max_seconds is None else max_seconds
    pairs = [socket.socketpair() for _ in range(streams)]
    try:
        ours = [trio.SocketStream(trio.socket.from_stdlib_socket(a)) for a, _ in pairs]
        theirs = [b.fileno() for _, b in pairs]
        args = ["pairs", str(timeout), ",".join(map(str, theirs))]
        with trio.fail_after(timeout + START_TIMEOUT + EXIT_GRACE):
            async with _open_client(args, pass_fds=theirs) as client:
                for _, b in pairs:
                    b.close()
                gc.collect()
                ticker = _Ticker() if tick > 0 else None
                cpu0, wall0 = time.process_time(), time.monotonic()
                async with trio.open_nursery() as outer:
                    if ticker is not None:
                        outer.start_soon(ticker.run, tick)
                    async with trio.open_nursery() as nursery:
                        start = trio.current_time()
                        for i, stream in enumerate(ours):
                            pending = _Pending()
                            offset = i / (streams * tokens_per_second) if spread else 0.0
                            nursery.start_soon(
                                _model,
                                pending,
                                sleep_until,
                                start + offset,
                                tokens_per_second,
                                count,
                            )
                            nursery.start_soon(_writer, pending, stream, ticker)
                    outer.cancel_scope.cancel()
                cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
                result = (await client.line())["result"]
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    delivered = result["events"]
    return StreamFloor(
        pacer=pacer,
        tick=tick,
        phases=phases,
        streams=streams,
        tokens_per_second=tokens_per_second,
        duration=duration,
        events_expected=streams * count,
        events_delivered=delivered,
        wall_seconds=round(wall, 3),
        events_per_second=round(streams * count / wall, 1),
        server_cpu_percent=_percent(cpu, wall),
        us_per_event=round(cpu / (streams * count) * 1e6, 2),
        lag_ms=result["lag_ms"],
        model_late_ms=result["model_late_ms"],
        due_lag_ms=result["due_lag_ms"],
        reads=result["reads"],
        deltas_per_read=round(delivered / result["reads"], 2) if result["reads"] else 0.0,
        client_cpu_percent=_percent(result["cpu_seconds"], result["wall_seconds"]),
        client_pid=client.process.pid,
    )


# -- the document -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class FloorOptions:
    """The options of one ``benchmarks/stream_floor.py`` run (echoed in its JSON)."""

    #: Frames per write-cost measurement (0: skip the write costs).
    writes: int = 50_000
    connections: tuple[int, ...] = (1, 100)
    servers: tuple[str, ...] = SERVERS
    #: Streams of the stream floor (0: skip it).
    streams: int = 1000
    tokens_per_second: float = 20.0
    duration: float = 10.0
    #: (pacer, tick, phases) per stream-floor run.
    configs: tuple[tuple[str, float, str], ...] = (
        ("shared", 0.1, "spread"),
        ("shared", 0.1, "aligned"),
        ("shared", 0.0, "spread"),
        ("trio", 0.1, "spread"),
    )


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stream-floor run: issue 9's lag target, read from the due time (a
    loop that falls behind its schedule misses it), with every event delivered."""
    out = []
    for run in doc["stream_floor"]:
        p99 = run["due_lag_ms"]["p99"]
        out.append(
            {
                "name": f"{run['pacer']} pacer, tick {run['tick']:g} s, {run['phases']}: "
                f"{run['streams']} streams at {run['tokens_per_second']:g}/s, "
                "lag from due p99 < 250 ms",
                "value": p99,
                "met": run["events_delivered"] == run["events_expected"]
                and p99 is not None
                and p99 < LAG_P99_TARGET_MS,
            }
        )
    return out


async def run_floor(
    options: FloorOptions, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Every measurement ``options`` asks for; the JSON document."""
    from ._samples import machine_info
    from ._sessions import raise_fd_limit

    needed = 2 * options.streams + 1024
    fd_limit = raise_fd_limit(needed)
    if fd_limit < needed:
        log(f"warning: RLIMIT_NOFILE is {fd_limit}, below the {needed} this run may need")
    doc: dict[str, Any] = {
        "kind": "stream_floor",
        "schema": SCHEMA,
        "machine": machine_info(),
        "client": "one Python process on the server's machine: selectors over raw sockets",
        "options": attrs.asdict(options),
        "started_at": time.time(),
        "load_average_start": list(os.getloadavg()),
        "write_cost": [],
        "stream_floor": [],
    }
    if options.writes:
        for server in options.servers:
            for connections in options.connections:
                cost = await write_cost(server, connections, options.writes)
                log(
                    f"write cost: {server}, {connections} connections: "
                    f"{cost.us_per_write} µs per write, {cost.delivered}/{cost.writes} delivered"
                )
                doc["write_cost"].append(attrs.asdict(cost))
    if options.streams:
        for pacer, tick, phases in options.configs:
            run = await stream_floor(
                options.streams,
                options.tokens_per_second,
                options.duration,
                tick=tick,
                pacer=pacer,
                phases=phases,
            )
            log(
                f"stream floor: {pacer} pacer, tick {tick:g}, {phases}: "
                f"{run.events_per_second} events/s, {run.us_per_event} µs per event, "
                f"lag from due p99 {run.due_lag_ms['p99']} ms"
            )
            doc["stream_floor"].append(attrs.asdict(run))
    doc["load_average_end"] = list(os.getloadavg())
    doc["finished_at"] = time.time()
    doc["targets"] = targets(doc)
    return doc


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))

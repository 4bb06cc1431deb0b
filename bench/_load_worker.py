"""One client process of the load benchmark: many SSE streams over raw sockets.

Run as ``python -m bench._load_worker``; :mod:`bench._load` starts several.

Theory of operation
-------------------
The client must measure the server, not itself: each worker is its own
process, speaks HTTP/1.1 on raw trio sockets (:mod:`bench._rawhttp`), and per
event only splits frames, reads ``id:``/``event:`` and, for a text delta, the
stamp the benchmark's model wrote into it (no JSON decoding). Each stream is a
stateless streamed response (``POST /v1/responses``) or a session turn
(``POST /v1/sessions`` then ``POST .../messages``), on its own connection.

Two modes:

* ``idle``: open ``streams`` streams (``OPEN_CONCURRENCY`` opening at once),
  each read until its first event, then held open and read (pings) until the
  parent closes our stdin; every stream that got its first event is ``held``.
* ``stream``: open the streams and read each to its terminal event, checking
  that ids run 0, 1, 2, ... with no gap, that exactly one terminal event comes
  last and is a completion, and that every word of the turn arrived as one
  delta. Each delta's content is ``"STAMP:LATE "``: the server's
  ``CLOCK_MONOTONIC`` when the model produced it (the clock is system-wide,
  so comparable with ours on the same machine) and how late the model was on
  its schedule, ms. Delivery lag = our ``CLOCK_MONOTONIC`` when the bytes were
  read - STAMP; lag from due = delivery lag + LATE (read - when the word was
  due: a server too busy to run its model on time shows here, not in the
  delivery lag). Each is kept in a histogram of 0.1 ms buckets.

Line protocol (JSON lines)
--------------------------
stdin: a :class:`LoadWorkerConfig` line; we answer ``{"ready": PID}``; an
``open`` line starts the streams; ``idle`` answers ``{"opened": Report}`` once
every stream got its first event (or failed), ``stream`` answers
``{"done": Report}`` once every stream ended. Then EOF on stdin makes an idle
worker close its streams; the last line is ``{"stats": ...}`` (CPU, wall time,
loop lag), exit status 0.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._http_worker import TERMINALS
from ._rawhttp import Body, Connection, FrameSplitter, Origin, event_type
from ._stats import percentile

if TYPE_CHECKING:
    from collections.abc import Callable

#: Streams being opened at once per worker (the rest wait their turn).
OPEN_CONCURRENCY: Final = 100
#: How often the loop-lag probe wakes, seconds.
LAG_PROBE: Final = 0.01
#: Distinct error messages kept (with counts).
MAX_ERROR_KINDS: Final = 20
COMPLETED: Final = frozenset({b"message.completed", b"response.completed"})
DELTAS: Final = {
    True: (b"response.output_text.delta", b'"delta":"'),
    False: (b"text.delta", b'"content":"'),
}


def now() -> float:
    """The system-wide monotonic clock (the model's stamps use the same)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@attrs.frozen(kw_only=True)
class LoadWorkerConfig:
    url: str
    api_key: str
    mode: str  # "idle" or "stream"
    streams: int
    #: Words each turn asks for (the model streams them at the server's rate).
    words: int
    stateless: bool = True
    #: Bound on connecting and on the first event, and (stream mode) on each
    #: later read, seconds.
    timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.mode not in ("idle", "stream"):
            raise ValueError(f"mode must be idle or stream, not {self.mode!r}")
        if self.streams < 0 or self.words < 1:
            raise ValueError(f"streams must be >= 0 and words >= 1: {self.streams}/{self.words}")


@attrs.define
class Report:
    """What a worker saw (its part of the run)."""

    streams: int = 0
    #: Streams that got their first event (idle) / ended correctly (stream).
    ok: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    first_event_ms: list[float] = attrs.field(factory=list)
    events: int = 0
    deltas: int = 0
    #: Delivery lag, the model's lateness, and lag from the due time (the two
    #: summed), ms: {bucket (0.1 ms): count}.
    lag_hist: collections.Counter[int] = attrs.field(factory=collections.Counter)
    late_hist: collections.Counter[int] = attrs.field(factory=collections.Counter)
    due_hist: collections.Counter[int] = attrs.field(factory=collections.Counter)
    #: Bytes of SSE frames per read, summed (with ``reads``: the coalescing).
    reads: int = 0
    #: CLOCK_MONOTONIC of the first request and of the last terminal event.
    started: float | None = None
    ended: float | None = None

    def error(self, message: str) -> None:
        if message in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[message] = self.errors.get(message, 0) + 1
        else:
            self.errors["(other)"] = self.errors.get("(other)", 0) + 1

    def as_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["lag_hist"] = {str(k): v for k, v in self.lag_hist.items()}
        data["late_hist"] = {str(k): v for k, v in self.late_hist.items()}
        data["due_hist"] = {str(k): v for k, v in self.due_hist.items()}
        return data


def _error_text(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:200]


@attrs.define(eq=False)
class _Stream:
    worker: _Worker
    n: int
    conn: Connection | None = None

    async def open(self) -> Body:
        """Connect, start the turn, return its body once the head is read."""
        w = self.worker
        cfg = w.config
        text = f"Write a {cfg.words}-word essay on load [load {os.getpid()}-{self.n}]"
        self.conn = conn = await w.origin.connect()
        if cfg.stateless:
            path = "/v1/responses"
            body = json.dumps({"input": text, "stream": True}).encode()
        else:
            head, raw = await conn.request("POST", "/v1/sessions", b"{}")
            if head.status != 201:
                raise RuntimeError(f"POST /v1/sessions: HTTP {head.status}")
            path = f"/v1/sessions/{json.loads(raw)['id']}/messages"
            body = json.dumps({"message": text}).encode()
        await conn.send("POST", path, body)
        head = await conn.read_head()
        if head.status != 200:
            raw = await conn.read_body(head)
            raise RuntimeError(f"HTTP {head.status}: {raw[:100]!r}")
        return conn.body(head)

    async def hold(self, opened: Callable[[], None]) -> None:
        """idle: read the first event, report it, then read until cancelled."""
        report = self.worker.report
        t0 = now()
        try:
            with trio.fail_after(self.worker.config.timeout):
                body = await self.open()
                splitter = FrameSplitter()
                while not any(event_type(f) for f in splitter.feed(await self._more(body))):
                    pass
            report.first_event_ms.append((now() - t0) * 1e3)
            report.ok += 1
        except Exception as exc:
            report.error(_error_text(exc))
            opened()
            return
        opened()
        try:
            while True:
                data = await self._more(body)
                for frame in splitter.feed(data):
                    if event_type(frame) is not None:
                        report.events += 1
        except Exception as exc:
            report.ok -= 1  # held, then lost before the end
            report.error("held stream lost: " + _error_text(exc))

    async def run(self) -> None:
        """stream: read the turn to its terminal event, checking it as it comes."""
        w = self.worker
        report = w.report
        cfg = w.config
        delta_type, marker = DELTAS[cfg.stateless]
        t0 = now()
        if report.started is None:
            report.started = t0
        expected = 0
        deltas = 0
        terminal: bytes | None = None
        try:
            with trio.fail_after(cfg.timeout):
                body = await self.open()
            splitter = FrameSplitter()
            while terminal is None:
                with trio.fail_after(cfg.timeout):
                    data = await self._more(body)
                received = now()
                report.reads += 1
                for frame in splitter.feed(data):
                    kind = event_type(frame)
                    if kind is None:
                        continue
                    if terminal is not None:
                        raise RuntimeError(f"an event after the terminal {terminal!r}")
                    end = frame.find(b"\n")
                    if not frame.startswith(b"id: ") or int(frame[4:end]) != expected:
                        raise RuntimeError(f"event {frame[:end]!r} where id {expected} was due")
                    if expected == 0:
                        report.first_event_ms.append((received - t0) * 1e3)
                    expected += 1
                    if kind == delta_type:
                        deltas += 1
                        at = frame.index(marker) + len(marker)
                        colon = frame.index(b":", at)
                        stamp = float(frame[at:colon])
                        late = float(frame[colon + 1 : frame.index(b" ", colon)])
                        lag = (received - stamp) * 1e3
                        report.lag_hist[int(lag * 10)] += 1
                        report.late_hist[int(late * 10)] += 1
                        report.due_hist[int((lag + late) * 10)] += 1
                    elif kind in TERMINALS:
                        terminal = kind
            report.events += expected
            report.deltas += deltas
            report.ended = max(report.ended or 0.0, now())
            if terminal not in COMPLETED:
                raise RuntimeError(f"the turn ended {terminal!r}")
            if deltas != cfg.words:
                raise RuntimeError(f"{deltas} deltas of {cfg.words} words")
            report.ok += 1
        except Exception as exc:
            report.error(_error_text(exc))
        finally:
            await self.close()

    async def _more(self, body: Body) -> bytes:
        data = await body.receive()
        if not data:
            raise RuntimeError("the stream ended early")
        return data

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.aclose()


@attrs.define(eq=False)
class _Worker:
    config: LoadWorkerConfig
    origin: Origin
    report: Report = attrs.field(factory=Report)

    async def run_idle(
        self, out: Callable[[dict[str, Any]], None], stdin_closed: trio.Event
    ) -> None:
        cfg = self.config
        self.report.streams = cfg.streams
        limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
        pending = cfg.streams
        all_opened = trio.Event()
        streams = [_Stream(self, n) for n in range(cfg.streams)]

        async def one(stream: _Stream) -> None:
            released = False

            def opened() -> None:
                nonlocal pending, released
                pending -= 1
                released = True
                limiter.release_on_behalf_of(stream)
                if pending == 0:
                    all_opened.set()

            await limiter.acquire_on_behalf_of(stream)
            try:
                await stream.hold(opened)
            finally:
                if not released:
                    limiter.release_on_behalf_of(stream)
                await stream.close()

        if pending == 0:
            all_opened.set()
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(one, stream)
            await all_opened.wait()
            out({"opened": self.report.as_json()})
            await stdin_closed.wait()
            nursery.cancel_scope.cancel()

    async def run_stream(self, out: Callable[[dict[str, Any]], None]) -> None:
        self.report.streams = self.config.streams
        async with trio.open_nursery() as nursery:
            for n in range(self.config.streams):
                nursery.start_soon(_Stream(self, n).run)
        out({"done": self.report.as_json()})


async def _probe_lag(lags: list[float]) -> None:
    while True:
        start = time.perf_counter()
        await trio.sleep(LAG_PROBE)
        lags.append(time.perf_counter() - start - LAG_PROBE)


async def _main(config: LoadWorkerConfig) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdin_closed = trio.Event()

    def out(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def watch_stdin() -> None:
        async with stdin:
            while await stdin.receive_some():
                pass
        stdin_closed.set()

    lags: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    worker = _Worker(config, Origin.parse(config.url, config.api_key))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_probe_lag, lags)
        nursery.start_soon(watch_stdin)
        if config.mode == "idle":
            await worker.run_idle(out, stdin_closed)
        else:
            await worker.run_stream(out)
            await stdin_closed.wait()
        nursery.cancel_scope.cancel()
    out(
        {
            "stats": {
                "cpu_seconds": time.process_time() - cpu0,
                "wall_seconds": time.perf_counter() - wall0,
                "loop_lag_p99_ms": percentile(lags, 99) * 1e3 if lags else 0.0,
                "loop_lag_max_ms": max(lags, default=0.0) * 1e3,
            }
        }
    )


def main() -> int:
    """Config line in, ready line out, ``open`` line in, then run (see the docstring)."""
    try:
        config = LoadWorkerConfig(**json.loads(sys.stdin.buffer.readline()))
    except (ValueError, TypeError) as exc:
        print(json.dumps({"error": f"bad worker config: {exc}"}), flush=True)
        return 2
    print(json.dumps({"ready": os.getpid()}), flush=True)
    if sys.stdin.buffer.readline().strip() != b"open":
        return 0  # the parent gave up before starting us
    trio.run(_main, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

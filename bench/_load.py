"""The load benchmark of issue 9 (``benchmarks/load.py``): idle streams and paced streams.

Theory of operation
-------------------
Phases, each against its own ``agent-runtime serve`` subprocess (temporary
data dir, random key, SIGTERM at the end, SIGKILL after a grace):

* **idle**: ``idle_streams`` streams are opened and held. An idle stream is a
  streamed turn whose model is waiting (it is paced at one word per
  :data:`IDLE_SECONDS_PER_WORD`): the request, its turn, its buffer and its
  SSE writer are all live, and nothing but ``: ping`` flows. While they are
  held, this process probes ``GET /health`` on one keep-alive connection
  (:data:`HEALTH_INTERVAL` apart) for ``health_seconds``; the server's RSS is
  read before the streams and once they are all open, and
  (RSS with N streams - RSS before) / N is the memory per idle stream.
* **stream**: ``streams`` turns at once, each of ``tokens_per_second *
  duration`` words paced at ``tokens_per_second``: the turns last
  ``duration`` seconds. Every event is checked (contiguous ids, one terminal
  event, a completion, every word delivered) and each delta's delivery lag is
  measured: the model stamps each word with the server's ``CLOCK_MONOTONIC``
  when it produced it, and the client subtracts it from its own clock when it
  reads the bytes (the same system-wide clock: the client must run on the
  server's machine, which it does: we start the server). Adding how late the
  model produced the word gives its lag from the due time, on which the
  target is judged. ``/health`` is probed meanwhile too.
* **capacity** (``capacity_streams``): the stream phase again, once per
  count, ``capacity_duration`` seconds each, each on a fresh server: where
  below ``streams`` the lag target still holds.

The server is the real ``agent-runtime serve`` with one substitution: its demo
model is :class:`StampedModel`, which streams the requested number of words at
the ``--demo-tokens-per-second`` rate on an absolute schedule (word k is due
at start + k / rate, so the model's own lateness does not accumulate) and
writes into each word its production time and how late it was. It paces
with :func:`runtime._pace.sleep_until` (one trio timer per millisecond for
all streams), as the demo model does. The load comes
from worker processes (:mod:`bench._load_worker`, raw sockets, at most
:data:`IDLE_PER_WORKER` / :data:`STREAMS_PER_WORKER` streams each), whose CPU
use and loop lag are reported: a busy client would measure itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import psutil
import trio

from runtime import TextChunk, UsageChunk, _pace as pace

from ._http import JsonLines
from ._load_worker import LoadWorkerConfig, now
from ._rawhttp import Origin
from ._samples import machine_info
from ._sessions import raise_fd_limit
from ._stats import p50_p99_max

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Callable

    from runtime import ModelChunk, ModelRequest

SCHEMA: Final = "agent-runtime.bench.load/1"
#: Targets of issue 9.
HEALTH_P99_TARGET_MS: Final = 50.0
LAG_P99_TARGET_MS: Final = 250.0
RSS_PER_IDLE_TARGET_KB: Final = 40.0
#: An idle stream's model produces one word this often (never, in a run).
IDLE_SECONDS_PER_WORD: Final = 3600.0
IDLE_WORDS: Final = 10
#: Streams per client worker process.
IDLE_PER_WORKER: Final = 1250
STREAMS_PER_WORKER: Final = 250
HEALTH_INTERVAL: Final = 0.01
#: Seconds the streams settle (first pings, allocator) before RSS is read.
SETTLE_SECONDS: Final = 1.0
START_TIMEOUT: Final = 30.0
STOP_GRACE: Final = 30.0
#: Bound on opening every idle stream.
OPEN_TIMEOUT: Final = 300.0
ROOT: Final = Path(__file__).resolve().parent.parent
SERVER_CODE: Final = (
    "import server._cli as cli\n"
    "from bench._load import StampedModel\n"
    "cli.DemoModel = StampedModel\n"
    "raise SystemExit(cli.main())\n"
)
_WORDS_RE: Final = re.compile(r"(\d+)-word")


@final
@attrs.define(eq=False)
class StampedModel:
    """The benchmark's model: ``N`` words for "a N-word essay", each
    ``"STAMP:LATE "`` (the ``CLOCK_MONOTONIC`` at which it was produced, and
    how many ms after its due time), paced on an absolute schedule."""

    tokens_per_second: float | None = 50.0
    name: str = "demo"

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        text = request.messages[-1].content if request.messages else ""
        match = _WORDS_RE.search(text)
        count = int(match.group(1)) if match else IDLE_WORDS
        period = 1.0 / self.tokens_per_second if self.tokens_per_second else 0.0
        start = trio.current_time()
        for k in range(1, count + 1):
            due = start + k * period
            if period:
                await pace.sleep_until(due)
            else:
                await trio.lowlevel.checkpoint()
            late = (trio.current_time() - due) * 1e3
            yield TextChunk(f"{now():.6f}:{late:.2f} ")
        yield UsageChunk(input_tokens=len(text.split()), output_tokens=count)


@attrs.frozen(kw_only=True)
class LoadOptions:
    idle_streams: int = 5000
    streams: int = 1000
    tokens_per_second: float = 20.0
    duration: float = 120.0
    health_seconds: float = 10.0
    #: Stateless streamed responses (POST /v1/responses) or session turns.
    stateless: bool = True
    #: Client worker processes per phase (0: automatic).
    processes: int = 0
    #: Further streaming phases at these stream counts (``capacity_duration``
    #: each): where between none and ``streams`` the lag target still holds.
    capacity_streams: tuple[int, ...] = ()
    capacity_duration: float = 30.0

    def __attrs_post_init__(self) -> None:
        if self.idle_streams < 0 or self.streams < 0:
            raise ValueError("stream counts must be >= 0")
        if any(n <= 0 for n in self.capacity_streams) or not self.capacity_duration > 0:
            raise ValueError("capacity stream counts and duration must be > 0")
        if not (self.tokens_per_second > 0 and self.duration > 0 and self.health_seconds > 0):
            raise ValueError("tokens per second, duration and health seconds must be > 0")


# -- the server ----------------------------------------------------------------------


@attrs.define
class Server:
    process: trio.Process
    url: str
    api_key: str = attrs.field(repr=False)
    log: Path

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def fds(self) -> int:
        return int(psutil.Process(self.process.pid).num_fds())


@contextlib.asynccontextmanager
async def run_server(tokens_per_second: float) -> AsyncIterator[Server]:
    """``agent-runtime serve`` with :class:`StampedModel` at ``tokens_per_second``
    words/s, on a free port; SIGTERM (then SIGKILL) and its directory removed on exit."""
    with tempfile.TemporaryDirectory(prefix="agent-runtime-load-") as tmp:
        key = "pk_load_" + secrets.token_hex(16)
        log = Path(tmp) / "server.log"
        command = [
            sys.executable, "-c", SERVER_CODE, "serve", "--port", "0",
            "--data-dir", str(Path(tmp) / "data"), "--api-key", key,
            "--demo-tokens-per-second", repr(tokens_per_second),
        ]  # fmt: skip
        with log.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=_env(),
                # Its own session: a terminal's Ctrl-C reaches only us, and we
                # stop it (SIGTERM to benchmarks/load.py does too). No
                # PR_SET_PDEATHSIG: trio forks from a worker thread, whose exit
                # would fire it.
                start_new_session=True,
            )
        server = Server(process, "", key, log)
        try:
            with trio.fail_after(START_TIMEOUT):
                while True:
                    text = (await trio.Path(log).read_bytes()).decode(errors="replace")
                    if (match := re.search(r"serving on (http://\S+)", text)) is not None:
                        server.url = match.group(1).rstrip(",")
                        break
                    if process.returncode is not None:
                        raise RuntimeError(f"the server exited before serving:\n{text[-2000:]}")
                    await trio.sleep(0.05)
            yield server
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGTERM)
                    with trio.move_on_after(STOP_GRACE):
                        await process.wait()
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# -- client workers -------------------------------------------------------------------


@attrs.define(eq=False)
class _Workers:
    """Worker processes of one phase and the lines they sent."""

    processes: list[trio.Process] = attrs.field(factory=list)
    replies: list[dict[str, Any]] = attrs.field(factory=list)
    stats: list[dict[str, Any]] = attrs.field(factory=list)


@contextlib.asynccontextmanager
async def open_workers(
    configs: list[LoadWorkerConfig], expect: str
) -> AsyncIterator[tuple[_Workers, Callable[[], Any]]]:
    """Start one worker per config, wait until all are ready, send ``open`` to all.

    Yields the workers and an async function waiting for every worker's
    ``expect`` reply (``opened``/``done``). Leaving the block closes their stdin
    and waits for their last line (killing them after a grace).
    """
    workers = _Workers()
    got_reply = trio.Semaphore(0)

    async def drive(config: LoadWorkerConfig, task_status: trio.TaskStatus[None]) -> None:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench._load_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=_env(),
        )
        workers.processes.append(process)
        assert process.stdin is not None
        assert process.stdout is not None
        lines = JsonLines(process.stdout)
        try:
            await process.stdin.send_all(json.dumps(attrs.asdict(config)).encode() + b"\n")
            first = await lines.next()
            if first is None or "ready" not in first:
                raise RuntimeError(f"load worker failed to start: {first!r}")
            task_status.started()
            replied = False
            while (message := await lines.next()) is not None:
                if expect in message:
                    replied = True
                    workers.replies.append(message[expect])
                    got_reply.release()
                elif "stats" in message:
                    workers.stats.append(message["stats"])
                else:
                    raise RuntimeError(f"load worker sent {message!r}")
            if not replied:
                await process.wait()
                raise RuntimeError(
                    f"load worker {process.pid} exited ({process.returncode}) before its reply"
                )
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    async def wait_replies() -> None:
        for _ in configs:
            await got_reply.acquire()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            for config in configs:
                await nursery.start(drive, config)
        for process in workers.processes:
            assert process.stdin is not None
            await process.stdin.send_all(b"open\n")
        try:
            yield workers, wait_replies
        finally:
            for process in workers.processes:
                assert process.stdin is not None
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await process.stdin.aclose()


def _split(total: int, per_worker: int, processes: int) -> list[int]:
    count = processes or max(1, math.ceil(total / per_worker))
    count = max(1, min(count, total))
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


# -- probes -----------------------------------------------------------------------


async def probe_health(url: str, api_key: str, seconds: float, samples: list[float]) -> None:
    """``GET /health`` every :data:`HEALTH_INTERVAL` on one keep-alive
    connection for ``seconds``; the latencies (ms) go to ``samples``."""
    origin = Origin.parse(url, api_key)
    conn = await origin.connect()
    try:
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            head, _ = await conn.request("GET", "/health")
            samples.append((time.perf_counter() - t0) * 1e3)
            if head.status != 200:
                raise RuntimeError(f"GET /health answered {head.status}")
            await trio.sleep(HEALTH_INTERVAL)
    finally:
        await conn.aclose()


def _hist_summary(hist: dict[int, int]) -> dict[str, float | None]:
    """p50/p99/max (ms) of a histogram of 0.1 ms buckets."""
    total = sum(hist.values())
    if not total:
        return {"p50": None, "p99": None, "max": None}
    keys = sorted(hist)
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        rank, seen = q * total, 0
        for key in keys:
            seen += hist[key]
            if seen >= rank:
                out[name] = key / 10
                break
    out["max"] = keys[-1] / 10
    return out


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    lag: dict[int, int] = {}
    late: dict[int, int] = {}
    due: dict[int, int] = {}
    first: list[float] = []
    for report in reports:
        for message, count in report["errors"].items():
            errors[message] = errors.get(message, 0) + count
        for hist, into in (
            (report["lag_hist"], lag),
            (report["late_hist"], late),
            (report["due_hist"], due),
        ):
            for key, count in hist.items():
                into[int(key)] = into.get(int(key), 0) + count
        first += report["first_event_ms"]
    started = [r["started"] for r in reports if r["started"] is not None]
    ended = [r["ended"] for r in reports if r["ended"] is not None]
    return {
        "streams": sum(r["streams"] for r in reports),
        "ok": sum(r["ok"] for r in reports),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "events": sum(r["events"] for r in reports),
        "deltas": sum(r["deltas"] for r in reports),
        "reads": sum(r["reads"] for r in reports),
        "first_event_ms": p50_p99_max(first),
        "lag_ms": _hist_summary(lag),
        "model_late_ms": _hist_summary(late),
        "due_lag_ms": _hist_summary(due),
        "seconds": (max(ended) - min(started)) if started and ended else None,
    }


def _client(workers: _Workers) -> dict[str, Any]:
    return {
        "processes": len(workers.processes),
        "cpu_percent": [
            round(100 * s["cpu_seconds"] / s["wall_seconds"], 1) if s["wall_seconds"] else None
            for s in workers.stats
        ],
        "loop_lag_p99_ms": [round(s["loop_lag_p99_ms"], 2) for s in workers.stats],
    }


# -- the phases ---------------------------------------------------------------------


def _configs(
    server: Server, options: LoadOptions, mode: str, total: int, per_worker: int, words: int
) -> list[LoadWorkerConfig]:
    """One worker config per client process, ``total`` streams split among them."""
    return [
        LoadWorkerConfig(
            url=server.url,
            api_key=server.api_key,
            mode=mode,
            streams=share,
            words=words,
            stateless=options.stateless,
        )
        for share in _split(total, per_worker, options.processes)
    ]


async def idle_phase(options: LoadOptions, log: Callable[[str], None]) -> dict[str, Any]:
    n = options.idle_streams
    async with run_server(1.0 / IDLE_SECONDS_PER_WORD) as server:
        health_before: list[float] = []
        await probe_health(server.url, server.api_key, 0.3, health_before)  # warm-up
        rss_before, fds_before = server.rss(), server.fds()
        configs = _configs(server, options, "idle", n, IDLE_PER_WORKER, IDLE_WORDS)
        log(f"idle: opening {n} streams from {len(configs)} client processes")
        started = time.perf_counter()
        async with open_workers(configs, "opened") as (workers, wait_replies):
            with trio.fail_after(OPEN_TIMEOUT):
                await wait_replies()
            open_seconds = time.perf_counter() - started
            await trio.sleep(SETTLE_SECONDS)
            rss_held, fds_held = server.rss(), server.fds()
            log(f"idle: {n} streams open in {open_seconds:.1f} s; probing /health")
            cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
            health: list[float] = []
            await probe_health(server.url, server.api_key, options.health_seconds, health)
            server_cpu = 100 * (server.cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
        merged = _merge(workers.replies)
        held = merged["ok"]
        return {
            "streams": n,
            "held": held,
            "errors": merged["errors"],
            "error_kinds": merged["error_kinds"],
            "open_seconds": round(open_seconds, 2),
            "first_event_ms": merged["first_event_ms"],
            "health_ms": p50_p99_max(health),
            "health_samples": len(health),
            "health_idle_ms": p50_p99_max(health_before),
            "rss_before_mb": round(rss_before / 2**20, 2),
            "rss_held_mb": round(rss_held / 2**20, 2),
            "rss_per_stream_kb": round((rss_held - rss_before) / held / 1024, 2) if held else None,
            "fds_before": fds_before,
            "fds_held": fds_held,
            "server_cpu_percent_while_held": round(server_cpu, 1),
            "client": _client(workers),
        }


async def stream_phase(options: LoadOptions, log: Callable[[str], None]) -> dict[str, Any]:
    n = options.streams
    words = max(1, round(options.tokens_per_second * options.duration))
    async with run_server(options.tokens_per_second) as server:
        await probe_health(server.url, server.api_key, 0.5, [])  # warm-up
        rss_before = server.rss()
        configs = _configs(server, options, "stream", n, STREAMS_PER_WORKER, words)
        log(
            f"stream: {n} streams x {words} words at {options.tokens_per_second:g}/s "
            f"from {len(configs)} client processes"
        )
        health: list[float] = []
        rss_peak = rss_before
        cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
        async with open_workers(configs, "done") as (workers, wait_replies):
            async with trio.open_nursery() as nursery:

                async def sample() -> None:
                    nonlocal rss_peak
                    while True:
                        await trio.sleep(1.0)
                        rss_peak = max(rss_peak, server.rss())

                nursery.start_soon(sample)
                nursery.start_soon(
                    partial(probe_health, server.url, server.api_key, options.duration, health)
                )
                # No overall bound: a server that falls behind makes the turns
                # last longer (reported); each worker's reads are bounded.
                await wait_replies()
                nursery.cancel_scope.cancel()
            wall = time.perf_counter() - wall0
            server_cpu = 100 * (server.cpu_seconds() - cpu0) / wall
            rss_after = server.rss()
        merged = _merge(workers.replies)
        seconds = merged["seconds"]
        return {
            "streams": n,
            "words_per_stream": words,
            "tokens_per_second": options.tokens_per_second,
            "completed": merged["ok"],
            "errors": merged["errors"],
            "error_kinds": merged["error_kinds"],
            "events": merged["events"],
            "deltas": merged["deltas"],
            "deltas_expected": n * words,
            "seconds": round(seconds, 2) if seconds else None,
            "event_rate": round(merged["events"] / seconds, 1) if seconds else None,
            "deltas_per_read": round(merged["deltas"] / merged["reads"], 2)
            if merged["reads"]
            else None,
            "lag_ms": merged["lag_ms"],
            "model_late_ms": merged["model_late_ms"],
            "due_lag_ms": merged["due_lag_ms"],
            "first_event_ms": merged["first_event_ms"],
            "health_ms": p50_p99_max(health),
            "rss_before_mb": round(rss_before / 2**20, 2),
            "rss_peak_mb": round(rss_peak / 2**20, 2),
            "rss_after_mb": round(rss_after / 2**20, 2),
            "server_cpu_percent": round(server_cpu, 1),
            "client": _client(workers),
        }


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    idle, stream = doc.get("idle"), doc.get("stream")
    if idle is not None:
        p99 = idle["health_ms"]["p99"]
        per = idle["rss_per_stream_kb"]
        out += [
            {
                "name": f"{idle['streams']} idle streams held, /health p99 < 50 ms",
                "value": p99,
                "met": idle["held"] == idle["streams"] and p99 is not None and p99 < 50,
            },
            {
                "name": "RSS per idle stream <= 40 KB",
                "value": per,
                "met": per is not None and per <= RSS_PER_IDLE_TARGET_KB,
            },
        ]
    if stream is not None:
        out.append(
            {
                "name": f"{stream['streams']} streams at {stream['tokens_per_second']:g} tokens/s: "
                "delivery lag p99 < 250 ms from each word's due time, 0 errors",
                "value": stream["due_lag_ms"]["p99"],
                "met": lag_target_met(stream),
            }
        )
    return out


def lag_target_met(stream: dict[str, Any]) -> bool:
    """A streaming phase met issue 9's bar: every stream completed, no error,
    delivery lag p99 < 250 ms counted from each word's due time.

    From the due time, not from when the model produced the word: a loop too
    busy to run the model on schedule delivers late words promptly, and the
    rate falls below the one asked for; only the due time sees both.
    """
    p99 = stream["due_lag_ms"]["p99"]
    return (
        stream["errors"] == 0
        and stream["completed"] == stream["streams"]
        and p99 is not None
        and p99 < LAG_P99_TARGET_MS
    )


async def run_load(
    options: LoadOptions, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the phases ``options`` asks for (a count of 0 skips one); the JSON document."""
    needed = 2 * max(options.idle_streams, options.streams) + 1024
    fd_limit = raise_fd_limit(needed)
    if fd_limit < needed:
        log(f"warning: RLIMIT_NOFILE is {fd_limit}, below the {needed} this run may need")
    doc: dict[str, Any] = {
        "kind": "load",
        "schema": SCHEMA,
        "machine": machine_info(),
        "client": "worker processes on the server's machine (loopback), raw HTTP/1.1 sockets",
        "options": attrs.asdict(options),
        "started_at": time.time(),
        "load_average_start": list(os.getloadavg()),
        "rlimit_nofile": fd_limit,
    }
    doc["idle"] = await idle_phase(options, log) if options.idle_streams else None
    if doc["idle"] is not None:
        log("idle: " + json.dumps(doc["idle"]))  # kept even if the stream phase fails
    doc["stream"] = await stream_phase(options, log) if options.streams else None
    doc["capacity"] = []
    for n in options.capacity_streams:
        phase = await stream_phase(
            attrs.evolve(options, streams=n, duration=options.capacity_duration), log
        )
        phase["lag_target_met"] = lag_target_met(phase)
        doc["capacity"].append(phase)
    doc["load_average_end"] = list(os.getloadavg())
    doc["finished_at"] = time.time()
    doc["targets"] = targets(doc)
    return doc

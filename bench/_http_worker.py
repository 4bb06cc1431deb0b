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
import itertools
import json
import os
import random
import sys
import time
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import attrs
import cattrs
import trio
from cattrs.v import format_exception

from runtime._sandbox import is_dead, proc_info

from ._rawhttp import (
    Body,
    Connection,
    FrameSplitter,
    Head,
    Origin,
    ProtocolError,
    event_type,
    frame_data,
)
from ._samples import SCENARIOS, CancelAt, TurnSample, converter
from ._stats import percentile

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

#: The ``tool`` scenario's command: the shell (cwd = the workspace) writes
#: the pid file, then becomes ``sleep`` with a unique argument, by which this
#: worker finds the process in ``/proc`` (a pid the shell printed would be
#: one of its sandbox's PID namespace, not ours).
TOOL_COMMAND: Final = "echo started > bench.pid && exec sleep {seconds}"
PID_FILE: Final = "bench.pid"
_tool_calls: Final = itertools.count(1)
#: How often the pid file and the process group are polled, seconds.
PID_POLL: Final = 0.002
GROUP_POLL: Final = 0.0005
#: A control connection idle this long is replaced before the cancel (servers
#: close idle keep-alive connections; hypercorn after 5 s).
CONTROL_IDLE: Final = 2.0
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


# -- one turn ----------------------------------------------------------------------------


@attrs.define(eq=False)
class _Turn:
    """The state of one turn while it runs; :meth:`sample` freezes it."""

    worker: _Worker
    n: int
    #: Seconds after the first event to cancel (``cancel_at`` as a range).
    delay: float | None
    tag: str = ""
    #: The tool scenario's ``sleep`` argument, unique per call.
    tool_seconds: str = ""
    sid: str | None = None
    rid: str | None = None
    #: The connection for session requests and the cancel, and when it was last used.
    control: Connection | None = None
    control_used_at: float = 0.0
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
        finished = False
        try:
            try:
                with self.step("connect"):
                    self.control = await self.worker.origin.connect()
                    self.control_used_at = time.perf_counter()
                await self._run(self.control)
                finished = True
            except Exception as exc:  # never crash the worker: the sample says what failed
                self.error = _error_text(exc)
        finally:
            # Shielded: also when the worker is cancelled (Ctrl-C, a failed
            # sibling), no turn of ours may stay running on the server, where it
            # would complete and be billed.
            with trio.CancelScope(shield=True):
                if self.sid is not None:
                    # After a failure the control connection may hold half an answer.
                    await self._delete_session(self.control if finished else None)
                elif self.rid is not None and not finished:
                    await self._cancel_stateless()
                if self.control is not None:
                    await self.control.aclose()

    async def _cancel_stateless(self) -> None:
        """Cancel a stateless turn this worker gave up on (untimed; any answer is fine)."""
        with trio.move_on_after(self.worker.config.timeout), contextlib.suppress(Exception):
            conn = await self.worker.origin.connect()
            try:
                await conn.request("POST", f"/v1/responses/{self.rid}/cancel", b"")
            finally:
                await conn.aclose()

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
            # 60.PPPPPPPNNNNNN seconds: unique to this worker and call.
            self.tool_seconds = f"60.{os.getpid():07d}{next(_tool_calls):06d}"
            text = f"run: {TOOL_COMMAND.format(seconds=self.tool_seconds)}\n[bench {self.tag}]"
        if cfg.stateless:
            path = "/v1/responses"
            body = json.dumps({"input": text, "stream": True}).encode()
        else:
            with self.step("create session"):
                head, raw = await control.request("POST", "/v1/sessions", b"{}")
                _expect(head, raw, 201, 200)
                self.sid = json.loads(raw)["id"]
                self.control_used_at = time.perf_counter()
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
        if time.perf_counter() - self.control_used_at > CONTROL_IDLE:
            # The server may have closed an idle keep-alive connection (hypercorn:
            # after 5 s): reconnect now, before the cancel is timed.
            with self.step("reconnect"):
                fresh = await self.worker.origin.connect()
            if self.control is not None:
                await self.control.aclose()
            self.control = control = fresh
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
        """The tool's ``sleep``, found by its argument once the pid file is
        written; None if this machine cannot see that process (remote server)."""
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
        if not self.worker.origin.is_loopback:
            return None
        argv = f"sleep\0{self.tool_seconds}\0".encode()
        # The shell execs sleep right after writing the file.
        with trio.move_on_after(1):
            while True:
                pid = await trio.to_thread.run_sync(_find_process, argv)
                if pid is not None:
                    return pid
                await trio.sleep(PID_POLL)
        return None  # not ours to see

    async def _watch_group(self, pid: int, t_cancel: float) -> None:
        """Poll until the tool's process is gone (or a zombie); record when."""
        with self.step("process group gone"):
            while True:  # polling: a non-child's death sends us nothing
                if is_dead(proc_info(pid)):
                    break
                await trio.sleep(GROUP_POLL)
            self.group_gone_ms = (time.perf_counter() - t_cancel) * 1e3


def _find_process(argv: bytes) -> int | None:
    """The pid of a process whose command line is exactly ``argv``."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == argv:
                        return int(name)
            except OSError:
                continue
    return None


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
        loop_lag_p99_ms=percentile(lags, 99) * 1e3 if lags else 0.0,
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

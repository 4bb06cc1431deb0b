"""``bench cancel --embedded``: cancelled turns against the runtime in-process.

One :class:`~runtime.Runtime` per concurrency level, on a fresh temporary
data dir with the default store (SQLite, ``agent-runtime.db``: what a user of
``Runtime.open`` gets), removed afterwards. ``concurrency`` lanes (tasks) run
the level's turns, one turn at a time each, so that many are in flight at once.

Each turn has two tasks: the lane task, which starts the turn and then acts
as the canceller, and a reader task iterating ``turn.events()`` (the path an
SSE writer takes). The reader does as little as it can per event (a counter,
two comparisons) so that what is timed is the runtime, not the client. All
times are ``time.perf_counter()``:

* ``first_event_ms``: ``send``/``respond`` called -> the reader has the first event;
* ``ack_ms``: ``await turn.cancel()`` (``delete``: ``await rt.delete_session()``)
  called -> returned;
* ``stop_ms``: that same call -> the reader has the terminal event;
* ``group_gone_ms`` (``tool``): that call -> no process of the tool's group is
  running any more (see :func:`_wait_group_gone`);
* ``upstream_closed_ms`` / ``upstream_tokens_after_ack`` (``upstream``): from
  the fake upstream's records (:func:`bench._upstream.upstream_metrics`).

``billed`` is filled after the level from the store's usage records, so the
samples given to ``on_sample`` (as each turn ends, for progress) still have
``billed=None``; the returned :class:`LevelResult` has it.

``turn.events()`` is a plain async iterator (no async generator: there is
nothing to ``aclose``, and ``contextlib.aclosing`` does not apply). Before
each level the heap is collected (``gc.collect()``) so that the previous
level's garbage is not collected inside this one's timings.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import secrets
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Final

import attrs
import trio

from runtime import DEFAULT_ACCOUNT, CancelOutcome, DemoModel, Runtime
from runtime._sandbox import all_processes, is_dead, proc_info

from ._samples import SCENARIOS, LevelResult, TurnSample
from ._upstream import find_request, open_upstream_runtime, upstream_metrics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from runtime import Session, Turn

    from ._samples import CancelOptions
    from .fake_upstream import FakeUpstream

#: Every wait of a turn is bounded: this long, plus the time the cancel is
#: meant to take to come (``--cancel-at``).
TURN_TIMEOUT: Final = 30.0
#: How long cleaning up after a failed turn may take.
CLEANUP_TIMEOUT: Final = 10.0
#: Poll interval for the tool's process group where there are no pidfds
#: (trio sleeps at least ~1 ms: epoll's resolution).
GROUP_POLL: Final = 0.0005
#: How long a tool's shell may take to start its command before it is
#: cancelled anyway.
COMMAND_START_TIMEOUT: Final = 1.0
#: Above this CPU use of the benchmark process (runtime and client together)
#: latencies include waiting for the CPU.
CPU_WARNING_PERCENT: Final = 90.0

STREAM_PROMPT: Final = "Write a 100000-word essay on cancellation"
#: The demo model turns a line ``run: CMD`` into a ``run_shell`` call.
TOOL_PROMPT: Final = "run: sleep 60"
#: Event types that count as deltas for ``deltas_after_ack``.
DELTA_TYPES: Final = frozenset(
    {
        "text.delta",
        "thinking.delta",
        "tool_use.input_delta",
        "response.output_text.delta",
        "response.function_call_arguments.delta",
    }
)
SESSION_DELETED: Final = "session_deleted"


async def run_embedded_level(
    options: CancelOptions, concurrency: int, on_sample: Callable[[TurnSample], None]
) -> LevelResult:
    """Run ``options.turns`` cancelled turns, ``concurrency`` at a time, in-process.

    Scenarios (``options.scenario``):

    * ``stream``: a 100000-word demo essay (``options.stateless``:
      ``rt.respond`` instead of a session turn), cancelled per
      ``options.cancel_at``.
    * ``tool``: ``run: sleep 60`` (a ``run_shell`` call in its own process
      group), cancelled as soon as the shell has started its command (the
      runtime reports the shell's pid through ``rt._for_testing_on_process``;
      the shell then forks ``sleep``); ``options.cancel_at`` does not apply.
    * ``delete``: a session per turn, deleted (``rt.delete_session``) at
      ``options.cancel_at``; ``workspace_gone`` is checked as soon as the
      delete returns.
    * ``upstream``: like ``stream``, with an :class:`~runtime.OpenAIModel` on an
      in-process fake upstream streaming at ``options.tokens_per_second``.

    A failed turn (a timeout, an exception, an unexpected terminal) becomes a
    sample with ``error`` set; the level goes on. ``on_sample`` is called
    with each sample as its turn ends (``billed`` not yet known).

    Raises:
      ValueError: an unknown scenario, ``concurrency < 1``, or
        ``stateless`` with ``tool``/``delete`` (those need a session).
    """
    scenario = options.scenario
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency!r}")
    if options.stateless and scenario in ("tool", "delete"):
        raise ValueError(f"the {scenario} scenario needs session turns, not --stateless")
    tps = options.tokens_per_second or None
    data_dir = tempfile.mkdtemp(prefix="agent-runtime-bench-")
    try:
        async with _open_target(scenario, tps, data_dir) as (rt, up):
            level = _Level(rt=rt, up=up, options=options, concurrency=concurrency)
            level.on_sample = on_sample
            if scenario == "tool":
                # A test hook of the runtime, called with each tool's pid (the
                # group id) in the turn's task as the process starts.
                rt._for_testing_on_process = level.on_process
            # Each level starts from a clean heap: the previous level's
            # garbage is not collected inside this one's timings.
            gc.collect()
            cpu_before = time.process_time()
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for lane in range(min(concurrency, options.turns)):
                    nursery.start_soon(level.lane, lane)
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu_before
            await level.check_groups()
            samples = await _with_billing(rt, level.samples)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(partial(shutil.rmtree, data_dir, ignore_errors=True))
    cpu_percent = 100.0 * cpu / wall if wall > 0 else 0.0
    warnings: list[str] = []
    if cpu_percent >= CPU_WARNING_PERCENT:
        warnings.append(
            f"the benchmark process used {cpu_percent:.0f}% of a core (runtime and client "
            f"share it): latencies include waiting for the CPU"
        )
    return LevelResult(
        concurrency=concurrency,
        samples=tuple(samples),
        wall_seconds=wall,
        client_cpu_percent=(cpu_percent,),
        warnings=tuple(warnings),
    )


@asynccontextmanager
async def _open_target(
    scenario: str, tokens_per_second: float | None, data_dir: str
) -> AsyncIterator[tuple[Runtime, FakeUpstream | None]]:
    if scenario == "upstream":
        async with open_upstream_runtime(tokens_per_second, data_dir=data_dir) as (rt, up):
            yield rt, up
    else:
        model = DemoModel(tokens_per_second=tokens_per_second)
        async with Runtime.open(data_dir=data_dir, model=model) as rt:
            yield rt, None


async def _with_billing(rt: Runtime, samples: list[TurnSample | None]) -> list[TurnSample]:
    """The samples, with ``billed``: whether the store has a usage record for them."""
    done = [s for s in samples if s is not None]
    records = await rt.store.usage_records(DEFAULT_ACCOUNT, limit=len(samples) + 1000)
    billed = {record.response_id for record in records}
    return [
        attrs.evolve(s, billed=s.response_id in billed) if s.response_id is not None else s
        for s in done
    ]


@attrs.define(eq=False)
class _Probe:
    """What one turn's tasks observe (perf_counter times)."""

    tag: str
    #: What the turn is waiting for now (the message of a timeout).
    stage: str = "the turn to start"
    turn: Turn | None = None
    t_send: float | None = None
    t_first: float | None = None
    #: ``trio.current_time()`` at the first event (time-based cancels sleep from it).
    trio_first: float = 0.0
    t_cancel: float | None = None
    t_ack: float | None = None
    t_terminal: float | None = None
    t_gone: float | None = None
    acked: bool = False
    deltas_after_ack: int = 0
    terminal: str | None = None
    reason: str | None = None
    workspace_gone: bool | None = None
    pid: int | None = None
    error: str | None = None
    first: trio.Event = attrs.Factory(trio.Event)
    #: Set when it is time to cancel (event count reached; tool process started).
    trigger: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class _Lane:
    index: int
    rng: random.Random
    session: Session | None = None


@attrs.define(eq=False, kw_only=True)
class _Level:
    rt: Runtime
    up: FakeUpstream | None
    options: CancelOptions
    concurrency: int
    on_sample: Callable[[TurnSample], None] = attrs.field(default=lambda _: None)
    samples: list[TurnSample | None] = attrs.field(init=False)
    #: Next turn index to start.
    next: int = 0
    #: ``tool``: session id -> the turn waiting for its process.
    waiting: dict[str, _Probe] = attrs.field(factory=dict)
    #: ``tool``: turn index -> its process group.
    groups: dict[int, int] = attrs.field(factory=dict)
    nonce: str = attrs.field(factory=lambda: secrets.token_hex(3))
    timeout: float = attrs.field(init=False)
    #: Cancel after this many events (0: not by count).
    cancel_after: int = attrs.field(init=False)
    clock_offset: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.samples = [None] * self.options.turns
        at = self.options.cancel_at
        tps = self.options.tokens_per_second
        self.cancel_after = 0 if self.options.scenario == "tool" else (at.events or 0)
        wait = at.high if at.events is None else (at.events / tps if tps else 0.0)
        self.timeout = TURN_TIMEOUT + wait
        self.clock_offset = trio.current_time() - time.perf_counter()

    # -- lanes and turns ---------------------------------------------------

    async def lane(self, index: int) -> None:
        lane = _Lane(index, random.Random(self.options.seed + index))
        while self.next < self.options.turns:
            turn_index = self.next
            self.next += 1
            sample = await self.one_turn(turn_index, lane)
            self.samples[turn_index] = sample
            self.on_sample(sample)

    async def one_turn(self, index: int, lane: _Lane) -> TurnSample:
        probe = _Probe(tag=f"{self.nonce}-c{self.concurrency}-{index}")
        try:
            with trio.fail_after(self.timeout):
                await self.run_turn(probe, lane)
        except trio.TooSlowError:
            probe.error = f"timed out after {self.timeout:g} s waiting for {probe.stage}"
        except Exception as exc:
            probe.error = _describe(exc)
        finally:
            if lane.session is not None:
                self.waiting.pop(lane.session.id, None)
            if probe.pid is not None:
                self.groups[index] = probe.pid
        if probe.error is not None:
            await self.clean_up(probe, lane)
        elif self.options.scenario == "delete":
            lane.session = None  # deleted
        return self.sample(probe)

    async def run_turn(self, probe: _Probe, lane: _Lane) -> None:
        rt, scenario = self.rt, self.options.scenario
        if not self.options.stateless and lane.session is None:
            lane.session = await rt.create_session()
        prompt = TOOL_PROMPT + "\n" if scenario == "tool" else STREAM_PROMPT + " "
        text = f"{prompt}[bench {probe.tag}]"
        session = lane.session
        if scenario == "tool":
            assert session is not None
            self.waiting[session.id] = probe
        probe.t_send = time.perf_counter()
        turn = await rt.respond(text) if session is None else await session.send(text)
        probe.turn = turn
        probe.stage = "the first event"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.read, turn, probe, nursery.cancel_scope)
            await self.cancel(turn, probe, lane)
        if probe.t_cancel is None:
            probe.error = f"the turn ended ({probe.terminal}) before it was cancelled"
        elif scenario == "delete" and probe.error is None and probe.reason != SESSION_DELETED:
            probe.error = f"the turn ended {probe.terminal} ({probe.reason}), not {SESSION_DELETED}"
        if self.up is not None and probe.t_cancel is not None:
            probe.stage = "the upstream to see the connection close"
            request = find_request(self.up, probe.tag)
            if request is not None:
                await self.up.wait_disconnected(request)

    async def read(self, turn: Turn, probe: _Probe, scope: trio.CancelScope) -> None:
        """Read the turn's events to the end: as little work per event as we can."""
        clock = time.perf_counter
        cancel_after = self.cancel_after
        trigger = probe.trigger
        count = 0
        async for event in turn.events():
            count += 1
            if count == 1:
                probe.t_first = clock()
                probe.trio_first = trio.current_time()
                probe.first.set()
            if event.is_terminal:
                probe.t_terminal = clock()
                probe.terminal = event.type
                reason = getattr(event, "reason", None)
                probe.reason = reason if isinstance(reason, str) else None
                break
            if count == cancel_after:
                trigger.set()
            if probe.acked and event.type in DELTA_TYPES:
                probe.deltas_after_ack += 1
        if probe.t_cancel is None:
            scope.cancel()  # it ended on its own: nothing to cancel

    async def cancel(self, turn: Turn, probe: _Probe, lane: _Lane) -> None:
        """Wait for the moment, cancel (or delete), then wait for what that must do."""
        scenario = self.options.scenario
        at = self.options.cancel_at
        members: list[int] = []
        if scenario == "tool":
            probe.stage = "the tool's process to start"
            await probe.trigger.wait()
            assert probe.pid is not None
            # Let the shell start its command (fork ``sleep``), so the cancel
            # has a grandchild to kill; then note the group (not timed).
            with trio.move_on_after(COMMAND_START_TIMEOUT):
                # Polling: a fork in another process notifies us of nothing.
                while not _command_started(probe.pid):  # noqa: ASYNC110
                    await trio.sleep(GROUP_POLL)
            members = _group_members(probe.pid)
        elif at.events is not None:
            await probe.trigger.wait()
        else:
            await probe.first.wait()
            probe.stage = "the time to cancel"
            await trio.sleep_until(probe.trio_first + lane.rng.uniform(at.low, at.high))
        probe.stage = "the cancel to return"
        if scenario == "delete":
            assert lane.session is not None
            sid, root = lane.session.id, lane.session.workspace.root
            probe.t_cancel = time.perf_counter()
            await self.rt.delete_session(sid)
            probe.t_ack = time.perf_counter()
            probe.workspace_gone = not os.path.lexists(root)  # noqa: ASYNC240 (no thread hop)
        else:
            probe.t_cancel = time.perf_counter()
            outcome = await turn.cancel()
            probe.t_ack = time.perf_counter()
            if outcome is not CancelOutcome.CANCELLING:
                probe.error = f"the cancel came too late: {outcome.value}"
        probe.acked = True
        probe.stage = "the terminal event"
        if scenario == "tool":
            assert probe.pid is not None
            probe.stage = "the tool's process group to be gone"
            probe.t_gone = await _wait_group_gone(probe.pid, members)
            probe.stage = "the terminal event"

    async def check_groups(self) -> None:
        """``tool``: a process group with a running process at the end of the
        level outlived its cancel (a process that joined it late, or a leak):
        that turn's sample gets an error."""
        if not self.groups:
            return
        live = await trio.to_thread.run_sync(_live_groups, set(self.groups.values()))
        for index, pgid in self.groups.items():
            sample = self.samples[index]
            if pgid in live and sample is not None and sample.error is None:
                error = f"process group {pgid} was still running at the end of the level"
                self.samples[index] = attrs.evolve(sample, error=error, group_gone_ms=None)

    def on_process(self, pid: int) -> None:
        """``rt._for_testing_on_process``: find the turn by the process's cwd
        (its session's workspace) and let it cancel."""
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return
        probe = self.waiting.pop(os.path.basename(cwd), None)
        if probe is not None:
            probe.pid = pid
            probe.trigger.set()

    async def clean_up(self, probe: _Probe, lane: _Lane) -> None:
        """After a failed turn: stop it, and start the lane afresh with a new session."""
        # Best effort: what went wrong is in the sample already.
        with trio.move_on_after(CLEANUP_TIMEOUT), contextlib.suppress(Exception):
            if probe.turn is not None:
                await probe.turn.cancel()
                await probe.turn.wait_finished()
            if lane.session is not None:
                await self.rt.delete_session(lane.session.id)
        lane.session = None

    def sample(self, probe: _Probe) -> TurnSample:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else (end - start) * 1e3

        sample = TurnSample(
            scenario=self.options.scenario,
            concurrency=self.concurrency,
            response_id=probe.turn.id if probe.turn is not None else None,
            first_event_ms=ms(probe.t_send, probe.t_first),
            ack_ms=ms(probe.t_cancel, probe.t_ack),
            stop_ms=ms(probe.t_cancel, probe.t_terminal),
            group_gone_ms=ms(probe.t_cancel, probe.t_gone),
            deltas_after_ack=probe.deltas_after_ack,
            terminal=probe.terminal,
            workspace_gone=probe.workspace_gone,
            error=probe.error,
            tag=probe.tag,
            t_cancel=probe.t_cancel,
            t_ack=probe.t_ack,
        )
        if self.up is not None:
            [sample] = upstream_metrics(self.up, [sample], self.clock_offset)
        return sample


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


# -- the tool's process group -------------------------------------------------------


def _children(pid: int) -> list[int] | None:
    """The children of ``pid`` (None where the kernel has no
    ``/proc/PID/task/TID/children``, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return None


def _command_started(pgid: int) -> bool:
    """Whether the tool's shell has started its command: it has a child, or
    it is gone (it exec'd or exited). True where we cannot tell."""
    children = _children(pgid)
    return children is None or bool(children)


def _group_members(pgid: int) -> list[int]:
    """The leader of group ``pgid`` and its descendants still in it (a few
    small /proc reads; just the leader where the kernel cannot list children)."""
    members, todo = [], [pgid]
    while todo:
        pid = todo.pop()
        info = proc_info(pid)
        if info is None or info.pgid != pgid:
            continue
        members.append(pid)
        todo.extend(_children(pid) or ())
    return members


def _running(pid: int, pgid: int) -> bool:
    info = proc_info(pid)
    return info is not None and info.pgid == pgid and not is_dead(info)


def _live_groups(pgids: set[int]) -> set[int]:
    """Which of ``pgids`` still have a running (not zombie) process (scans /proc)."""
    live = set()
    for info in all_processes():
        if info.pgid in pgids and not is_dead(info):
            live.add(info.pgid)
    return live


async def _wait_group_gone(pgid: int, members: list[int]) -> float:
    """Wait until every process in ``members`` (group ``pgid``'s, taken just
    before the cancel) has exited; return when (``time.perf_counter()``)
    that was first seen.

    Exited includes zombies: a killed grandchild (``sh`` forks ``sleep``) is
    reparented to PID 1 and stays a zombie until PID 1 reaps it, which some
    inits (containers, VMs; this one) do only every second or two, so
    ``os.killpg(pgid, 0)`` can succeed that long after the group ran its last
    instruction.

    Event-driven where the kernel has pidfds (a pidfd becomes readable when
    its process exits): no polling. Else polling every :data:`GROUP_POLL`
    (at most 5% of the time waited so far, capped at 5 ms). A process that
    joined the group after ``members`` was taken is not waited for here;
    the level checks every group once at its end (:func:`_live_groups`).
    """
    if not hasattr(os, "pidfd_open"):
        return await _poll_group_gone(pgid, members)
    fds = []
    try:
        for pid in {pgid, *members}:
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
        for fd in fds:
            await trio.lowlevel.wait_readable(fd)
        return time.perf_counter()
    finally:
        for fd in fds:
            os.close(fd)


async def _poll_group_gone(pgid: int, members: list[int]) -> float:
    clock = time.perf_counter
    known = {pgid, *members}
    started = clock()
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return clock()
        except PermissionError:
            pass
        if not any(_running(pid, pgid) for pid in known):
            return clock()
        await trio.sleep(max(GROUP_POLL, min((clock() - started) / 20, 0.005)))

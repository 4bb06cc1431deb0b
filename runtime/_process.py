"""``run_shell``: a tool subprocess that cannot outlive its call.

Theory of operation
-------------------
The command runs as ``/bin/sh -c CMD`` under its :class:`~runtime._sandbox.Sandbox`
(bubblewrap, or a bare process group; see that module), in a new session and
process group, with resource limits, stdin from ``/dev/null`` and
stdout+stderr on one pipe. We keep the first ``output_bytes`` bytes; the read
that goes past them ends the call (the rest is never read).

Whatever ends the call (the shell exits, the wall-time limit, the output cap,
a cancel, an error), a shielded, bounded sweep SIGKILLs the whole group at
once (no SIGTERM grace: a cancel must stop work in milliseconds) and waits
until the kernel has finished every process of the call. In a bubblewrap
sandbox that is the namespace's init (the outer bwrap's child, in a session
of its own, found before the outer dies): the namespace dies with it, no scan
of the machine needed. Without one, one scan of ``/proc`` finds the group and
every process that carries the call's environment marker (that catches
``setsid`` escapees), and the sweep reaps those this process adopted as
subreaper. We do not use
``trio.run_process(deliver_cancel=...)``: trio stops its kill routine once the
group *leader* exits, which leaves grandchildren alive (STACK-NOTES 16).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ._sandbox import (
    MARKER,
    Sandbox,
    SandboxMode,
    ToolLimits,
    all_processes,
    is_dead,
    kill_all,
    marked_processes,
    proc_info,
    reap_orphans,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: After the shell exits, how long its output pipe may stay open (held by a
#: process that escaped an unsandboxed sweep) before we stop reading.
PIPE_GRACE: Final = 0.5
#: How long the sweep waits for SIGKILLed processes to die before giving up.
SWEEP_TIMEOUT: Final = 1.0
DEFAULT_TIMEOUT: Final = ToolLimits().wall_seconds
DEFAULT_MAX_OUTPUT: Final = ToolLimits().output_bytes
#: Unsandboxed, for direct calls of :func:`run_shell` without a runtime.
DIRECT: Final = Sandbox(mode=SandboxMode.NONE, token="direct")
_calls: Final = itertools.count(1)


@attrs.frozen
class ShellResult:
    """What a finished ``run_shell`` call produced."""

    pid: int
    returncode: int | None
    output: bytes
    truncated: bool
    timed_out: bool


@attrs.define(eq=False)
class _Child:
    """A process forked from the event loop's own thread, awaited with a pidfd.

    Not ``trio.lowlevel.open_process``: trio forks from a worker thread, and
    ``PR_SET_PDEATHSIG`` (bwrap's ``--die-with-parent``) fires when the
    *thread* that forked exits; trio's idle worker threads exit after 10 s,
    which SIGKILLed every sandbox ten seconds into its call (measured). The
    event loop's thread lives as long as the runtime. The fork blocks the loop
    for about a millisecond (``vfork``).
    """

    popen: subprocess.Popen[bytes]
    pidfd: int
    #: stdout and stderr, on one pipe.
    stdout: trio.lowlevel.FdStream
    #: Under bwrap: pidfds of the PID namespace's init (a session of its own).
    sandboxed: bool = False
    inits: dict[int, int] = attrs.field(factory=dict)

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        pass_fds: tuple[int, ...],
        sandboxed: bool,
    ) -> _Child:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            pidfd = os.pidfd_open(popen.pid)
        except BaseException:
            os.close(read_fd)
            popen.kill()
            popen.wait()
            raise
        return cls(popen, pidfd, trio.lowlevel.FdStream(read_fd), sandboxed)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL the call's group, and in a sandbox the namespace's init,
        found first (it is the outer bwrap's child: once the outer is dead it
        is re-parented and no longer found that way). The kernel then kills
        the rest of the namespace."""
        if self.sandboxed and self.popen.returncode is None:
            for child in _children(self.pid):
                # A pidfd, so that a later signal cannot reach a recycled pid.
                if child not in self.inits:
                    with contextlib.suppress(ProcessLookupError):
                        self.inits[child] = os.pidfd_open(child)
        _killpg(self.pid, signal.SIGKILL)
        for pidfd in self.inits.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    async def wait_inits(self) -> None:
        """Wait until the namespace's init has exited (a pidfd turns readable
        when its process exits, child of ours or not): then the kernel has
        already killed everything else in the namespace."""
        for pidfd in self.inits.values():
            await trio.lowlevel.wait_readable(pidfd)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait for the process to exit and reap it; its status."""
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self.pidfd)
            self.popen.wait()  # exited: reaps without blocking
        else:
            await trio.lowlevel.checkpoint()
        return self.popen.returncode

    def close(self) -> None:
        """Release the pidfds (once the process has been reaped)."""
        for pidfd in (self.pidfd, *self.inits.values()):
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        self.inits.clear()


def _children(pid: int) -> list[int]:
    """The child pids of ``pid`` (one small /proc read)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def live_group_members(pgid: int, among: Iterable[int] | None = None) -> list[int]:
    """Pids of the processes of group ``pgid`` that are not yet dead (zombies
    count as dead: they run nothing and only wait for their reaper).

    ``among``: look only at these pids (cheap: a few ``/proc/PID/stat``
    reads) rather than at every process of the machine.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    if among is None:
        infos = all_processes()
    else:
        infos = [info for pid in among if (info := proc_info(pid)) is not None]
    return [info.pid for info in infos if info.pgid == pgid and not is_dead(info)]


def _call_processes(pgid: int, marker: str) -> list[int]:
    """One scan, for an unsandboxed call: its processes, SIGKILLed on the way.

    Its group, and whatever carries its marker (that catches ``setsid``
    escapees). The group's zombies that are our adopted children are
    included, to be reaped.
    """
    infos = all_processes()
    me = os.getpid()
    found = {info.pid for info in infos if info.pgid == pgid and not is_dead(info)}
    found.update(info.pid for info in marked_processes(marker, infos, exact=True))
    found.update(
        info.pid
        for info in infos
        if info.pgid == pgid and info.ppid == me and info.pid != pgid and is_dead(info)
    )
    kill_all(found)
    return sorted(found)


async def _sweep(proc: _Child, marker: str) -> None:
    """Kill everything of the call, reap the leader, and wait until every
    process of it is dead (shield this)."""
    # Unconditionally: the leader may be gone while its children live on.
    proc.kill()
    await proc.wait()
    # SIGKILL is delivered asynchronously: a process on another CPU may still
    # be running for a moment. Wait until the kernel has finished them, so
    # "the call ended" implies "its processes are gone".
    with trio.move_on_after(SWEEP_TIMEOUT):
        if proc.sandboxed:
            # The namespace dies with its init: no scan of the machine needed.
            await proc.wait_inits()
            reap_orphans(list(proc.inits))  # ours when we are a subreaper
            return
        # Unsandboxed, polling is the only way: a non-child's death sends us
        # nothing. One scan of /proc finds them (none can be added: the group
        # has SIGKILL pending, forks in flight included, and escapees with
        # the marker are killed by the scan); then only they are watched, at
        # 1 ms doubling to 16 ms, so a hundred sweeps at once do not rescan
        # the machine a thousand times a second.
        found = await trio.to_thread.run_sync(_call_processes, proc.pid, marker)
        members = found
        delay = 0.001
        while members:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.016)
            members = [pid for pid in members if not is_dead(proc_info(pid))]
        # Orphans re-parented to us (we are their subreaper) are ours to reap.
        reap_orphans([pid for pid in found if pid != proc.pid])


async def run_shell(
    command: str,
    *,
    cwd: str,
    env: dict[str, str] | None = None,
    limits: ToolLimits | None = None,
    sandbox: Sandbox = DIRECT,
    on_start: Callable[[int], object] | None = None,
) -> ShellResult:
    """Run ``command`` with ``/bin/sh -c`` under ``sandbox``, in its own
    process group, within ``limits``.

    Args:
      command: the shell command line.
      cwd: the workspace: the shell's working directory (in a sandbox, it is
        mounted at ``/opt/sandbox/workspace``, which is the shell's cwd).
      env: the environment; ``None`` inherits ours. The call's marker
        (:data:`~runtime._sandbox.MARKER`) is added to it.
      limits: CPU, memory, file size, open files, wall time and output; on
        wall-time expiry ``timed_out`` is set, past the output cap
        ``truncated``, and the call is killed either way.
      sandbox: how the call is confined; default unsandboxed.
      on_start: called with the pid of the process started (the group
        leader: the shell, or the outer ``bwrap``).

    Cancellation: every process of the call is SIGKILLed, and gone, before
    ``trio.Cancelled`` propagates.
    """
    if limits is None:
        limits = ToolLimits()
    marker = sandbox.marker(next(_calls))
    env = dict(os.environ if env is None else env)
    env[MARKER] = marker
    with sandbox.spawn_args(command, workspace=cwd, limits=limits) as (argv, fds):
        proc = _Child.spawn(
            argv,
            cwd=cwd,
            env=env,
            pass_fds=fds,
            sandboxed=sandbox.mode is SandboxMode.BWRAP,
        )
    await trio.lowlevel.checkpoint()
    stdout = proc.stdout
    cap = limits.output_bytes
    kept = bytearray()
    truncated = False

    drained = trio.Event()

    async def drain() -> None:
        nonlocal truncated
        async for chunk in stdout:
            room = cap - len(kept)
            kept.extend(chunk[:room])
            if len(chunk) > room:
                # Past the cap: stop reading and stop the call.
                truncated = True
                proc.kill()
                break
        drained.set()

    try:
        if on_start is not None:
            on_start(proc.pid)
        with trio.move_on_after(limits.wall_seconds) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await proc.wait()
                # The shell is done; whatever it left in the background must
                # not outlive the call (it would also hold the pipe open). In
                # a sandbox the namespace is already gone with its init.
                proc.kill()
                # Unsandboxed, a process that escaped the group (setsid) may
                # still hold the pipe: read what is in flight, then stop
                # waiting for EOF (the sweep kills it by its marker).
                with trio.move_on_after(PIPE_GRACE):
                    await drained.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await _sweep(proc, marker)
        with trio.CancelScope(shield=True):
            await stdout.aclose()
        proc.close()
    return ShellResult(
        pid=proc.pid,
        returncode=proc.returncode,
        output=bytes(kept),
        truncated=truncated,
        timed_out=deadline.cancelled_caught,
    )

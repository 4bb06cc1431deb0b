"""``run_shell``: a tool subprocess whose whole process group dies with it.

Theory of operation
-------------------
The command runs as ``/bin/sh -c CMD`` in a new session (so a new process
group whose id is the shell's pid), with the workspace as cwd, stdin from
``/dev/null`` and stdout+stderr on one pipe. We keep the first
``max_output`` bytes and keep draining the rest so the child never blocks on a
full pipe.

The group is swept in a ``finally`` that is shielded and bounded, whatever
ended the call (normal exit, wall-time limit, cancel, an error): SIGTERM to the
group, wait up to :data:`KILL_GRACE` for the shell, then SIGKILL to the group
unconditionally, which also takes the shell's background children. We do not
use ``trio.run_process(deliver_cancel=...)`` for this: trio cancels its kill
routine as soon as the group *leader* exits, which leaves grandchildren alive
(measured, STACK-NOTES 16).

A process that left the group with ``setsid`` escapes this sweep (and could
hold the output pipe open: we stop reading :data:`PIPE_GRACE` after the shell
exits); the sandbox (a bubblewrap PID namespace) that closes that gap is a
later piece of work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: How long the shell gets to exit on SIGTERM before the group is SIGKILLed.
KILL_GRACE: Final = 0.05
#: After the shell exits, how long its output pipe may stay open (held by a
#: process that left the group) before we stop reading.
PIPE_GRACE: Final = 0.5
#: How long the sweep waits for SIGKILLed members to die before giving up.
SWEEP_TIMEOUT: Final = 1.0
DEFAULT_TIMEOUT: Final = 120.0
DEFAULT_MAX_OUTPUT: Final = 64 * 1024


@attrs.frozen
class ShellResult:
    """What a finished ``run_shell`` call produced."""

    pid: int
    returncode: int | None
    output: bytes
    truncated: bool
    timed_out: bool


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
    members = []
    names = os.listdir("/proc") if among is None else [str(pid) for pid in among]
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parens.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


async def _sweep(proc: trio.Process) -> None:
    """Kill ``proc``'s whole group, reap the leader, and wait until every
    member is dead (shield this)."""
    if proc.returncode is None:
        _killpg(proc.pid, signal.SIGTERM)
        with trio.move_on_after(KILL_GRACE):
            await proc.wait()
    # Unconditionally: the leader may be gone while its children live on.
    _killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
    # SIGKILL is delivered asynchronously: a member on another CPU may still
    # be running for a moment. Wait until the kernel has finished them, so
    # "the turn ended" implies "its processes are gone".
    with trio.move_on_after(SWEEP_TIMEOUT):
        # Polling is the only way: a non-child's death sends us nothing. One
        # scan of /proc finds the members (none can join: the whole group has
        # SIGKILL pending, forks in flight included); then only they are
        # watched, at 1 ms doubling to 16 ms, so a hundred sweeps at once do
        # not rescan the machine a thousand times a second.
        members = await trio.to_thread.run_sync(live_group_members, proc.pid)
        delay = 0.001
        while members:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.016)
            members = live_group_members(proc.pid, among=members)


async def run_shell(
    command: str,
    *,
    cwd: str,
    env: dict[str, str] | None = None,
    time_limit: float = DEFAULT_TIMEOUT,
    max_output: int = DEFAULT_MAX_OUTPUT,
    on_start: Callable[[int], object] | None = None,
) -> ShellResult:
    """Run ``command`` with ``/bin/sh -c`` in its own process group.

    Args:
      command: the shell command line.
      cwd: the working directory (the session's workspace).
      env: the environment; ``None`` inherits ours.
      time_limit: wall-time limit in seconds; on expiry the group is killed and
        ``timed_out`` is set.
      max_output: bytes of combined stdout/stderr kept; the rest is drained
        and dropped, and ``truncated`` is set.
      on_start: called with the shell's pid (which is also its group id).

    Cancellation: the whole process group is killed (SIGTERM, then SIGKILL
    after at most :data:`KILL_GRACE`) and the shell reaped before
    ``trio.Cancelled`` propagates.
    """
    proc = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    kept = bytearray()
    truncated = False

    drained = trio.Event()

    async def drain() -> None:
        nonlocal truncated
        async for chunk in stdout:
            room = max_output - len(kept)
            if len(chunk) > room:
                truncated = True
            kept.extend(chunk[:room])
        drained.set()

    try:
        if on_start is not None:
            on_start(proc.pid)
        with trio.move_on_after(time_limit) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await proc.wait()
                # The shell is done; whatever it left in the background must
                # not outlive the call (it would also hold the pipe open).
                _killpg(proc.pid, signal.SIGKILL)
                # A process that escaped the group (setsid) may still hold the
                # pipe: read what is in flight, then stop waiting for EOF.
                with trio.move_on_after(PIPE_GRACE):
                    await drained.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await _sweep(proc)
        with trio.CancelScope(shield=True):
            await stdout.aclose()
    return ShellResult(
        pid=proc.pid,
        returncode=proc.returncode,
        output=bytes(kept),
        truncated=truncated,
        timed_out=deadline.cancelled_caught,
    )

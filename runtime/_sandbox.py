"""Where ``run_shell`` runs: a bubblewrap sandbox, or a bare process group.

Theory of operation
-------------------
With :data:`SandboxMode.BWRAP` (the default whenever ``bwrap`` works here),
each call runs as::

    bwrap --die-with-parent --unshare-pid --unshare-net --unshare-ipc
          --unshare-uts --new-session --cap-drop ALL
          --ro-bind / /  --tmpfs DATA_DIR  --tmpfs /tmp  --dev /dev --proc /proc
          --bind WORKSPACE /opt/sandbox/workspace --chdir /opt/sandbox/workspace
          -- prlimit --cpu=… --as=… --fsize=… --nofile=… -- /bin/sh -c CMD

The system is visible read-only, the runtime's data directory (every other
session's workspace, the database) is hidden under an empty tmpfs, there is
no network but loopback of its own, and no capabilities. The first ``bwrap``
process stays outside the namespaces and is the group leader we start; its
child is the PID namespace's init, in a session of its own. Both carry
``PR_SET_PDEATHSIG`` (``--die-with-parent``): killing the outer ``bwrap``
kills the init, and the kernel then kills every process of the namespace
(``setsid``, ``nohup`` and double forks included) before the init itself can
be reaped: "the init is dead" means "the sandbox is empty". A server that
dies, even by SIGKILL, takes its sandboxes with it. The sweep reads the
init's pid from the outer's children before killing, kills both, and waits
for the init to be dead. ``PR_SET_PDEATHSIG`` follows the *thread* that
forked, so the fork happens on the event loop's thread (see
:class:`runtime._process._Child`).

With :data:`SandboxMode.NONE` (no ``bwrap``, or asked for), the shell runs in
a new session and process group with the host's view of the file system. The
runtime process becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``), so
orphans of a tool are re-parented to it instead of to the host's init, and
the sweep also kills every process that carries the call's marker in its
environment (:data:`MARKER`). A process that both leaves the group and clears
its environment escapes: only the sandbox is a guarantee. Nothing kills these
tools when the server dies, so the next start-up sweeps them
(:func:`sweep_orphans`): every process whose marker names this data
directory.

Resource limits (:class:`ToolLimits`) are applied by util-linux ``prlimit``
between the sandbox and the shell, so they bind the shell and everything it
starts from its first instruction on.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import hashlib
import logging
import os
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING, Final

import attrs

from ._workspace import SANDBOX_ROOT

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

logger: Final = logging.getLogger("runtime")

#: Environment variable that marks every tool process: ``TOKEN.CALL``, where
#: TOKEN names the data directory (not its path) and CALL the call.
MARKER: Final = "AGENT_RUNTIME_TOOL"
_PR_SET_CHILD_SUBREAPER: Final = 36

GiB: Final = 1 << 30


class SandboxMode(enum.Enum):
    """How ``run_shell`` is confined."""

    #: bubblewrap: own PID, network, IPC, UTS and mount namespaces.
    BWRAP = "bwrap"
    #: A process group and a subreaper sweep, on the host's file system.
    NONE = "none"


@attrs.frozen(kw_only=True)
class ToolLimits:
    """Resource limits of one ``run_shell`` call (the shell and its children).

    Attributes:
      cpu_seconds: CPU time (``RLIMIT_CPU``): SIGXCPU at this many seconds,
        SIGKILL one second later.
      memory_bytes: address space (``RLIMIT_AS``); allocations fail beyond.
      file_size_bytes: largest file written (``RLIMIT_FSIZE``); a shell child
        dies of SIGXFSZ, a program that handles it gets ``EFBIG``.
      open_files: descriptors per process (``RLIMIT_NOFILE``).
      wall_seconds: wall time of the call; then everything is killed.
      output_bytes: combined stdout/stderr kept; once it is reached the call
        is killed (``truncated``), nothing more is read.
    """

    cpu_seconds: int = 60
    memory_bytes: int = 4 * GiB
    file_size_bytes: int = 1 * GiB
    open_files: int = 1024
    wall_seconds: float = 120.0
    output_bytes: int = 64 * 1024

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(ToolLimits):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"ToolLimits.{field.name} must be > 0, not {value!r}")

    def prlimit_args(self) -> list[str]:
        """``prlimit`` options setting these limits (soft and hard)."""
        return [
            f"--cpu={self.cpu_seconds}:{self.cpu_seconds + 1}",
            f"--as={self.memory_bytes}",
            f"--fsize={self.file_size_bytes}",
            f"--nofile={self.open_files}",
        ]


@attrs.frozen(kw_only=True)
class Sandbox:
    """The confinement of a runtime's tools; see :func:`choose_sandbox`."""

    mode: SandboxMode
    #: Names this data directory in :data:`MARKER` (a hash, never the path).
    token: str
    #: Host directories hidden from a sandboxed tool (the data directory).
    hidden: tuple[str, ...] = ()
    #: Why this mode was chosen, for the start-up message.
    reason: str = ""
    prlimit: str = "prlimit"

    @property
    def workspace_path(self) -> str | None:
        """The workspace as the tool sees it, if not its host path."""
        return SANDBOX_ROOT if self.mode is SandboxMode.BWRAP else None

    def argv(self, command: str, *, workspace: str, limits: ToolLimits) -> list[str]:
        """The command line that runs ``/bin/sh -c command`` confined."""
        shell = [self.prlimit, *limits.prlimit_args(), "--", "/bin/sh", "-c", command]
        if self.mode is SandboxMode.NONE:
            return shell
        opt = [arg for entry in _opt_entries() for arg in ("--ro-bind", entry, entry)]
        return [
            "bwrap",
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "sandbox",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/",
            "/",
            *(arg for path in self.hidden for arg in ("--tmpfs", path)),
            "--tmpfs",
            "/tmp",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            # /opt is a tmpfs so that /opt/sandbox can be made in it; its
            # entries come back read-only.
            "--tmpfs",
            "/opt",
            *opt,
            "--bind",
            workspace,
            SANDBOX_ROOT,
            "--chdir",
            SANDBOX_ROOT,
            "--",
            *shell,
        ]

    @contextlib.contextmanager
    def spawn_args(
        self, command: str, *, workspace: str, limits: ToolLimits
    ) -> Iterator[tuple[list[str], tuple[int, ...]]]:
        """(argv, fds to pass) that run :meth:`argv`, valid inside the block.

        bwrap reads its arguments from a memfd (``--args FD``): on its command
        line they would show every host path to the tool in
        ``/proc/1/cmdline``.
        """
        argv = self.argv(command, workspace=workspace, limits=limits)
        if self.mode is SandboxMode.NONE:
            yield argv, ()
            return
        # bwrap takes options from the fd; the command stays on the command line.
        end = argv.index("--")
        fd = os.memfd_create("bwrap-args", os.MFD_CLOEXEC)
        try:
            os.write(fd, b"".join(os.fsencode(arg) + b"\0" for arg in argv[1:end]))
            os.lseek(fd, 0, os.SEEK_SET)
            yield [argv[0], "--args", str(fd), *argv[end:]], (fd,)
        finally:
            os.close(fd)

    def marker(self, call: int) -> str:
        return f"{self.token}.{call}"


def _opt_entries() -> list[str]:
    try:
        names = sorted(os.listdir("/opt"))
    except OSError:
        return []
    return [f"/opt/{name}" for name in names if name != "sandbox"]


def data_dir_token(data_dir: str | os.PathLike[str]) -> str:
    """The marker token of ``data_dir``: stable across restarts, no path in it."""
    real = os.path.realpath(data_dir)
    return hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def choose_sandbox(requested: str, data_dir: str | os.PathLike[str]) -> Sandbox:
    """Pick the sandbox for a runtime on ``data_dir`` (blocking, once per
    process: the bubblewrap probe).

    Args:
      requested: ``"auto"`` (bubblewrap if it works here, else none, loudly),
        ``"bwrap"`` (bubblewrap or an error) or ``"none"``.

    Raises:
      ValueError: an unknown mode, or ``"bwrap"`` when it cannot run here.

    With mode NONE this process becomes a child subreaper (see the module's
    docstring). Whether bubblewrap works is probed once per process (a few
    milliseconds).
    """
    if requested not in ("auto", "bwrap", "none"):
        raise ValueError(f"sandbox must be 'auto', 'bwrap' or 'none', not {requested!r}")
    token = data_dir_token(data_dir)
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise ValueError("util-linux 'prlimit' is not installed; tool limits need it")
    if requested != "none":
        problem = _bwrap_problem()
        if problem is None:
            hidden = (os.path.realpath(data_dir),)
            return Sandbox(
                mode=SandboxMode.BWRAP, token=token, hidden=hidden, reason="bwrap", prlimit=prlimit
            )
        if requested == "bwrap":
            raise ValueError(f"sandbox 'bwrap' asked for, but {problem}")
        reason = f"{problem}: run_shell runs WITHOUT a sandbox"
    else:
        reason = "sandbox 'none' asked for: run_shell runs WITHOUT a sandbox"
    become_subreaper()
    return Sandbox(mode=SandboxMode.NONE, token=token, reason=reason, prlimit=prlimit)


@functools.cache
def _bwrap_problem() -> str | None:
    """None if bubblewrap can make our sandbox here, else what is wrong."""
    if shutil.which("bwrap") is None:
        return "bubblewrap ('bwrap') is not installed (Debian package 'bubblewrap')"
    probe = Sandbox(mode=SandboxMode.BWRAP, token="probe", prlimit="prlimit")
    argv = probe.argv("exit 0", workspace="/", limits=ToolLimits())
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap does not run here ({exc})"
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        return f"bubblewrap does not run here ({why[-1] if why else done.returncode})"
    return None


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("PR_SET_CHILD_SUBREAPER failed: errno %d", ctypes.get_errno())


# -- finding tool processes -------------------------------------------------


@attrs.frozen
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: bytes


def proc_info(pid: int | str) -> ProcInfo | None:
    """``/proc/PID/stat`` of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...; comm may contain spaces and parens.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return ProcInfo(int(pid), int(fields[1]), int(fields[2]), fields[0])


def is_dead(info: ProcInfo | None) -> bool:
    """Gone, or a zombie: it runs nothing and only waits for its reaper."""
    return info is None or info.state in (b"Z", b"X")


def all_processes() -> list[ProcInfo]:
    infos = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := proc_info(name)) is not None:
            infos.append(info)
    return infos


def has_marker(pid: int, value: bytes, *, exact: bool) -> bool:
    """Whether ``pid``'s environment holds ``MARKER=value`` (or, not
    ``exact``, a marker that starts with ``value``)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return False
    needle = MARKER.encode() + b"=" + value
    if exact:
        return needle in environ.split(b"\0")
    return any(entry.startswith(needle) for entry in environ.split(b"\0"))


def marked_processes(
    value: str, infos: Iterable[ProcInfo] | None = None, *, exact: bool = False
) -> list[ProcInfo]:
    """The live processes (not us) whose marker is ``value`` (or starts with it)."""
    me = os.getpid()
    wanted = value.encode()
    return [
        info
        for info in (all_processes() if infos is None else infos)
        if info.pid != me and not is_dead(info) and has_marker(info.pid, wanted, exact=exact)
    ]


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def reap_orphans(pids: Sequence[int]) -> None:
    """Reap those of ``pids`` that are our (adopted) children and have died."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def sweep_orphans(token: str) -> int:
    """Kill every tool process left by an earlier runtime on this data dir.

    Called at start-up, when this runtime holds the data directory's lock, so
    every process marked with ``token`` belongs to a runtime that is gone.
    Returns how many were killed. Blocking (one scan of ``/proc``, a few
    milliseconds): ``Runtime.open`` calls it once, on the event loop, before
    anything else runs (a thread would let an autojump clock skip ahead).
    """
    found = marked_processes(token + ".")
    # Whole groups: in a bwrap sandbox, killing the outer bwrap's group kills
    # the namespace's init and with it the namespace.
    for pgid in {info.pgid for info in found}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    kill_all(info.pid for info in found)
    if found:
        logger.warning(
            "killed %d tool process(es) left running by an earlier server on this data dir",
            len(found),
        )
    return len(found)

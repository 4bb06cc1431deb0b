"""run_shell's sandbox and limits: bubblewrap namespaces, the fallback sweep,
resource limits per call, and the start-up sweep of orphaned tools.

Real processes, real clock, under ``fail_after`` guards. Tool processes are
found in ``/proc`` by a unique ``sleep`` argument (a pid printed inside the
sandbox would be one of its own PID namespace).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest
import trio

from runtime import (
    MemoryStore,
    MessageCancelled,
    Runtime,
    SandboxMode,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    ToolLimits,
    TurnState,
    UsageChunk,
)
from runtime._process import DIRECT, run_shell
from runtime._sandbox import (
    MARKER,
    Sandbox,
    _bwrap_problem,
    all_processes,
    become_subreaper,
    choose_sandbox,
    data_dir_token,
)

from ..fakes import FakeModel
from ..helpers import collect, process_gone

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

GUARD = 20
HAVE_BWRAP = _bwrap_problem() is None
MODES = [
    pytest.param(
        "bwrap",
        marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap cannot run here"),
    ),
    "none",
]
_unique = itertools.count(1)


def unique_seconds() -> str:
    """A ``sleep`` argument no other process on the machine has."""
    return f"300.{os.getpid():07d}{next(_unique):05d}"


def find_sleeps(*seconds: str) -> dict[str, int]:
    """Live ``sleep SECONDS`` processes by argument (zombies excluded)."""
    wanted = {f"sleep\0{s}\0".encode(): s for s in seconds}
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline in wanted and not process_gone(int(name)):
            found[wanted[cmdline]] = int(name)
    return found


async def wait_for_sleeps(*seconds: str) -> dict[str, int]:
    while True:  # polling: processes send no event
        if len(found := find_sleeps(*seconds)) == len(seconds):
            return found
        await trio.sleep(0.01)


@pytest.fixture
def stray_sleeps() -> Iterator[list[int]]:
    """Pids to SIGKILL at teardown if a failing test left them running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def shell_model(command: str) -> FakeModel:
    args = json.dumps({"command": command})
    return FakeModel(
        steps=[
            [ToolCallStart("c", "run_shell"), ToolCallDelta("c", args), UsageChunk(1, 1)],
            [TextChunk("done"), UsageChunk(1, 1)],
        ]
    )


def escaping_command(s: list[str]) -> str:
    """Processes that leave the shell's process group every way a shell can."""
    return (
        f"setsid sleep {s[0]} & "
        f"nohup sleep {s[1]} >/dev/null 2>&1 & "
        f"(sleep {s[2]} &) ; "  # double fork: orphaned at once
        f"sh -c 'setsid sh -c \"sleep {s[3]} & exec sleep {s[4]}\" &' ; "
        f"exec sleep {s[5]}"
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["cancel", "delete"])
async def test_sandbox_turn_end_kills_every_process(
    tmp_path: Path, mode: str, how: str, stray_sleeps: list[int]
) -> None:
    """Cancel or DELETE during run_shell: every process of the call is gone when
    it returns (setsid, nohup, double fork included), message.cancelled, no
    usage row, the workspace kept (cancel) or gone (DELETE)."""
    seconds = [unique_seconds() for _ in range(6)]
    store = MemoryStore()
    with trio.fail_after(GUARD):
        async with Runtime.open(
            data_dir=tmp_path, model=shell_model(escaping_command(seconds)), store=store,
            sandbox=mode,
        ) as rt:  # fmt: skip
            assert rt.sandbox.mode is SandboxMode(mode)
            session = await rt.create_session()
            turn = await session.send("escape")
            pids = await wait_for_sleeps(*seconds)
            stray_sleeps.extend(pids.values())
            if how == "cancel":
                await turn.cancel()
            else:
                await rt.delete_session(session.id, account_id=session.account_id)
            events = await collect(turn)
            alive = find_sleeps(*seconds)
            assert alive == {}, f"survived the {how}: {alive}"
            assert isinstance(events[-1], MessageCancelled)
            assert turn.state is TurnState.CANCELLED
            assert await store.usage_records(session.account_id) == []
            workspace_kept = (tmp_path / "workspaces" / session.id).exists()
    assert workspace_kept is (how == "cancel")


@pytest.mark.parametrize("mode", MODES)
async def test_sandbox_shell_exit_kills_background(
    tmp_path: Path, mode: str, stray_sleeps: list[int]
) -> None:
    """When the shell exits, what it left running in the background is killed
    before the tool result is returned."""
    seconds = [unique_seconds() for _ in range(6)]
    command = escaping_command(seconds).replace(f"exec sleep {seconds[5]}", "echo bye")
    with trio.fail_after(GUARD):
        async with Runtime.open(
            data_dir=tmp_path, model=shell_model(command), store=MemoryStore(), sandbox=mode
        ) as rt:
            session = await rt.create_session()
            turn = await session.send("escape and exit")
            await turn.wait_finished()
    [call] = turn.tool_calls
    assert "bye" in call.output
    assert find_sleeps(*seconds) == {}


@pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap cannot run here")
async def test_sandbox_sees_only_its_workspace(tmp_path: Path) -> None:
    """In the sandbox: the workspace at /opt/sandbox/workspace (read-write, the
    host's directory), the system read-only, the data dir (other sessions, the
    database) hidden, no network (not even the host's loopback), no host path."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    data_dir = tmp_path / "data"
    probe = (
        'echo "pwd=$(pwd) ws=$WORKSPACE home=$HOME"; '
        "echo made > made.txt; "
        "touch /usr/sandbox-was-here 2>/dev/null && echo SYSTEM-WRITABLE; "
        f"ls {data_dir} {data_dir}/workspaces 2>&1 | grep -c other-secret; "
        f"{sys.executable} -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2)'"
        " 2>&1 | tail -1; "
        "hostname"
    )
    with listener, trio.fail_after(GUARD):
        async with Runtime.open(
            data_dir=data_dir, model=shell_model(probe), store=MemoryStore(), sandbox="bwrap"
        ) as rt:
            other = await rt.create_session()
            (tmp_path / "data" / "workspaces" / other.id / "other-secret").write_text("x")
            session = await rt.create_session()
            turn = await session.send("probe")
            await turn.wait_finished()
            assert (tmp_path / "data" / "workspaces" / session.id / "made.txt").read_text() == (
                "made\n"
            )
    [call] = turn.tool_calls
    lines = call.output.splitlines()
    ws = "/opt/sandbox/workspace"
    assert lines[0] == f"pwd={ws} ws={ws} home={ws}"
    assert "SYSTEM-WRITABLE" not in call.output
    assert lines[1] == "0"  # the other session's file is not visible
    assert "ConnectionRefusedError" in lines[2]  # its own empty loopback
    assert lines[3] == "sandbox"
    assert str(tmp_path) not in call.output
    assert not os.path.exists("/usr/sandbox-was-here")


def sandboxes() -> list[object]:
    params: list[object] = [pytest.param(DIRECT, id="none")]
    if HAVE_BWRAP:
        params.insert(0, pytest.param(Sandbox(mode=SandboxMode.BWRAP, token="t"), id="bwrap"))
    return params


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_limit_file_size(tmp_path: Path, sandbox: Sandbox) -> None:
    """RLIMIT_FSIZE: the writer dies of SIGXFSZ, the file stops at the limit."""
    limits = ToolLimits(file_size_bytes=1 << 20)
    with trio.fail_after(GUARD):
        result = await run_shell(
            "head -c 3000000 /dev/zero > big; echo status=$?",
            cwd=str(tmp_path),
            limits=limits,
            sandbox=sandbox,
        )
    assert (tmp_path / "big").stat().st_size == 1 << 20
    assert b"File size limit exceeded" in result.output
    assert b"status=153" in result.output  # 128 + SIGXFSZ


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_limit_cpu(tmp_path: Path, sandbox: Sandbox) -> None:
    """RLIMIT_CPU: a busy loop is killed by SIGXCPU after its CPU seconds."""
    with trio.fail_after(GUARD):
        result = await run_shell(
            f"{sys.executable} -c 'while True: pass'; echo status=$?",
            cwd=str(tmp_path),
            limits=ToolLimits(cpu_seconds=1),
            sandbox=sandbox,
        )
    assert not result.timed_out
    assert b"status=152" in result.output  # 128 + SIGXCPU


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_limit_memory_and_open_files(tmp_path: Path, sandbox: Sandbox) -> None:
    """RLIMIT_AS: a large allocation fails; RLIMIT_NOFILE: the shell sees it."""
    limits = ToolLimits(memory_bytes=512 << 20, open_files=64)
    with trio.fail_after(GUARD):
        result = await run_shell(
            f"{sys.executable} -c 'bytearray(1 << 30)' 2>&1 | tail -1; ulimit -n",
            cwd=str(tmp_path),
            limits=limits,
            sandbox=sandbox,
        )
    assert result.output.splitlines() == [b"MemoryError", b"64"]


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_limit_output_stops_the_command(tmp_path: Path, sandbox: Sandbox) -> None:
    """Past the output cap nothing more is read and the command is killed: an
    endless writer returns at once, with exactly the cap kept."""
    with trio.fail_after(GUARD):
        result = await run_shell(
            "yes", cwd=str(tmp_path), limits=ToolLimits(output_bytes=1000), sandbox=sandbox
        )
    assert result.truncated
    assert result.output == b"y\n" * 500
    assert not result.timed_out


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_limit_wall_time(tmp_path: Path, sandbox: Sandbox, stray_sleeps: list[int]) -> None:
    """The wall-time limit kills the call, background processes included."""
    seconds = unique_seconds()
    with trio.fail_after(GUARD):
        result = await run_shell(
            f"setsid sleep {seconds} & echo partial; exec sleep {unique_seconds()}",
            cwd=str(tmp_path),
            limits=ToolLimits(wall_seconds=0.5),
            sandbox=sandbox,
        )
    assert result.timed_out
    assert result.output == b"partial\n"
    assert find_sleeps(seconds) == {}


def test_limits_are_validated() -> None:
    for bad in ({"cpu_seconds": 0}, {"wall_seconds": -1.0}, {"output_bytes": True}):
        with pytest.raises(ValueError, match="must be > 0"):
            ToolLimits(**bad)


async def test_startup_sweeps_tools_left_by_a_crashed_runtime(
    tmp_path: Path, stray_sleeps: list[int]
) -> None:
    """Runtime.open kills the processes marked with its data dir's token (a
    crashed server's tools) and nothing else."""
    ours, other = unique_seconds(), unique_seconds()
    token = data_dir_token(tmp_path)
    procs = []
    for seconds, marker in ((ours, f"{token}.7"), (other, "0123456789abcdef.7")):
        proc = await trio.lowlevel.open_process(
            ["sleep", seconds], env={**os.environ, MARKER: marker}, start_new_session=True
        )
        stray_sleeps.append(proc.pid)
        procs.append(proc)
    with trio.fail_after(GUARD):
        await wait_for_sleeps(ours, other)
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=MemoryStore()):
            pass
        # Killed during the start-up (SIGKILL: reaped at once).
        assert await procs[0].wait() == -signal.SIGKILL
        assert procs[1].returncode is None
        procs[1].kill()
        await procs[1].wait()


def test_choose_sandbox_without_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No bwrap: 'bwrap' is refused, 'auto' falls back to none and says why."""
    _bwrap_problem.cache_clear()
    try:
        monkeypatch.setattr(
            "shutil.which", lambda name: "/usr/bin/prlimit" if name == "prlimit" else None
        )
        with pytest.raises(ValueError, match="bubblewrap"):
            choose_sandbox("bwrap", tmp_path)
        chosen = choose_sandbox("auto", tmp_path)
        assert chosen.mode is SandboxMode.NONE
        assert "bubblewrap ('bwrap') is not installed" in chosen.reason
        assert "WITHOUT a sandbox" in chosen.reason
        with pytest.raises(ValueError, match="'auto', 'bwrap' or 'none'"):
            choose_sandbox("docker", tmp_path)
    finally:
        _bwrap_problem.cache_clear()


async def test_fallback_reaps_adopted_orphans(tmp_path: Path) -> None:
    """Unsandboxed, this process is the subreaper of a tool's orphans: one that
    exits on its own is reaped by the sweep, not left a zombie of ours."""
    become_subreaper()
    with trio.fail_after(GUARD):
        result = await run_shell(
            "(sleep 0.05 &) ; sleep 0.5; echo done", cwd=str(tmp_path), sandbox=DIRECT
        )
    assert result.output == b"done\n"
    left = [info for info in all_processes() if info.pgid == result.pid]
    assert left == []


async def test_tools_are_forked_from_the_event_loops_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bwrap's --die-with-parent fires when the *thread* that forked it exits:
    forked from one of trio's worker threads (idle ones exit after 10 s), every
    sandbox was SIGKILLed ten seconds into its call. The fork must happen on
    the event loop's thread, which lives as long as the runtime."""
    threads: list[int] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        threads.append(threading.get_ident())
        return real_popen(*args, **kwargs)

    monkeypatch.setattr("runtime._process.subprocess.Popen", recording_popen)
    with trio.fail_after(GUARD):
        result = await run_shell("echo hi", cwd=str(tmp_path))
    assert result.output == b"hi\n"
    assert threads == [threading.get_ident()]

"""ToolBox and run_shell against real files and real subprocesses.

These wait on worker threads and child processes, so they run on the real
clock under ``trio.fail_after`` guards (STYLE 40), never ``autojump_clock``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import trio

from runtime import BUILTIN_TOOLS, SANDBOX_ROOT, ToolLimits, Workspace
from runtime._process import ShellResult, run_shell
from runtime._tools import ToolBox, ToolOutcome

if TYPE_CHECKING:
    from collections.abc import Callable

#: Every test is guarded by this; nothing here should come near it.
GUARD = 10


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A workspace at ``tmp_path/ws``; the rest of ``tmp_path`` is outside it."""
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(str(root))


@pytest.fixture
def toolbox(ws: Workspace) -> ToolBox:
    return ToolBox(workspace=ws)


def _args(**kwargs: object) -> str:
    return json.dumps(kwargs)


def _live_group_members(pgid: int) -> list[psutil.Process]:
    """Processes of group ``pgid`` that are not zombies."""
    live = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return live


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def _wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` on the real clock (callers hold a fail_after guard)."""
    # Process state has no event to wait on; polling is the only option.
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def _settle_group(pgid: int) -> list[psutil.Process]:
    """Live members of ``pgid`` after giving SIGKILLed ones a moment to exit."""
    with trio.move_on_after(1):
        await _wait_until(lambda: not _live_group_members(pgid))
    return _live_group_members(pgid)


def _has_sleep(pgid: int) -> bool:
    """Whether a live member of ``pgid`` has exec'd ``sleep`` yet."""
    for proc in _live_group_members(pgid):
        try:
            if proc.name() == "sleep":
                return True
        except psutil.NoSuchProcess:
            continue
    return False


# ToolBox: the file tools


def test_builtin_tools_names() -> None:
    """BUILTIN_TOOLS advertises exactly the four tools ToolBox implements."""
    assert [t.name for t in BUILTIN_TOOLS] == [
        "list_files",
        "read_file",
        "write_file",
        "run_shell",
    ]
    for tool in BUILTIN_TOOLS:
        assert tool.parameters["type"] == "object"
        assert set(tool.parameters["required"]) <= set(tool.parameters["properties"])


@pytest.mark.parametrize("tool", [t.name for t in BUILTIN_TOOLS])
async def test_toolbox_dispatches_every_builtin_tool(toolbox: ToolBox, tool: str) -> None:
    """Each advertised tool name reaches its implementation, never "unknown tool"."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call(tool, "{}")
    assert "unknown tool" not in outcome.content


async def test_toolbox_write_file(toolbox: ToolBox, ws: Workspace) -> None:
    """write_file creates the file (and parents) with the UTF-8 content."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("write_file", _args(path="a/b.txt", content="héllo"))
    assert outcome == ToolOutcome("wrote 6 bytes to a/b.txt")
    assert (Path(ws.root) / "a" / "b.txt").read_text("utf-8") == "héllo"


async def test_toolbox_read_file(toolbox: ToolBox, ws: Workspace) -> None:
    """read_file returns the file's text."""
    ws.write("notes.txt", b"line 1\nline 2\n")
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("read_file", _args(path="notes.txt"))
    assert outcome == ToolOutcome("line 1\nline 2\n")


async def test_toolbox_sandbox_root_path(toolbox: ToolBox, ws: Workspace) -> None:
    """Paths under SANDBOX_ROOT map into the workspace for every file tool."""
    with trio.fail_after(GUARD):
        wrote = await toolbox.call(
            "write_file", _args(path=SANDBOX_ROOT + "/d/x.txt", content="abc")
        )
        read = await toolbox.call("read_file", _args(path=SANDBOX_ROOT + "/d/x.txt"))
        listed = await toolbox.call("list_files", _args(path=SANDBOX_ROOT + "/d"))
    assert not wrote.is_error
    assert read == ToolOutcome("abc")
    assert listed == ToolOutcome("file\t3\tx.txt")
    assert ws.read("d/x.txt") == b"abc"


async def test_toolbox_list_files(toolbox: ToolBox, ws: Workspace) -> None:
    """list_files gives one "type<TAB>size<TAB>name" line per entry, sorted."""
    ws.write("b.txt", b"12345")
    ws.write("a/inner.txt", b"x")
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("list_files", _args(path=""))
        default = await toolbox.call("list_files", "{}")
    assert not outcome.is_error
    rows = [line.split("\t") for line in outcome.content.splitlines()]
    assert [(kind, name) for kind, _, name in rows] == [("directory", "a"), ("file", "b.txt")]
    assert rows[1][1] == "5"
    assert default == outcome


async def test_toolbox_list_files_empty(toolbox: ToolBox) -> None:
    """An empty directory lists as a readable placeholder, not an empty string."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("list_files", _args(path="."))
    assert outcome == ToolOutcome("(empty directory)")


async def test_toolbox_file_error_is_outcome(toolbox: ToolBox) -> None:
    """A failing file operation is an error outcome naming the tool, not an exception."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("read_file", _args(path="missing.txt"))
    assert outcome.is_error
    assert outcome.content.startswith("read_file failed:")


# ToolBox: bad calls


@pytest.mark.parametrize("arguments", ["{not json", '{"path": ', "nul\0"])
async def test_toolbox_invalid_json(toolbox: ToolBox, arguments: str) -> None:
    """Arguments that are not JSON give an error outcome that says so."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("read_file", arguments)
    assert outcome.is_error
    assert "JSON" in outcome.content


@pytest.mark.parametrize("arguments", ["[1, 2]", '"notes.txt"', "42", "null"])
async def test_toolbox_non_object_json(toolbox: ToolBox, arguments: str) -> None:
    """JSON arguments that are not an object give an error outcome."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("list_files", arguments)
    assert outcome == ToolOutcome("arguments must be a JSON object", is_error=True)


@pytest.mark.parametrize(
    ("tool", "arguments", "key"),
    [
        ("read_file", "{}", "path"),
        ("read_file", _args(path=1), "path"),
        ("list_files", _args(path=None), "path"),
        ("write_file", _args(path="x.txt"), "content"),
        ("write_file", _args(path="x.txt", content=["a"]), "content"),
        ("write_file", _args(content="a"), "path"),
        ("run_shell", "{}", "command"),
        ("run_shell", _args(command=True), "command"),
    ],
)
async def test_toolbox_bad_argument(
    toolbox: ToolBox, ws: Workspace, tool: str, arguments: str, key: str
) -> None:
    """A missing or non-string argument gives an error outcome naming it."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call(tool, arguments)
    assert outcome.is_error
    assert repr(key) in outcome.content
    assert ws.list() == []


async def test_toolbox_unknown_tool(toolbox: ToolBox, ws: Workspace) -> None:
    """An unknown tool name gives an error outcome and touches nothing."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("delete_everything", _args(path="x"))
    assert outcome == ToolOutcome("unknown tool 'delete_everything'", is_error=True)
    assert ws.list() == []


@pytest.mark.parametrize("path", ["../secret.txt", "a/../../secret.txt", "/etc/passwd"])
@pytest.mark.parametrize("tool", ["read_file", "list_files"])
async def test_toolbox_path_escape_refused(
    toolbox: ToolBox, tmp_path: Path, tool: str, path: str
) -> None:
    """Paths leaving the workspace give an error outcome that reveals nothing."""
    (tmp_path / "secret.txt").write_text("secret")
    with trio.fail_after(GUARD):
        outcome = await toolbox.call(tool, _args(path=path))
    assert outcome.is_error
    assert outcome.content.startswith(f"{tool} failed: ")
    assert "root:" not in outcome.content  # no /etc/passwd bytes
    assert "\t" not in outcome.content  # no listing rows
    assert outcome.content.count("secret") == path.count("secret")


async def test_toolbox_write_escape_refused(toolbox: ToolBox, tmp_path: Path) -> None:
    """write_file outside the workspace gives an error outcome and writes nothing."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("write_file", _args(path="../evil.txt", content="x"))
    assert outcome.is_error
    assert not (tmp_path / "evil.txt").exists()


async def test_toolbox_deeply_nested_json_is_outcome(toolbox: ToolBox) -> None:
    """Pathologically nested JSON arguments give an error outcome, not an exception."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("list_files", "[" * 100_000 + "]" * 100_000)
    assert outcome.is_error


async def test_toolbox_run_shell_nul_command_is_outcome(toolbox: ToolBox) -> None:
    """A command containing a NUL byte gives an error outcome, not an exception."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("run_shell", _args(command="echo a\0b"))
    assert outcome.is_error


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("write_file", _args(path="x.txt", content="\ud800")),
        ("write_file", _args(path="\ud800", content="x")),
        ("read_file", _args(path="\ud800")),
        ("list_files", _args(path="\ud800")),
    ],
)
async def test_toolbox_lone_surrogate_is_outcome(
    toolbox: ToolBox, tool: str, arguments: str
) -> None:
    """Strings JSON allows but UTF-8 cannot encode give an error outcome."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call(tool, arguments)
    assert outcome.is_error


# ToolBox: run_shell


async def test_toolbox_run_shell_workspace_env_and_cwd(toolbox: ToolBox, ws: Workspace) -> None:
    """The shell runs with $WORKSPACE = the workspace root and cwd = the workspace."""
    started: list[int] = []
    toolbox.on_process = started.append
    with trio.fail_after(GUARD):
        outcome = await toolbox.call(
            "run_shell", _args(command='echo "$WORKSPACE"; pwd -P; echo hi > made.txt')
        )
    assert not outcome.is_error
    real_root = str(await trio.Path(ws.root).resolve())
    assert outcome.content.splitlines() == [ws.root, real_root]
    assert ws.read("made.txt") == b"hi\n"
    assert len(started) == 1


async def test_toolbox_run_shell_nonzero_exit(toolbox: ToolBox) -> None:
    """A nonzero exit status is an error outcome that keeps the output."""
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("run_shell", _args(command="echo oops >&2; exit 3"))
    assert outcome == ToolOutcome("oops\n\n[exit status 3]", is_error=True)


async def test_toolbox_run_shell_truncates_output(ws: Workspace) -> None:
    """Output over the cap is cut to the cap, the command stopped, an error outcome."""
    toolbox = ToolBox(workspace=ws, limits=ToolLimits(output_bytes=100))
    with trio.fail_after(GUARD):
        outcome = await toolbox.call("run_shell", _args(command="yes | head -c 100000"))
    assert outcome == ToolOutcome(
        "y\n" * 50 + "\n[output over 100 bytes: the command was stopped]", is_error=True
    )


async def test_toolbox_run_shell_timeout(ws: Workspace) -> None:
    """A shell over its wall-time limit is killed and reported as an error outcome."""
    pids: list[int] = []
    toolbox = ToolBox(workspace=ws, limits=ToolLimits(wall_seconds=0.5), on_process=pids.append)
    with trio.fail_after(2):
        outcome = await toolbox.call("run_shell", _args(command="sleep 30"))
    assert outcome == ToolOutcome("\n[killed after 0.5 s]", is_error=True)
    assert await _settle_group(pids[0]) == []


# run_shell


async def test_run_shell_result(tmp_path: Path) -> None:
    """run_shell returns the shell's pid, status and combined stdout/stderr."""
    pids: list[int] = []
    with trio.fail_after(GUARD):
        result = await run_shell(
            "echo out; echo err >&2; exit 7", cwd=str(tmp_path), on_start=pids.append
        )
    assert result == ShellResult(
        pid=pids[0], returncode=7, output=b"out\nerr\n", truncated=False, timed_out=False
    )


async def test_run_shell_exact_max_output_not_truncated(tmp_path: Path) -> None:
    """Output of exactly max_output bytes is kept whole and not flagged truncated."""
    with trio.fail_after(GUARD):
        result = await run_shell(
            "printf 0123456789", cwd=str(tmp_path), limits=ToolLimits(output_bytes=10)
        )
    assert (result.output, result.truncated) == (b"0123456789", False)


async def test_run_shell_cancel_kills_process_group(tmp_path: Path) -> None:
    """Cancelling run_shell kills the shell and its background grandchild."""
    pids: list[int] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def shell() -> None:
                with scope:
                    await run_shell(
                        "sleep 100 & echo started; wait",
                        cwd=str(tmp_path),
                        on_start=pids.append,
                    )

            nursery.start_soon(shell)
            await _wait_until(lambda: bool(pids) and _has_sleep(pids[0]))
            descendants = psutil.Process(pids[0]).children(recursive=True)
            # Named now: once killed they may be reaped at once (by us, when
            # this process is a subreaper).
            names = [p.name() for p in descendants]
            scope.cancel()
        assert scope.cancelled_caught
        assert not nursery.child_tasks
        assert names == ["sleep"]
        assert await _settle_group(pids[0]) == []
    assert _gone(pids[0])
    assert all(_gone(p.pid) for p in descendants)


async def test_run_shell_background_process_swept(tmp_path: Path) -> None:
    """A shell that exits leaving a background job returns at once and the job dies."""
    pids: list[int] = []
    with trio.fail_after(5):
        result = await run_shell(
            "sleep 100 & echo $! > bg.pid; echo done", cwd=str(tmp_path), on_start=pids.append
        )
    assert (result.returncode, result.output, result.timed_out) == (0, b"done\n", False)
    background = int((tmp_path / "bg.pid").read_text())
    with trio.fail_after(GUARD):
        assert await _settle_group(pids[0]) == []
    assert _gone(background)


async def test_run_shell_sigterm_ignored_still_killed(tmp_path: Path) -> None:
    """A group that ignores SIGTERM is killed at once on cancel (SIGKILL, no grace)."""
    pids: list[int] = []
    done = trio.Event()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def shell() -> None:
                with scope:
                    await run_shell(
                        "trap '' TERM; sleep 100", cwd=str(tmp_path), on_start=pids.append
                    )
                done.set()

            nursery.start_soon(shell)
            # The trap precedes the sleep, so once sleep runs SIGTERM is ignored.
            await _wait_until(lambda: bool(pids) and _has_sleep(pids[0]))
            scope.cancel()
            with trio.fail_after(1):
                await done.wait()
        assert scope.cancelled_caught
        assert await _settle_group(pids[0]) == []
    assert _gone(pids[0])


async def test_run_shell_time_limit(tmp_path: Path) -> None:
    """On the wall-time limit the group is killed and the partial output kept."""
    pids: list[int] = []
    with trio.fail_after(2):
        result = await run_shell(
            "echo partial; sleep 30",
            cwd=str(tmp_path),
            limits=ToolLimits(wall_seconds=0.5),
            on_start=pids.append,
        )
    assert result.timed_out
    assert result.output == b"partial\n"
    assert result.returncode is not None
    with trio.fail_after(GUARD):
        assert await _settle_group(pids[0]) == []

"""The built-in tools of a session turn, confined to its workspace.

``list_files``, ``read_file`` and ``write_file`` go through
:class:`~runtime._workspace.Workspace` in a worker thread; ``run_shell`` runs
a subprocess through :func:`~runtime._process.run_shell`. A tool never raises
for a bad call: unknown tools, arguments that are not a JSON object, paths
outside the workspace and failing commands all become a result with
``is_error=True`` that the model sees.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._errors import AgentRuntimeError, InvalidRequest
from ._model import ToolSpec
from ._process import DIRECT, run_shell
from ._sandbox import Sandbox, ToolLimits
from ._workspace import SANDBOX_ROOT

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._workspace import Workspace

#: Bytes of a file that ``read_file`` returns to the model.
READ_LIMIT: Final = 64 * 1024


def _params(**props: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: {"type": "string", "description": d} for name, d in props.items()},
        "required": list(props),
    }


BUILTIN_TOOLS: Final[tuple[ToolSpec, ...]] = (
    ToolSpec(
        name="list_files",
        description=f"List one level of a directory of the workspace ({SANDBOX_ROOT}).",
        parameters=_params(path="directory, relative to the workspace or under " + SANDBOX_ROOT),
    ),
    ToolSpec(
        name="read_file",
        description="Read a text file of the workspace (first 64 KiB).",
        parameters=_params(path="file, relative to the workspace or under " + SANDBOX_ROOT),
    ),
    ToolSpec(
        name="write_file",
        description="Create or replace a file of the workspace; parents are created.",
        parameters=_params(path="file to write", content="the whole new content"),
    ),
    ToolSpec(
        name="run_shell",
        description=(
            f"Run a shell command with cwd = the workspace ($WORKSPACE, {SANDBOX_ROOT}). "
            "Limited in wall time, CPU, memory, file size and output (the first 64 KiB "
            "by default; past that the command is stopped)."
        ),
        parameters=_params(command="the /bin/sh command line"),
    ),
)


@attrs.frozen
class ToolOutcome:
    """What a tool call gave back to the model."""

    content: str
    is_error: bool = False


@attrs.define(eq=False, kw_only=True)
class ToolBox:
    """Runs the built-in tools of one session."""

    workspace: Workspace
    limits: ToolLimits = attrs.Factory(ToolLimits)
    sandbox: Sandbox = DIRECT
    #: Called with the pid of each shell started (tests and statistics).
    on_process: Callable[[int], object] | None = None

    async def call(self, name: str, arguments: str) -> ToolOutcome:
        """Run tool ``name`` with JSON ``arguments``.

        Cancellation: a running shell's whole process group is killed before
        ``trio.Cancelled`` propagates; a file operation already handed to a
        worker thread completes (it is short) but its result is dropped.
        """
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            await trio.lowlevel.checkpoint()
            return ToolOutcome(f"arguments are not valid JSON: {exc}", is_error=True)
        if not isinstance(args, dict):
            await trio.lowlevel.checkpoint()
            return ToolOutcome("arguments must be a JSON object", is_error=True)
        try:
            if name == "run_shell":
                return await self._run_shell(_str_arg(args, "command"))
            if name == "list_files":
                path = _str_arg(args, "path", "")
                infos = await trio.to_thread.run_sync(self.workspace.list, path)
                lines = [f"{i.type}\t{i.size}\t{i.name}" for i in infos]
                return ToolOutcome("\n".join(lines) if lines else "(empty directory)")
            if name == "read_file":
                path = _str_arg(args, "path")
                data = await trio.to_thread.run_sync(
                    lambda: self.workspace.read(path, limit=READ_LIMIT + 1)
                )
                text = data[:READ_LIMIT].decode("utf-8", errors="replace")
                if len(data) > READ_LIMIT:
                    text += f"\n[file truncated to its first {READ_LIMIT} bytes]"
                return ToolOutcome(text)
            if name == "write_file":
                path, content = _str_arg(args, "path"), _str_arg(args, "content")
                info = await trio.to_thread.run_sync(
                    self.workspace.write, path, content.encode("utf-8")
                )
                return ToolOutcome(f"wrote {info.size} bytes to {path}")
        except (AgentRuntimeError, OSError, ValueError) as exc:
            # ValueError: NUL in a command, text UTF-8 cannot encode.
            return ToolOutcome(f"{name} failed: {exc}", is_error=True)
        await trio.lowlevel.checkpoint()
        return ToolOutcome(f"unknown tool {name!r}", is_error=True)

    async def _run_shell(self, command: str) -> ToolOutcome:
        seen_as = self.sandbox.workspace_path or self.workspace.root
        result = await run_shell(
            command,
            cwd=self.workspace.root,
            env=shell_environment(seen_as),
            limits=self.limits,
            sandbox=self.sandbox,
            on_start=self.on_process,
        )
        text = result.output.decode("utf-8", errors="replace")
        if result.truncated:
            return ToolOutcome(
                text + f"\n[output over {self.limits.output_bytes} bytes: the command was stopped]",
                is_error=True,
            )
        if result.timed_out:
            return ToolOutcome(
                text + f"\n[killed after {self.limits.wall_seconds:g} s]", is_error=True
            )
        if result.returncode:
            return ToolOutcome(text + f"\n[exit status {result.returncode}]", is_error=True)
        return ToolOutcome(text)


#: Variables a tool's shell inherits from ours; nothing else (the server's own
#: environment holds secrets such as the upstream model's API key).
INHERITED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ")


def shell_environment(workspace: str) -> dict[str, str]:
    """The environment of ``run_shell``: a short allow-list, never our secrets."""
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = workspace
    env["WORKSPACE"] = workspace
    return env


def _str_arg(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise InvalidRequest(f"argument {key!r} must be a string, got {value!r}")
    return value

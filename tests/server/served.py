"""``agent-runtime serve`` as a subprocess, for end-to-end and crash tests."""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

KEY: Final = "pk_e2e_carol"
#: Runs the console script's entry point (what ``agent-runtime`` runs).
MAIN: Final = "from server._cli import main; raise SystemExit(main())"


@attrs.define
class Served:
    process: trio.Process
    url: str
    data_dir: Path
    output: list[str]


@asynccontextmanager
async def run_server(
    tmp_path: Path,
    *extra: str,
    api_key: str | None = KEY,
    code: str = MAIN,
    expect_key: bool | None = None,
) -> AsyncIterator[Served]:
    """Start ``agent-runtime serve`` on a free port; SIGKILL it if still alive at the end.

    With ``api_key=None`` it starts with no key and waits for the one it prints too.
    ``code`` is the Python run with ``-c`` (a test may install hooks before ``main``).
    ``expect_key=False``: no key given, none expected (the data dir has keys).
    Once the block has ended, ``output[-1]`` holds everything the server printed.
    """
    if expect_key is None:
        expect_key = api_key is None
    data_dir = tmp_path / "data"
    command = [
        sys.executable,
        "-c",
        code,
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *(["--api-key", api_key] if api_key is not None else []),
        *extra,
    ]
    ready = (
        rb"serving on (http://\S+)\n.*API key.*\n" if expect_key else rb"serving on (http://\S+)"
    )
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output: list[str] = []
    buffer = b""
    try:
        with trio.fail_after(15):
            while (match := re.search(ready, buffer)) is None:
                chunk = await process.stdout.receive_some()
                assert chunk, f"server exited early: {buffer.decode(errors='replace')}"
                buffer += chunk
        output.append(buffer.decode())
        yield Served(process, match.group(1).decode(), data_dir, output)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            with trio.move_on_after(5):
                while chunk := await process.stdout.receive_some():
                    buffer += chunk
            await process.stdout.aclose()
            output.append(buffer.decode(errors="replace"))

"""A SIGKILLed server's tool processes: a bubblewrap sandbox dies with the
server (``--die-with-parent``); unsandboxed tools are killed by the next
start-up's sweep. ``agent-runtime serve`` as a subprocess, real clock."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from ..helpers import process_gone
from ..runtime.test_sandbox import HAVE_BWRAP, find_sleeps, unique_seconds, wait_for_sleeps
from .served import KEY, run_server

if TYPE_CHECKING:
    from pathlib import Path

GUARD = 30


async def start_tool(url: str, names: tuple[str, str]) -> int:
    """Start a turn whose run_shell call sleeps, in a session; the sleep's pid."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        sid = (await client.post("/v1/sessions", json={})).json()["id"]
        body = {"message": f"run: setsid sleep {names[0]} & exec sleep {names[1]}"}
        async with client.stream("POST", f"/v1/sessions/{sid}/messages", json=body) as response:
            assert response.status_code == 200
            pids = await wait_for_sleeps(*names)
    return len(pids)


@pytest.mark.parametrize(
    "sandbox",
    [
        pytest.param("bwrap", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="no bubblewrap")),
        "none",
    ],
)
async def test_tools_do_not_survive_a_sigkilled_server(tmp_path: Path, sandbox: str) -> None:
    names = (unique_seconds(), unique_seconds())
    try:
        with trio.fail_after(GUARD):
            async with run_server(tmp_path, "--sandbox", sandbox) as served:
                if sandbox == "none":
                    assert "WARNING: sandbox 'none' asked for" in served.output[0]
                assert await start_tool(served.url, names) == 2
                served.process.kill()
                await served.process.wait()
            if sandbox == "bwrap":
                # The kernel takes the sandbox down with the server: no restart needed.
                while True:  # polling: their deaths send us nothing
                    if not find_sleeps(*names):
                        break
                    await trio.sleep(0.01)
            else:
                assert len(find_sleeps(*names)) == 2  # orphans, until the next start
                async with run_server(tmp_path, "--sandbox", sandbox, expect_key=False):
                    assert find_sleeps(*names) == {}
    finally:
        for pid in find_sleeps(*names).values():
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)

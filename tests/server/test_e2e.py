"""End to end: ``agent-runtime serve`` as a subprocess, driven by the seed's
unchanged example, by curl, and stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest
import trio

from .conftest import parse_sse
from .served import KEY, run_server

SEED_EXAMPLE = Path(__file__).resolve().parents[3] / "shared" / "seed" / "cancel_example.py"


async def test_e2e_seed_example_unchanged(tmp_path: Path) -> None:
    """The seed's cancel example runs unchanged: cancelling msg_…, 202 cancelling, terminal."""
    async with run_server(tmp_path) as served:
        env = dict(os.environ, POKEE_API=served.url, POKEE_KEY=KEY)
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, str(SEED_EXAMPLE)], env=env, capture_stdout=True, check=True
            )
        output = result.stdout.decode()
        # The example prints from two threads; our terminal event arrives so
        # soon after the 202 that the reader's line can land in the middle of
        # the main thread's "202 {...}" print. Take that line out first.
        assert output.count("got cancellation terminal\n") == 1, output
        lines = output.replace("got cancellation terminal\n", "").splitlines()
        assert re.fullmatch(r"cancelling (msg_[0-9a-f]{32})", lines[0]), lines
        rid = lines[0].split()[1]
        assert lines[1] == f"202 {{'response_id': '{rid}', 'status': 'cancelling'}}", output
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=30) as client:
            [session] = (await client.get("/v1/sessions")).json()
            sid = session["id"]
            again = await client.post(f"/v1/sessions/{sid}/responses/{rid}/cancel")
            assert (again.status_code, again.json()) == (
                200,
                {"response_id": rid, "status": "already_complete"},
            )
            usage = (await client.get("/v1/usage")).json()
            assert rid not in {r["response_id"] for r in usage["records"]}
            workspace = served.data_dir / "workspaces" / sid
            assert workspace.is_dir()
            deleted = await client.delete(f"/v1/sessions/{sid}")
            assert deleted.status_code == 204
            assert not workspace.exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_e2e_curl_quickstart(tmp_path: Path) -> None:
    """curl: a JSON body with curl's default form content type works; -N streams SSE."""
    async with run_server(tmp_path, "--demo-tokens-per-second", "0") as served:
        auth = f"Authorization: Bearer {KEY}"
        with trio.fail_after(20):
            created = await trio.run_process(
                [
                    "curl",
                    "-sS",
                    "-H",
                    auth,
                    "-d",
                    '{"persistent": true}',
                    f"{served.url}/v1/sessions",
                ],
                capture_stdout=True,
                check=True,
            )
            sid = httpx.Response(200, content=created.stdout).json()["id"]
            streamed = await trio.run_process(
                [
                    "curl", "-sSN", "-H", auth, "-d", '{"message": "Write a 12-word essay"}',
                    f"{served.url}/v1/sessions/{sid}/messages",
                ],
                capture_stdout=True,
                check=True,
            )  # fmt: skip
        events = parse_sse(streamed.stdout.decode())
        assert events[0].event == "message.created"
        assert events[-1].event == "message.completed"
        text = "".join(e.data["content"] for e in events if e.event == "text.delta")
        assert len(text.split()) == 12


async def test_e2e_sigterm_drains(tmp_path: Path) -> None:
    """SIGTERM: the open stream ends message.cancelled(shutdown), unbilled; exit 0 within 5 s."""
    async with run_server(tmp_path) as served:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=30) as client:
            sid = (await client.post("/v1/sessions")).json()["id"]
            with trio.fail_after(15):
                async with client.stream(
                    "POST", f"/v1/sessions/{sid}/messages", json={"message": "a 5000-word essay"}
                ) as response:
                    raw = b""
                    chunks = response.aiter_bytes()
                    async for chunk in chunks:
                        raw += chunk
                        if b"text.delta" in raw:
                            break
                    served.process.send_signal(signal.SIGTERM)
                    started = trio.current_time()
                    async for chunk in chunks:
                        raw += chunk
        events = parse_sse(raw.decode())
        assert events[-1].event == "message.cancelled"
        assert events[-1].data["reason"] == "shutdown"
        assert [e.id for e in events] == list(range(len(events)))
        with trio.fail_after(5):
            await served.process.wait()
        assert served.process.returncode == 0
        assert trio.current_time() - started < 5
        # A non-persistent session's workspace is removed on shutdown.
        assert not (served.data_dir / "workspaces" / sid).exists()


async def test_e2e_serve_without_key_creates_one(tmp_path: Path) -> None:
    """With no --api-key, serve prints a new key once, and that key works."""
    async with run_server(tmp_path, api_key=None) as served:
        [text] = served.output
        key = re.search(r"API key \(shown once, stored only as a hash\): (pk_local_\S+)", text)
        assert key is not None, text
        assert text.count(key.group(1)) == 1
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {key.group(1)}"}
            ok = await client.get("/v1/sessions", headers=headers)
            assert (ok.status_code, ok.json()) == (200, [])
            bad = await client.get("/v1/sessions", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401


async def test_e2e_sigterm_with_a_client_that_stopped_reading(tmp_path: Path) -> None:
    """A client that stopped reading (its socket full) cannot keep the server alive after
    SIGTERM: hypercorn's write to it is shielded, so serve exits after its graceful wait."""
    import socket

    async with run_server(tmp_path, "--demo-tokens-per-second", "0") as served:
        host, port = served.url.removeprefix("http://").split(":")
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            headers = {"Authorization": f"Bearer {KEY}"}
            sid = (await client.post("/v1/sessions", headers=headers)).json()["id"]
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        body = b'{"message": "Write a 2000000-word essay"}'
        await sock.send(
            f"POST /v1/sessions/{sid}/messages HTTP/1.1\r\nHost: t\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await trio.sleep(1)  # the server fills our (unread) socket and blocks writing
        served.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await served.process.wait()
        sock.close()
    assert served.process.returncode == 0

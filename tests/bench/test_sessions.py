"""``bench sessions``: idle sessions and held streams, at small sizes.

Real sockets and subprocesses: the real clock, with ``trio.fail_after`` guards.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import trio
import trio.testing
from rich.console import Console

from bench._samples import redact_url
from bench._sessions import (
    IDLE_TARGET_NAME,
    STREAMS_TARGET_NAME,
    Connection,
    Endpoint,
    find_local_pids,
    print_sessions_report,
    read_body,
    read_head,
    run_sessions_bench,
    targets,
)

from ..server.served import KEY, run_server

if TYPE_CHECKING:
    from collections.abc import Callable


def progress_log() -> tuple[list[tuple[str, int, int]], Callable[[str, int, int], None]]:
    seen: list[tuple[str, int, int]] = []

    def on_progress(phase: str, done: int, total: int) -> None:
        seen.append((phase, done, total))

    return seen, on_progress


def as_json(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` through strict JSON (no NaN/inf), as a report file would hold it."""
    loaded: dict[str, Any] = json.loads(json.dumps(doc, allow_nan=False))
    return loaded


def render(doc: dict[str, Any]) -> str:
    console = Console(record=True, width=120)
    print_sessions_report(doc, console)
    return console.export_text()


def assert_positive(section: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = section[key]
        assert isinstance(value, int | float), (key, value)
        assert math.isfinite(value), (key, value)
        assert value > 0, (key, value)


def assert_idle(idle: dict[str, Any], count: int) -> None:
    assert idle["count"] == idle["created"] == count
    assert idle["errors"] == 0, idle["error_kinds"]
    assert_positive(
        idle,
        "rss_before_mb",
        "rss_after_mb",
        "fds_before",
        "fds_after",
        "seconds",
        "create_per_second",
    )
    assert idle["rss_per_session_kb"] is not None


def assert_streams(streams: dict[str, Any], count: int) -> None:
    assert streams["count"] == streams["held"] == count
    assert streams["errors"] == 0, streams["error_kinds"]
    assert streams["error_kinds"] == {}
    assert_positive(
        streams,
        "rss_mb",
        "rss_peak_mb",
        "fds",
        "fds_before",
        "first_event_p50_ms",
        "first_event_p99_ms",
        "first_event_max_ms",
        "headers_p99_ms",
        "seconds",
        "server_cpu_percent",
    )
    assert streams["first_event_p50_ms"] <= streams["first_event_p99_ms"]
    # The server held a socket per stream, and let go of them once we closed ours.
    assert streams["fds"] >= streams["fds_before"] + count
    assert streams["fds_after_close"] is not None
    assert streams["fds_after_close"] <= streams["fds_before"] + 4


async def test_own_server() -> None:
    seen, on_progress = progress_log()
    with trio.fail_after(45):
        doc = as_json(
            await run_sessions_bench(
                count=200,
                streams=50,
                url=None,
                api_key=None,
                embedded=False,
                on_progress=on_progress,
                hold_seconds=1.0,
            )
        )
    assert doc["kind"] == "sessions"
    assert doc["machine"]["cores"] == os.cpu_count()
    assert doc["options"]["target"] == "server"
    assert doc["options"]["count"] == 200
    assert doc["options"]["streams"] == 50
    assert "api_key" not in json.dumps(doc["options"])
    assert_idle(doc["idle"], 200)
    assert doc["idle"]["rss_per_session_kb"] > 0  # 200 sessions: MBs, never noise
    assert_streams(doc["streams"], 50)
    # Stopped (drained by SIGTERM, not killed), its directory gone.
    server = doc["server"]
    assert server["spawned"] is True
    assert server["returncode"] == 0
    assert server["killed"] is False
    assert not any(psutil.pid_exists(pid) for pid in server["pids"])
    assert not Path(server["directory"]).exists()
    idle_target, stream_target = doc["targets"]
    assert idle_target["name"] == IDLE_TARGET_NAME
    assert idle_target["value"] > 0
    assert isinstance(idle_target["met"], bool)
    assert "projected" in idle_target["note"]
    assert stream_target["name"] == STREAMS_TARGET_NAME
    assert stream_target["value"] == 50
    assert stream_target["met"] is None  # 50 streams do not judge a 1,000 target
    phases = {phase for phase, _, _ in seen}
    assert {"idle sessions", "stream sessions", "streams", "stopping server"} <= phases
    assert ("idle sessions", 200, 200) in seen
    text = render(doc)
    assert "200 idle sessions" in text
    assert "50 concurrent streams" in text
    assert IDLE_TARGET_NAME in text
    assert STREAMS_TARGET_NAME in text


async def test_embedded() -> None:
    with trio.fail_after(20):
        doc = as_json(
            await run_sessions_bench(count=200, streams=50, url=None, api_key=None, embedded=True)
        )
    assert doc["options"]["target"] == "embedded"
    assert_idle(doc["idle"], 200)
    assert doc["streams"] is None
    assert doc["server"] is None
    idle_target, stream_target = doc["targets"]
    assert idle_target["value"] > 0
    assert stream_target["value"] is None
    assert stream_target["met"] is None
    text = render(doc)
    assert "200 idle sessions" in text
    assert "concurrent streams" not in text
    assert "n/a" in text


async def test_url_measures_a_local_server_and_cleans_up(tmp_path: Path) -> None:
    async with run_server(tmp_path, "--demo-tokens-per-second", "1") as served:
        with trio.fail_after(30):
            doc = as_json(
                await run_sessions_bench(
                    count=100,
                    streams=20,
                    url=served.url,
                    api_key=KEY,
                    embedded=False,
                    hold_seconds=0.5,
                )
            )
            assert doc["options"]["target"] == "url"
            assert doc["options"]["url"] == served.url
            assert doc["server"] == {"pids": [served.process.pid], "spawned": False}
            assert_idle(doc["idle"], 100)
            assert_streams(doc["streams"], 20)
            # Every session the benchmark created is gone again.
            conn = Connection(Endpoint.parse(served.url, KEY))
            try:
                status, body = await conn.call("GET", "/v1/sessions")
            finally:
                await conn.close()
            assert status == 200
            assert json.loads(body) == []
        assert served.process.returncode is None  # someone else's server: left running
    assert f"server at {served.url}" in render(doc)


async def test_cancelled_run_leaves_nothing_behind() -> None:
    """Ctrl-C (here: a cancel) mid-run stops our server and removes its directory."""
    children: set[int] = set()
    phases: list[str] = []
    directories = set(Path(tempfile.gettempdir()).glob("agent-runtime-bench-sessions-*"))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            def on_progress(phase: str, done: int, total: int) -> None:
                phases.append(phase)
                children.update(p.pid for p in psutil.Process().children(recursive=True))
                if phase == "idle sessions" and done >= 100:
                    nursery.cancel_scope.cancel()

            async def run() -> None:
                await run_sessions_bench(
                    count=5000,
                    streams=10,
                    url=None,
                    api_key=None,
                    embedded=False,
                    on_progress=on_progress,
                )

            nursery.start_soon(run)
    assert nursery.cancel_scope.cancelled_caught
    assert "stopping server" in phases
    assert children, "the server was a child of this process"
    assert not any(psutil.pid_exists(pid) for pid in children)
    assert set(Path(tempfile.gettempdir()).glob("agent-runtime-bench-sessions-*")) <= directories


async def test_url_needs_a_key_and_excludes_embedded() -> None:
    with pytest.raises(ValueError, match="api-key"):
        await run_sessions_bench(
            count=1, streams=0, url="http://127.0.0.1:1", api_key=None, embedded=False
        )
    with pytest.raises(ValueError, match="exclude"):
        await run_sessions_bench(
            count=1, streams=0, url="http://127.0.0.1:1", api_key="k", embedded=True
        )
    with pytest.raises(ValueError, match="count"):
        await run_sessions_bench(count=0, streams=0, url=None, api_key=None, embedded=True)


async def test_remote_server_has_no_pids() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    assert await find_local_pids(Endpoint.parse("http://192.0.2.1:8000", "k")) == []


def test_endpoint_and_redaction() -> None:
    endpoint = Endpoint.parse("https://api.example.com/prefix/", "secret")
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.prefix) == (
        "https",
        "api.example.com",
        443,
        "/prefix",
    )
    request = endpoint.request("POST", "/v1/sessions", b"{}")
    assert request.startswith(b"POST /prefix/v1/sessions HTTP/1.1\r\n")
    assert b"Authorization: Bearer secret\r\n" in request
    assert request.endswith(b"Content-Length: 2\r\n\r\n{}")
    assert "secret" not in repr(endpoint)
    with pytest.raises(ValueError, match="http://"):
        Endpoint.parse("ftp://example.com", "k")
    assert redact_url("http://u:pw@host:1/x") == "http://u:***@host:1/x"
    assert redact_url("http://host:1") == "http://host:1"
    assert redact_url(None) is None


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: 1\r\n\r\n",
            b"hello",
        ),
    ],
)
async def test_read_response(raw: bytes, body: bytes) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    buf = bytearray()
    for byte in range(len(raw)):  # one byte at a time: every split point
        await send.send_all(raw[byte : byte + 1])
    await send.aclose()
    status, headers = await read_head(receive, buf)
    assert status in (200, 201)
    assert await read_body(receive, buf, headers) == body
    assert buf == b""


def doc_with(idle: dict[str, Any] | None, streams: dict[str, Any] | None) -> dict[str, Any]:
    return {"idle": idle, "streams": streams}


def idle_section(created: int, before: float, after: float, errors: int = 0) -> dict[str, Any]:
    return {
        "created": created,
        "errors": errors,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_per_session_kb": (after - before) * 1024 / created,
    }


def test_targets() -> None:
    stream_ok = {"count": 1000, "held": 1000, "errors": 0}
    idle_target, stream_target = targets(doc_with(idle_section(10_000, 50, 250), stream_ok))
    assert (idle_target["value"], idle_target["met"], idle_target["note"]) == (250, True, None)
    assert (stream_target["value"], stream_target["met"]) == (1000, True)
    # Projected from fewer sessions: 50 MB + 100 x 31 KiB x 10,000 / 100 > 300 MB.
    idle_target, _ = targets(doc_with(idle_section(100, 50, 53.03), None))
    assert idle_target["met"] is False
    assert idle_target["value"] == pytest.approx(50 + 3.03 * 100, abs=0.01)
    assert "projected" in idle_target["note"]
    idle_target, _ = targets(doc_with(idle_section(10_000, 50, 250, errors=1), None))
    assert idle_target["met"] is False  # errors: the sessions were not all there
    # An error, or a stream not held, misses the streams target.
    for bad in ({"held": 999}, {"errors": 1}):
        _, stream_target = targets(doc_with(None, stream_ok | bad))
        assert stream_target["met"] is False
    # No RSS (a remote server) and no streams: not judged.
    unknown = idle_section(10_000, 50, 250) | {"rss_after_mb": None}
    idle_target, stream_target = targets(doc_with(unknown, None))
    assert idle_target["met"] is None
    assert stream_target["met"] is None

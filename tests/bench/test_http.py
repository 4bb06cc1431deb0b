"""``bench cancel --url``: worker processes against a real ``agent-runtime serve``.

Real sockets and subprocesses: the real clock, with ``trio.fail_after`` guards.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import trio

from bench._http import plan_workers, run_http_level
from bench._http_worker import WorkerConfig
from bench._rawhttp import ChunkedDecoder, FrameSplitter, event_type
from bench._samples import CancelOptions, LevelResult, TurnSample, converter, parse_cancel_at

from ..server.served import KEY, Served, run_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with run_server(tmp_path, "--demo-tokens-per-second", "200") as server:
        yield server


def options(served: Served, **kwargs: Any) -> CancelOptions:
    fields: dict[str, Any] = {"turns": 4, "cancel_at": parse_cancel_at("5e")}
    fields.update(kwargs)
    return CancelOptions(target="http", url=served.url, api_key=KEY, **fields)


async def run_level(opts: CancelOptions, concurrency: int) -> tuple[LevelResult, list[TurnSample]]:
    seen: list[TurnSample] = []
    with trio.fail_after(20):
        level = await run_http_level(opts, concurrency, seen.append)
    return level, seen


def assert_all_cancelled(level: LevelResult, seen: list[TurnSample], terminal: str) -> None:
    """Every turn cancelled as promised, measured, not billed; the client's cost known."""
    assert len(level.samples) == len(seen) == 4
    assert all(s.billed is None for s in seen), "billing is read after the level"
    for sample in level.samples:
        assert sample.ok, sample
        assert sample.terminal == terminal
        assert sample.billed is False
        assert sample.response_id is not None
        for metric in ("headers_ms", "first_event_ms", "ack_ms", "stop_ms"):
            value = getattr(sample, metric)
            assert value is not None, metric
            assert value >= 0.0, metric
        assert sample.t_cancel is not None
        assert sample.t_ack is not None
        assert sample.t_ack >= sample.t_cancel
    tags = [s.tag for s in level.samples]
    assert None not in tags
    assert len(set(tags)) == len(tags), "each turn has its own tag"
    assert level.client_cpu_percent
    assert all(percent >= 0.0 for percent in level.client_cpu_percent)
    assert level.wall_seconds > 0.0


def worker_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "bench._http_worker" in child.cmdline():
                found.append(child)
    return found


# -- pure pieces ------------------------------------------------------------------


def test_chunked_decoder_any_split() -> None:
    """De-chunking gives the same bytes however the input is cut, and keeps what follows."""
    body = b"1a\r\n" + b"x" * 26 + b"\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\nNEXT"
    for cut in range(1, 12):
        decoder = ChunkedDecoder()
        out = b"".join(decoder.feed(body[i : i + cut]) for i in range(0, len(body), cut))
        assert out == b"x" * 26 + b"abc"
        assert decoder.done
        assert decoder.leftover().endswith(b"NEXT")
    whole = ChunkedDecoder()  # one chunk per read: the fast path
    assert whole.feed(b"3\r\nabc\r\n") == b"abc"
    assert whole.feed(b"2\r\nde\r\n") == b"de"
    assert whole.feed(b"0\r\n\r\n") == b""
    assert whole.done


def test_frame_splitter_reads_only_event_types() -> None:
    """Frames split at blank lines across reads; comments have no type."""
    stream = (
        b"id: 0\nevent: message.created\ndata: {}\n\n: ping\n\n"
        b"id: 1\r\nevent: text.delta\r\ndata: {}\r\n\r\ndata: {}\n\n"
    )
    splitter = FrameSplitter()
    frames = [f for i in range(0, len(stream), 7) for f in splitter.feed(stream[i : i + 7])]
    assert [event_type(f) for f in frames] == [b"message.created", None, b"text.delta", b"message"]


def test_plan_workers_splits_turns_and_streams() -> None:
    """One worker per 50 streams by default, never more than turns; shares differ by <= 1."""
    opts = CancelOptions(target="http", url="http://127.0.0.1:1", api_key="k", turns=10)
    plan = plan_workers(opts, 120)
    assert [(c.concurrency, c.turns, c.worker, c.level) for c in plan] == [
        (40, 4, 0, 120),
        (40, 3, 1, 120),
        (40, 3, 2, 120),
    ]
    assert (
        len(plan_workers(CancelOptions(target="http", url="http://h", api_key="k", turns=2), 100))
        == 2
    )
    forced = CancelOptions(target="http", url="http://h", api_key="k", turns=50, processes=8)
    assert len(plan_workers(forced, 3)) == 3
    with pytest.raises(ValueError, match="no 'tool' scenario"):
        plan_workers(
            CancelOptions(
                target="http", url="http://h", api_key="k", scenario="tool", stateless=True
            ),
            1,
        )
    with pytest.raises(ValueError, match="--url and --api-key"):
        plan_workers(CancelOptions(target="http"), 1)


# -- the worker's line protocol ------------------------------------------------------


async def test_worker_line_protocol(served: Served) -> None:
    """Config line in; ready, one sample line per turn, then stats out; exit 0."""
    config = WorkerConfig(
        url=served.url,
        api_key=KEY,
        scenario="stream",
        turns=2,
        concurrency=2,
        cancel_at=parse_cancel_at("3e"),
        level=2,
        worker=7,
    )
    line = json.dumps(converter.unstructure(config)).encode() + b"\n"
    with trio.fail_after(20):
        done = await trio.run_process(
            [sys.executable, "-m", "bench._http_worker"], stdin=line, capture_stdout=True
        )
    messages = [json.loads(raw) for raw in done.stdout.splitlines()]
    assert [next(iter(m)) for m in messages] == ["ready", "sample", "sample", "stats"]
    assert isinstance(messages[0]["ready"], int)
    samples = [converter.structure(m["sample"], TurnSample) for m in messages[1:3]]
    assert sorted(s.tag or "" for s in samples) == ["7-0", "7-1"]
    assert all(s.ok and s.concurrency == 2 and s.terminal == "message.cancelled" for s in samples)
    stats = messages[3]["stats"]
    assert stats["wall_seconds"] > 0
    assert stats["cpu_seconds"] >= 0
    assert set(stats) >= {"loop_lag_p99_ms", "loop_lag_max_ms"}


async def test_worker_refuses_bad_config() -> None:
    """A bad config is one error line and exit status 2."""
    line = b'{"url": "http://h", "api_key": "k", "scenario": "nope", "turns": 1, '
    line += b'"concurrency": 1, "level": 1, "cancel_at": "5e"}\n'
    with trio.fail_after(20):
        done = await trio.run_process(
            [sys.executable, "-m", "bench._http_worker"],
            stdin=line,
            capture_stdout=True,
            check=False,
        )
    assert done.returncode == 2
    assert "unknown scenario 'nope'" in json.loads(done.stdout)["error"]


# -- levels against a real server ------------------------------------------------------


async def test_http_level_stream(served: Served) -> None:
    """Session turns at concurrency 1 and 3, then streamed /v1/responses turns cancelled a
    random 10-50 ms after their first event: each cancelled mid-text, measured, not billed."""
    for concurrency in (1, 3):
        level, seen = await run_level(options(served), concurrency)
        assert level.concurrency == concurrency
        assert_all_cancelled(level, seen, "message.cancelled")
        assert {s.concurrency for s in level.samples} == {concurrency}
        assert all(s.group_gone_ms is None and s.workspace_gone is None for s in level.samples)
    stateless = options(served, stateless=True, cancel_at=parse_cancel_at("0.01-0.05"))
    level, seen = await run_level(stateless, 3)
    assert_all_cancelled(level, seen, "response.cancelled")
    assert all((s.response_id or "").startswith("resp_") for s in level.samples)


async def test_http_level_tool(served: Served) -> None:
    """Cancel during run_shell: the tool's process group is seen gone, no sleep survives."""
    level, seen = await run_level(options(served, scenario="tool"), 3)
    assert_all_cancelled(level, seen, "message.cancelled")
    for sample in level.samples:
        assert sample.group_gone_ms is not None
        assert sample.group_gone_ms >= 0.0
    workspaces = str(served.data_dir)
    survivors = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["cmdline"] == ["sleep", "60"] and proc.environ().get(
                "WORKSPACE", ""
            ).startswith(workspaces):
                survivors.append(proc)
    assert survivors == []


async def test_http_level_delete(served: Served) -> None:
    """DELETE mid-turn: the stream ends message.cancelled and the workspace is gone."""
    level, seen = await run_level(options(served, scenario="delete"), 3)
    assert_all_cancelled(level, seen, "message.cancelled")
    assert all(s.workspace_gone is True for s in level.samples)
    assert not list((served.data_dir / "workspaces").iterdir())


async def test_http_level_cancelled_leaves_no_worker() -> None:
    """Cancelling a level while its turns are in flight kills and reaps every worker."""
    # A server that accepts connections and never answers: every turn waits
    # in its first request.
    accepted: list[trio.socket.SocketType] = []
    connected = trio.Event()

    async def accept_forever(listener: trio.socket.SocketType) -> None:
        while True:
            sock, _ = await listener.accept()
            accepted.append(sock)
            if len(accepted) == 4:  # every turn of both workers has connected
                connected.set()

    listener = trio.socket.socket()
    try:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        host, port = listener.getsockname()
        opts = CancelOptions(
            target="http", url=f"http://{host}:{port}", api_key=KEY, turns=8, processes=2
        )
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_forever, listener)
                nursery.start_soon(run_http_level, opts, 4, lambda _: None)
                await connected.wait()
                assert len(worker_children()) == 2
                nursery.cancel_scope.cancel()
    finally:
        for sock in [listener, *accepted]:
            sock.close()
    assert worker_children() == []

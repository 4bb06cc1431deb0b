"""``bench cancel --embedded`` (bench/_embedded.py) and the upstream harnesses
(bench/_upstream.py) at tiny sizes.

Real clock, real threads and processes (the SQLite worker, ``run_shell``, an
``agent-runtime serve`` subprocess): every test is bounded by
``trio.fail_after``, no autojump clock.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Final

import httpx
import psutil
import pytest
import trio

from bench import _embedded
from bench._embedded import run_embedded_level
from bench._samples import CancelAt, CancelOptions, LevelResult, TurnSample
from bench._upstream import (
    bench_tag,
    current_clock_offset,
    request_tag,
    serve_with_fake_upstream,
    upstream_metrics,
    wait_upstream_closed,
)
from runtime._process import live_group_members

if TYPE_CHECKING:
    from pathlib import Path

TIMEOUT: Final = 30
TURNS: Final = 4


async def run_level(concurrency: int, **options: Any) -> tuple[LevelResult, list[TurnSample]]:
    """One level; returns it and what ``on_sample`` got."""
    seen: list[TurnSample] = []
    options = {"turns": TURNS, "tokens_per_second": 200.0, **options}
    opts = CancelOptions(target="embedded", **options)
    with trio.fail_after(TIMEOUT):
        level = await run_embedded_level(opts, concurrency, seen.append)
    return level, seen


def check_common(
    level: LevelResult, seen: list[TurnSample], scenario: str, c: int, *, paced: bool = True
) -> None:
    """Every turn ran, was cancelled as promised, and was not billed."""
    assert level.concurrency == c
    assert len(level.samples) == len(seen) == TURNS
    assert {s.tag for s in seen} == {s.tag for s in level.samples}
    assert level.wall_seconds > 0
    assert len(level.client_cpu_percent) == 1
    for s in level.samples:
        assert s.error is None, s
        assert s.ok, s
        assert s.scenario == scenario
        assert s.concurrency == c
        assert s.billed is False
        assert s.response_id is not None
        assert s.terminal is not None
        assert s.terminal.endswith(".cancelled")
        assert s.tag is not None
        assert s.t_cancel is not None
        assert s.t_ack is not None
        assert s.t_ack >= s.t_cancel
        assert s.headers_ms is None  # in-process: no headers
        for metric in (s.first_event_ms, s.ack_ms, s.stop_ms):
            assert metric is not None
            assert metric >= 0
        # The buffer is sealed at the cancel; paced, at most a delta appended
        # just before it can still be read after the ack (unpaced, the reader
        # may be further behind the writer).
        assert s.deltas_after_ack <= 1 or not paced
    # on_sample saw each turn before billing was known.
    assert all(s.billed is None for s in seen)
    assert len({s.response_id for s in level.samples}) == TURNS


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_stream(concurrency: int, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
        path: str = mkdtemp(*args, **kwargs)
        made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    level, seen = await run_level(concurrency, scenario="stream")
    check_common(level, seen, "stream", concurrency)
    for s in level.samples:
        assert s.terminal == "message.cancelled"
        assert s.group_gone_ms is None
        assert s.upstream_closed_ms is None
        assert s.workspace_gone is None
    [data_dir] = made
    assert not os.path.exists(data_dir)  # the level's data dir is removed


async def test_stream_stateless_cancelled_at_a_random_time() -> None:
    level, seen = await run_level(
        3, scenario="stream", stateless=True, cancel_at=CancelAt(low=0.01, high=0.03)
    )
    check_common(level, seen, "stream", 3)
    for s in level.samples:
        assert s.terminal == "response.cancelled"
        assert s.response_id is not None
        assert s.response_id.startswith("resp_")


async def test_unpaced_demo_model() -> None:
    level, seen = await run_level(3, scenario="stream", tokens_per_second=0.0)
    check_common(level, seen, "stream", 3, paced=False)


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_tool(concurrency: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pids: list[int] = []
    on_process = _embedded._Level.on_process

    def recording(self: Any, pid: int) -> None:
        pids.append(pid)
        on_process(self, pid)

    monkeypatch.setattr(_embedded._Level, "on_process", recording)
    level, seen = await run_level(concurrency, scenario="tool")
    check_common(level, seen, "tool", concurrency)
    assert len(pids) == TURNS
    for s in level.samples:
        assert s.terminal == "message.cancelled"
        assert s.group_gone_ms is not None
        assert s.group_gone_ms >= 0
    for pid in pids:
        # No process of the group runs (an orphaned zombie may wait for PID 1).
        assert live_group_members(pid) == []


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_delete(concurrency: int) -> None:
    level, seen = await run_level(concurrency, scenario="delete")
    check_common(level, seen, "delete", concurrency)
    for s in level.samples:
        assert s.terminal == "message.cancelled"  # reason session_deleted, else an error
        assert s.workspace_gone is True


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_upstream(concurrency: int) -> None:
    level, seen = await run_level(concurrency, scenario="upstream")
    check_common(level, seen, "upstream", concurrency)
    for s in level.samples:
        assert s.terminal == "message.cancelled"
        assert s.upstream_closed_ms is not None
        assert s.upstream_closed_ms >= 0
        assert s.upstream_tokens_after_ack is not None
        assert s.upstream_tokens_after_ack >= 0


async def test_a_turn_that_completes_is_an_error_and_billed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A turn that ends before its cancel comes is a failed sample, and the
    billing check sees that it was charged."""
    monkeypatch.setattr(_embedded, "STREAM_PROMPT", "Write a 5-word essay on nothing")
    seen: list[TurnSample] = []
    opts = CancelOptions(target="embedded", turns=3, tokens_per_second=0.0)
    with trio.fail_after(TIMEOUT):
        level = await run_embedded_level(opts, 2, seen.append)
    assert len(level.samples) == 3
    for s in level.samples:
        assert not s.ok
        assert s.billed is True
        assert s.terminal == "message.completed"
        assert s.error is not None
        assert "before it was cancelled" in s.error
        assert s.t_cancel is None
        assert s.stop_ms is None


async def test_a_timeout_is_an_error_and_the_level_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wait that never ends (here: the tool's pid is never reported) times
    out into the sample's error; the turn is stopped and the lane goes on."""
    monkeypatch.setattr(_embedded, "TURN_TIMEOUT", 0.3)
    monkeypatch.setattr(_embedded._Level, "on_process", lambda self, pid: None)
    seen: list[TurnSample] = []
    opts = CancelOptions(target="embedded", scenario="tool", turns=2, tokens_per_second=0.0)
    with trio.fail_after(TIMEOUT):
        level = await run_embedded_level(opts, 1, seen.append)
    assert len(seen) == len(level.samples) == 2
    for s in level.samples:
        assert s.error is not None
        assert "timed out" in s.error
        assert "process to start" in s.error
        assert s.billed is False
        assert not s.ok


async def test_stateless_tool_is_refused() -> None:
    opts = CancelOptions(target="embedded", scenario="tool", stateless=True, turns=1)
    with pytest.raises(ValueError, match="session"):
        await run_embedded_level(opts, 1, lambda _: None)


def test_tags() -> None:
    assert bench_tag("Write an essay [bench ab-c1-0]") == "ab-c1-0"
    assert bench_tag("no tag here") is None
    request = {
        "json": {
            "messages": [
                {"role": "user", "content": "old [bench old]"},
                {"role": "assistant", "content": "..."},
                {"role": "user", "content": [{"type": "text", "text": "new [bench new]"}]},
            ]
        }
    }
    assert request_tag(request) == "new"
    assert request_tag({"json": None}) is None


def live_children() -> list[tuple[psutil.Process, list[str]]]:
    """Our live descendants and their command lines (not zombies: when this
    process is a subreaper, an earlier test's orphans may be ours)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append((child, child.cmdline()))
    return found


async def test_serve_with_fake_upstream(tmp_path: Path) -> None:
    """A real server subprocess on the fake: a streamed stateless turn
    cancelled over HTTP is seen closed by the fake, with clocks that agree
    across processes; on exit nothing of the server is left."""
    with trio.fail_after(TIMEOUT):
        async with serve_with_fake_upstream(200.0, data_dir=tmp_path / "data") as (url, key, up):
            live = live_children()
            assert any("serve" in cmdline for _, cmdline in live)
            children = [child for child, _ in live]
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {key}"}
            ) as client:
                assert (await client.get("/health")).status_code == 200
                t_cancel = t_ack = None
                deltas = 0
                async with client.stream(
                    "POST", "/v1/responses", json={"input": "hi [bench t1]", "stream": True}
                ) as response:
                    assert response.status_code == 200
                    rid = response.headers["X-Response-Id"]
                    async for line in response.aiter_lines():
                        if line.startswith("event: response.output_text.delta"):
                            deltas += 1
                            if deltas == 5:
                                t_cancel = time.perf_counter()
                                cancelled = await client.post(f"/v1/responses/{rid}/cancel")
                                t_ack = time.perf_counter()
                                assert cancelled.status_code == 202, cancelled.text
            assert t_cancel is not None
            sample = TurnSample(
                scenario="upstream", concurrency=1, tag="t1", t_cancel=t_cancel, t_ack=t_ack
            )
            await wait_upstream_closed(up, [sample])
            [measured] = upstream_metrics(up, [sample], current_clock_offset())
            assert measured.error is None, measured
            assert measured.upstream_closed_ms is not None
            assert 0 <= measured.upstream_closed_ms < 5000
            assert measured.upstream_tokens_after_ack is not None
            [i] = [i for i, r in enumerate(up.requests) if request_tag(r) == "t1"]
            assert len(up.chunk_times[i]) == up.chunks_sent[i] >= 5
            assert up.chunk_times[i] == sorted(up.chunk_times[i])
        assert children
        for child in children:
            assert not child.is_running(), child


async def test_serve_with_fake_upstream_reports_a_failed_start(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with trio.fail_after(TIMEOUT), pytest.raises(RuntimeError, match="exited before it was ready"):
        async with serve_with_fake_upstream(50.0, data_dir=not_a_dir):
            pytest.fail("the server cannot have started")

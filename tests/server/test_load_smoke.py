"""The load benchmark (``benchmarks/load.py``, :mod:`bench._load`) at reduced counts.

It runs the real scenario (``agent-runtime serve`` subprocesses, client worker
processes on raw sockets) and asserts correctness only: every idle stream was
opened and held, and every streaming turn completed with contiguous ids, one
terminal event and every word delivered (the workers check each event and
count any deviation as an error). Latency and memory are the benchmark's to
report, never a test's to assert (the machine is shared).
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from bench._load import LoadOptions, run_load
from server._app import FlushTicker

IDLE_STREAMS = 300
STREAMS = 100
TOKENS_PER_SECOND = 20.0
DURATION = 5.0
CAPACITY_STREAMS = 10


@pytest.mark.slow
async def test_load_scenario_delivers_every_event_without_errors() -> None:
    """300 idle streams held, then 100 turns at 20 tokens/s for 5 s, then a
    capacity phase of 10 turns for 1 s: no error, every stream complete and in
    order."""
    options = LoadOptions(
        idle_streams=IDLE_STREAMS,
        streams=STREAMS,
        tokens_per_second=TOKENS_PER_SECOND,
        duration=DURATION,
        health_seconds=1.0,
        capacity_streams=(CAPACITY_STREAMS,),
        capacity_duration=1.0,
    )
    with trio.fail_after(150):
        doc = await run_load(options)
    idle, stream = doc["idle"], doc["stream"]
    assert idle["error_kinds"] == {}
    assert idle["held"] == IDLE_STREAMS
    assert idle["health_samples"] > 0
    assert idle["rss_per_stream_kb"] is not None
    words = round(TOKENS_PER_SECOND * DURATION)
    assert stream["error_kinds"] == {}
    assert stream["completed"] == STREAMS
    assert stream["deltas"] == stream["deltas_expected"] == STREAMS * words
    # Per stream: created, in_progress, output item and part added, the deltas,
    # then done events and the completion; at least the deltas and a terminal.
    assert stream["events"] >= STREAMS * (words + 1)
    assert stream["lag_ms"]["p50"] is not None
    assert stream["due_lag_ms"]["p50"] is not None
    # The capacity phase: another server, 10 streams of 20 words, judged alone.
    [capacity] = doc["capacity"]
    assert capacity["streams"] == capacity["completed"] == CAPACITY_STREAMS
    assert capacity["deltas"] == capacity["deltas_expected"] == CAPACITY_STREAMS * 20
    assert capacity["error_kinds"] == {}
    assert isinstance(capacity["lag_target_met"], bool)
    assert [t["name"] for t in doc["targets"]][-1].startswith(f"{STREAMS} streams")


async def test_flush_ticker_paces_writers_only_when_the_loop_lags() -> None:
    """Unloaded, ``wait_flush`` returns at once; once the loop has woken its
    timer late (a task blocking it), writers wait for the next shared tick."""
    flush = FlushTicker(interval=0.02, lag=0.005)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush.run)
        with trio.fail_after(10):
            start = trio.current_time()
            for _ in range(100):
                await flush.wait_flush()
            assert trio.current_time() - start < 0.02  # no tick waited for
            while not flush.loaded:
                time.sleep(0.03)  # noqa: ASYNC251 - block the loop on purpose: the ticker wakes late
                await trio.sleep(0.02)
            start = trio.current_time()
            await flush.wait_flush()
            waited = trio.current_time() - start
        assert waited > 0
        nursery.cancel_scope.cancel()


async def test_flush_ticker_release_wakes_waiting_writers() -> None:
    """A writer waiting for the tick under load is woken by ``release`` (what a
    cancel does), without waiting for the ticker."""
    flush = FlushTicker(late=1.0)  # loaded, and no ticker running: only release wakes
    woke: list[bool] = []

    async def writer() -> None:
        await flush.wait_flush()
        woke.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        flush.release()
    assert woke == [True]

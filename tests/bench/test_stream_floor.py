"""The stream floor benchmark (``benchmarks/stream_floor.py``, :mod:`bench._floor`), tiny counts.

Real sockets and real client processes, so the real clock under ``fail_after``
guards. Correctness only: every server and config measured, every frame and
event the server sent counted by the client, every client process reaped.
The costs themselves are the benchmark's to report (the machine is shared).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import trio

from bench._floor import SCHEMA, SERVERS, stream_floor, write_cost

if TYPE_CHECKING:
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    """No process ``pid`` (or only a zombie that is not our child)."""
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return bool(process.status() == psutil.STATUS_ZOMBIE and process.ppid() != psutil.Process().pid)


def _floor_clients() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "bench._floor" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.mark.parametrize("server", SERVERS)
async def test_write_cost_counts_every_write_on_every_server(server: str) -> None:
    """3 connections: the client counts exactly the frames written, all
    responses are 200s, and the client process is gone afterwards."""
    with trio.fail_after(60):
        cost = await write_cost(server, 3, 31)
    assert (cost.server, cost.connections) == (server, 3)
    assert cost.writes == 30  # 10 per connection
    assert cost.delivered == cost.writes
    assert cost.bad_responses == 0
    assert cost.server_cpu_seconds > 0
    assert cost.us_per_write > 0
    assert _gone(cost.client_pid)


@pytest.mark.parametrize(
    ("pacer", "tick", "phases"), [("shared", 0.05, "aligned"), ("trio", 0.0, "spread")]
)
async def test_stream_floor_delivers_every_event(pacer: str, tick: float, phases: str) -> None:
    """4 streams x 5 events: every event reaches the client with a lag
    sample, and its process is gone afterwards."""
    with trio.fail_after(60):
        run = await stream_floor(4, 25.0, 0.2, tick=tick, pacer=pacer, phases=phases)
    assert (run.pacer, run.tick, run.phases, run.streams) == (pacer, tick, phases, 4)
    assert run.events_expected == run.events_delivered == 4 * 5
    assert run.reads >= 4
    assert run.deltas_per_read >= 1
    assert run.lag_ms["p99"] is not None
    assert run.due_lag_ms["p99"] is not None
    assert run.model_late_ms["p99"] is not None
    assert _gone(run.client_pid)


async def test_stream_floor_cancelled_leaves_no_client() -> None:
    """Cancelled mid-run: the client is killed and reaped, no socket left."""
    fds = len(psutil.Process().open_files()) + psutil.Process().num_fds()
    with trio.fail_after(60):
        with trio.move_on_after(0.5) as scope:
            await stream_floor(4, 20.0, 30.0, tick=0.05, pacer="shared")
    assert scope.cancelled_caught
    assert _floor_clients() == []
    assert len(psutil.Process().open_files()) + psutil.Process().num_fds() == fds


async def test_floor_arguments_are_checked() -> None:
    """Nonsense arguments raise ValueError before any process starts."""
    with pytest.raises(ValueError, match="server must be"):
        await write_cost("nginx", 1, 10)
    with pytest.raises(ValueError, match="cannot be spread"):
        await write_cost("trio", 10, 5)
    with pytest.raises(ValueError, match="pacer must be"):
        await stream_floor(1, 20.0, 1.0, tick=0.1, pacer="asyncio")
    with pytest.raises(ValueError, match="phases must be"):
        await stream_floor(1, 20.0, 1.0, tick=0.1, pacer="trio", phases="random")
    with pytest.raises(ValueError, match="nothing to measure"):
        await stream_floor(1, 20.0, 0.01, tick=0.1, pacer="shared")
    assert _floor_clients() == []


def _cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "stream_floor_cli", ROOT / "benchmarks" / "stream_floor.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script end to end at tiny counts (one connection): exit 0, both
    tables printed, the JSON document has a row per server x connections and
    per config."""
    out = tmp_path / "floor.json"
    argv = [
        *("--writes", "12", "--connections", "1", "--servers", "trio,quart"),
        *("--streams", "3", "--tokens-per-second", "20", "--duration", "0.2"),
        *("--configs", "shared:0", "--json", str(out)),
    ]
    assert _cli().main(argv) == 0
    printed = capsys.readouterr().out
    assert "Server CPU per write" in printed
    assert "Stream floor" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA
    assert [(c["server"], c["connections"]) for c in doc["write_cost"]] == [
        ("trio", 1),
        ("quart", 1),
    ]
    assert all(c["delivered"] == c["writes"] == 12 for c in doc["write_cost"])
    assert [(r["pacer"], r["tick"], r["phases"]) for r in doc["stream_floor"]] == [
        ("shared", 0, "spread")
    ]
    assert all(r["events_delivered"] == r["events_expected"] == 12 for r in doc["stream_floor"])
    assert len(doc["targets"]) == 1
    assert doc["machine"]["cores"] is not None
    assert all(_gone(row["client_pid"]) for row in doc["write_cost"] + doc["stream_floor"])

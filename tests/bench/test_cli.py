"""``agent-runtime bench`` end to end, as a user runs it: a subprocess writing
JSON and a PNG, at small sizes, embedded and against a server started here."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Final

import trio

from bench._report import load_json
from bench._samples import SCHEMA

from ..server.served import KEY, MAIN, run_server

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

PNG: Final = b"\x89PNG\r\n\x1a\n"


async def bench(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``agent-runtime bench ARGS`` to its end (bounded)."""
    with trio.fail_after(120):
        return await trio.run_process(
            [sys.executable, "-c", MAIN, "bench", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def check_run(path: Path, *, scenario: str, target: str, levels: list[int]) -> dict[str, Any]:
    """The JSON a run wrote: its schema, levels, and every turn cancelled unbilled."""
    doc = load_json(path)
    assert doc["schema"] == SCHEMA
    assert (doc["options"]["scenario"], doc["options"]["target"]) == (scenario, target)
    assert "api_key" not in doc["options"]
    assert [level["concurrency"] for level in doc["levels"]] == levels
    for level in doc["levels"]:
        assert level["counts"]["turns"] == 5
        assert level["counts"]["ok"] == 5, level["samples"]
        assert level["counts"]["billed_cancelled"] == 0
        assert level["summary"]["stop_ms"]["count"] == 5
        for sample in level["samples"]:
            assert sample["terminal"].endswith(".cancelled")
            assert sample["billed"] is False
    json.dumps(doc, allow_nan=False)
    return doc


async def test_bench_cancel_embedded_writes_json_and_plot(tmp_path: Path) -> None:
    """bench cancel --embedded --turns 5: exit 0, a valid JSON document and a PNG."""
    out, png = tmp_path / "embedded.json", tmp_path / "embedded.png"
    done = await bench(
        "cancel", "--embedded", "--concurrency", "1,3", "--turns", "5",
        "--tokens-per-second", "500", "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    check_run(out, scenario="stream", target="embedded", levels=[1, 3])
    assert png.read_bytes().startswith(PNG)
    assert b"stop" in done.stdout


async def test_bench_cancel_url_against_a_server_and_compare(tmp_path: Path) -> None:
    """bench cancel --url against `agent-runtime serve` (stream and delete), then
    bench compare of the two results."""
    async with run_server(tmp_path, "--demo-tokens-per-second", "500") as served:
        stream, delete = tmp_path / "stream.json", tmp_path / "delete.json"
        for scenario, out in (("stream", stream), ("delete", delete)):
            done = await bench(
                "cancel", "--url", served.url, "--api-key", KEY, "--scenario", scenario,
                "--concurrency", "1,2", "--turns", "5", "--json", str(out),
                "--plot", str(tmp_path / f"{scenario}.png"),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
            check_run(out, scenario=scenario, target="http", levels=[1, 2])
        doc = load_json(stream)
        for level in doc["levels"]:
            assert level["summary"]["headers_ms"]["count"] == 5
            assert level["summary"]["ack_ms"]["count"] == 5
            assert level["client_cpu_percent"]
        compared = await bench("compare", str(stream), str(delete))
    assert compared.returncode == 0, compared.stderr.decode()
    assert b"x" in compared.stdout  # ratios


async def test_bench_cancel_refuses_bad_arguments(tmp_path: Path) -> None:
    """Bad arguments are exit 2 with a message, before anything runs."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": "something else"}')
    runs: dict[tuple[str, ...], subprocess.CompletedProcess[bytes]] = {}

    async def run(args: tuple[str, ...]) -> None:
        runs[args] = await bench(*args)

    async with trio.open_nursery() as nursery:  # each is an interpreter start: at once
        bad: list[tuple[str, ...]] = [
            ("cancel",),  # no target
            ("cancel", "--url", "http://127.0.0.1:1"),  # no key
            ("cancel", "--embedded", "--cancel-at", "soon"),
            ("cancel", "--embedded", "--concurrency", "0"),
            ("cancel", "--url", "http://127.0.0.1:1", "--api-key", "k", "--scenario", "upstream"),
            ("compare", str(broken), str(broken)),
        ]
        for args in bad:
            nursery.start_soon(run, args)
    for args, done in runs.items():
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr or done.stdout


async def test_bench_cancel_late_cancel_outlives_keep_alive(tmp_path: Path) -> None:
    """A cancel later than the server's keep-alive timeout (hypercorn: 5 s) still
    lands: the idle control connection is replaced before the cancel is timed."""
    async with run_server(tmp_path, "--demo-tokens-per-second", "50") as served:
        out = tmp_path / "late.json"
        done = await bench(
            "cancel", "--url", served.url, "--api-key", KEY, "--stateless",
            "--concurrency", "1", "--turns", "1", "--cancel-at", "5.5", "--json", str(out),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    [level] = load_json(out)["levels"]
    assert level["counts"]["ok"] == 1, level["samples"]

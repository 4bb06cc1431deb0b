"""``bench cancel``'s JSON document (schema pinned), tables, plot and comparison."""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING, Any, Final

import pytest
from rich.console import Console

from bench._report import (
    compare,
    format_count,
    format_ms,
    load_json,
    plot,
    print_report,
    to_json,
    write_json,
)
from bench._samples import SCHEMA, CancelOptions, CancelResult, LevelResult, TurnSample

if TYPE_CHECKING:
    from pathlib import Path

MACHINE: Final = {"cores": 2, "python": "3.11.7", "versions": {"trio": "0.30"}, "git_commit": "abc"}

# The pinned shape of the document: change SCHEMA when one of these changes.
TOP_KEYS: Final = {"schema", "kind", "started_at", "machine", "options", "levels", "targets"}
OPTION_KEYS: Final = {
    "target",
    "scenario",
    "concurrency",
    "turns",
    "tokens_per_second",
    "cancel_at",
    "stateless",
    "seed",
    "url",
    "processes",
}
LEVEL_KEYS: Final = {
    "concurrency",
    "wall_seconds",
    "client_cpu_percent",
    "warnings",
    "counts",
    "summary",
    "samples",
}
COUNT_KEYS: Final = {"turns", "ok", "errors", "billed_cancelled", "terminals"}
SUMMARY_KEYS: Final = {
    "headers_ms",
    "first_event_ms",
    "ack_ms",
    "stop_ms",
    "group_gone_ms",
    "upstream_closed_ms",
    "deltas_after_ack",
    "upstream_tokens_after_ack",
}
STAT_KEYS: Final = {"count", "p50", "p90", "p99", "max", "mean"}
SAMPLE_KEYS: Final = {
    "scenario",
    "concurrency",
    "response_id",
    "headers_ms",
    "first_event_ms",
    "ack_ms",
    "stop_ms",
    "group_gone_ms",
    "upstream_closed_ms",
    "upstream_tokens_after_ack",
    "deltas_after_ack",
    "terminal",
    "billed",
    "workspace_gone",
    "error",
    "tag",
    "t_cancel",
    "t_ack",
}
TARGET_KEYS: Final = {"name", "metric", "concurrency", "limit_ms", "value", "met"}


def sample(concurrency: int, stop_ms: float, **kwargs: Any) -> TurnSample:
    fields: dict[str, Any] = {
        "scenario": "stream",
        "response_id": f"resp_{concurrency}_{stop_ms}",
        "headers_ms": 0.5,
        "first_event_ms": 2.0,
        "ack_ms": 0.25,
        "deltas_after_ack": 1,
        "terminal": "response.cancelled",
        "billed": False,
        "t_cancel": 100.0,
        "t_ack": 100.001,
    }
    fields.update(kwargs)
    return TurnSample(concurrency=concurrency, stop_ms=stop_ms, **fields)


def level(concurrency: int, stops: list[float], *extra: TurnSample, **kwargs: Any) -> LevelResult:
    samples = tuple(sample(concurrency, stop) for stop in stops) + extra
    return LevelResult(concurrency=concurrency, samples=samples, wall_seconds=1.5, **kwargs)


def result(*levels: LevelResult, **options: Any) -> CancelResult:
    opts: dict[str, Any] = {"target": "http", "concurrency": tuple(lv.concurrency for lv in levels)}
    opts.update(options)
    return CancelResult(
        options=CancelOptions(**opts), levels=levels, machine=MACHINE, started_at=1_700_000_000.0
    )


def http_result() -> CancelResult:
    """20 concurrent meets its stop target, 100 misses it; one billed cancelled turn."""
    return result(
        level(
            20,
            [float(i) for i in range(1, 11)],  # stop 1..10 ms: p99 9.91 > 5
            sample(20, 1000.0, error="no terminal event within 10 s"),
            sample(20, 2.0, billed=True),
            sample(20, 3.0, terminal="response.completed", billed=True),
            client_cpu_percent=(42.0,),
            warnings=("the client used 97% of a core: it may be the bottleneck",),
        ),
        level(100, [1.0, 2.0, 3.0, 4.0]),  # p99 3.97 <= 10
        url="http://bench:s3cret@localhost:8000",
        api_key="sk-secret-key",
    )


# --- JSON ---------------------------------------------------------------------


def test_json_schema_is_pinned() -> None:
    doc = to_json(http_result())
    assert doc["schema"] == SCHEMA == "agent-runtime.bench.cancel/1"
    assert doc["kind"] == "cancel"
    assert set(doc) == TOP_KEYS
    assert doc["machine"] == MACHINE
    assert doc["started_at"] == 1_700_000_000.0
    assert set(doc["options"]) == OPTION_KEYS
    assert doc["options"]["cancel_at"] == "20e"
    assert doc["options"]["concurrency"] == [20, 100]
    assert [lv["concurrency"] for lv in doc["levels"]] == [20, 100]
    for lv in doc["levels"]:
        assert set(lv) == LEVEL_KEYS
        assert set(lv["counts"]) == COUNT_KEYS
        assert set(lv["summary"]) == SUMMARY_KEYS
        for stats in lv["summary"].values():
            assert stats is None or set(stats) == STAT_KEYS
        assert lv["samples"]
        for s in lv["samples"]:
            assert set(s) == SAMPLE_KEYS
    assert doc["targets"]
    for target in doc["targets"]:
        assert set(target) == TARGET_KEYS
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc


def test_json_has_no_secrets() -> None:
    doc = to_json(http_result())
    text = json.dumps(doc)
    assert "sk-secret-key" not in text
    assert "s3cret" not in text
    assert doc["options"]["url"] == "http://bench:***@localhost:8000"


def test_json_counts_and_summaries() -> None:
    lv20, lv100 = to_json(http_result())["levels"]
    assert lv20["counts"] == {
        "turns": 13,
        "ok": 10,
        "errors": 1,
        "billed_cancelled": 1,  # the completed turn was rightly billed
        "terminals": {"response.cancelled": 12, "response.completed": 1},
    }
    assert lv20["wall_seconds"] == 1.5
    assert lv20["client_cpu_percent"] == [42.0]
    assert lv20["warnings"] == ["the client used 97% of a core: it may be the bottleneck"]
    stop = lv20["summary"]["stop_ms"]
    # 12 samples without an error: 1..10, 2, 3 (the error's 1000 ms is left out)
    assert stop["count"] == 12
    assert stop["max"] == 10.0
    assert stop["p50"] == pytest.approx(4.5)  # sorted 1 2 2 3 3 4 5 6 7 8 9 10, index 5.5
    assert stop["mean"] == pytest.approx(60 / 12)
    assert lv20["summary"]["group_gone_ms"] is None
    assert lv20["summary"]["upstream_tokens_after_ack"] is None
    assert lv20["summary"]["deltas_after_ack"]["p99"] == 1.0
    assert lv100["counts"]["billed_cancelled"] == 0
    assert lv100["summary"]["stop_ms"]["p99"] == pytest.approx(3.97)


def targets_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in doc["targets"]}


def test_http_targets_met_and_missed() -> None:
    targets = targets_by_name(to_json(http_result()))
    assert list(targets) == [
        "HTTP stop p99 <= 5 ms at 20 concurrent",
        "HTTP stop p99 <= 10 ms at 100 concurrent",
        "HTTP first event p99 <= 10 ms",
        "0 billed cancelled turns",
    ]
    at20 = targets["HTTP stop p99 <= 5 ms at 20 concurrent"]
    assert at20["metric"] == "stop_ms"
    assert at20["concurrency"] == 20
    assert at20["limit_ms"] == 5.0
    assert at20["value"] == pytest.approx(9.89)  # index 10.89 of 12: 9 + 0.89
    assert at20["met"] is False
    at100 = targets["HTTP stop p99 <= 10 ms at 100 concurrent"]
    assert (at100["value"], at100["met"]) == (pytest.approx(3.97), True)
    first = targets["HTTP first event p99 <= 10 ms"]
    assert (first["concurrency"], first["value"], first["met"]) == (None, 2.0, True)
    billed = targets["0 billed cancelled turns"]
    assert (billed["metric"], billed["value"], billed["met"]) == ("billed_cancelled", 1, False)


def test_targets_of_levels_not_run_are_left_out() -> None:
    doc = to_json(result(level(1, [1.0]), level(50, [2.0])))
    assert [t["name"] for t in doc["targets"]] == [
        "HTTP first event p99 <= 10 ms",
        "0 billed cancelled turns",
    ]
    assert all(t["met"] for t in doc["targets"])


def test_embedded_tool_and_upstream_targets() -> None:
    embedded = to_json(result(level(1, [0.05, 0.1]), level(100, [0.3]), target="embedded"))
    stop = targets_by_name(embedded)["embedded stop p99 <= 0.2 ms"]
    assert (stop["concurrency"], stop["value"], stop["met"]) == (None, 0.3, False)  # worst level

    tool = to_json(
        result(
            LevelResult(
                concurrency=1,
                samples=(sample(1, 5.0, group_gone_ms=40.0), sample(1, 5.0, group_gone_ms=60.0)),
                wall_seconds=1.0,
            ),
            scenario="tool",
        )
    )
    gone = targets_by_name(tool)["tool group gone p99 <= 100 ms"]
    assert (gone["value"], gone["met"]) == (pytest.approx(59.8), True)
    assert "HTTP first event p99 <= 10 ms" not in targets_by_name(tool)

    upstream = to_json(
        result(
            LevelResult(
                concurrency=20,
                samples=(sample(20, 1.0, upstream_closed_ms=80.0, upstream_tokens_after_ack=3),),
                wall_seconds=1.0,
            ),
            scenario="upstream",
        )
    )
    by_name = targets_by_name(upstream)
    closed = by_name["upstream closed p99 <= 50 ms"]
    assert (closed["value"], closed["met"]) == (80.0, False)
    assert "HTTP stop p99 <= 5 ms at 20 concurrent" in by_name
    assert upstream["levels"][0]["summary"]["upstream_tokens_after_ack"]["max"] == 3.0


def test_unobserved_targets_have_no_value() -> None:
    # A remote server's process groups and an unread ledger: nothing measured.
    doc = to_json(result(level(1, [5.0]), scenario="tool"))
    assert doc["levels"][0]["summary"]["group_gone_ms"] is None
    unbilled = to_json(
        result(
            LevelResult(concurrency=1, samples=(sample(1, 1.0, billed=None),), wall_seconds=1.0),
            scenario="tool",
        )
    )
    for name, target in [
        *[(t["name"], t) for t in doc["targets"] if t["metric"] == "group_gone_ms"],
        *[(t["name"], t) for t in unbilled["targets"] if t["metric"] == "billed_cancelled"],
    ]:
        assert (target["value"], target["met"]) == (None, None), name


def test_write_and_load_json(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    doc = write_json(path, http_result())
    assert load_json(path) == doc
    assert json.loads(path.read_text()) == doc


def test_load_json_refuses_other_documents(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    for content in (
        json.dumps({"schema": "agent-runtime.bench.cancel/0", "kind": "cancel", "levels": []}),
        json.dumps({"levels": []}),
        json.dumps([1, 2]),
    ):
        path.write_text(content)
        with pytest.raises(
            ValueError, match=r"schema .* expected 'agent-runtime\.bench\.cancel/1'"
        ):
            load_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_json(path)
    path.write_text(json.dumps({"schema": SCHEMA, "kind": "cancel"}))
    with pytest.raises(ValueError, match="malformed"):
        load_json(path)


# --- formatting and tables -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0.0, "0 ms"),
        (0.0523, "52.3 µs"),
        (0.2, "200.0 µs"),
        (4.12345, "4.123 ms"),
        (1234.5, "1234.500 ms"),
        (12_500.0, "12.500 s"),
    ],
)
def test_format_ms(value: float | None, text: str) -> None:
    assert format_ms(value) == text


def test_format_count() -> None:
    assert [format_count(v) for v in (None, 3.0, 3, 3.6, 2.125)] == ["-", "3", "3", "3.6", "2.12"]


def render(draw: Any, *args: Any) -> tuple[str, str]:
    """What ``draw(*args, console)`` prints: plain text, and with ANSI styles."""
    console = Console(record=True, width=200, force_terminal=True, color_system="standard")
    draw(*args, console)
    styled = console.export_text(clear=False, styles=True)
    return console.export_text(), styled


def test_print_report() -> None:
    text, styled = render(print_report, to_json(http_result()))
    assert "http / stream" in text
    assert "http://bench:***@localhost:8000" in text
    assert "commit abc" in text
    for label in ("headers", "first event", "ack", "stop", "deltas after ack"):
        assert label in text
    assert "group gone" not in text  # no data, no row
    assert "9.890 ms" in text  # stop p99 at 20
    assert "10.000 ms" in text  # stop max at 20
    assert "3.970 ms" in text  # stop p99 at 100
    assert "500.0 µs" in text  # headers
    assert "250.0 µs" in text  # ack
    assert "billed cancelled" in text
    assert "42%" in text
    assert "it may be the bottleneck" in text
    assert "no terminal event within 10 s" in text
    assert "response.completed 1" in text
    assert "missed" in text
    assert "met" in text
    assert "HTTP stop p99 <= 10 ms at 100 concurrent" in text
    assert "\x1b[1;31mmissed" in styled
    assert "\x1b[32mmet" in styled
    assert "\x1b[31m9.890 ms" in styled  # stop p99 at 20 over its target
    assert "\x1b[32m3.970 ms" in styled  # stop p99 at 100 within its target
    assert re.search(r"\x1b\[1;31m *1\x1b\[0m", styled)  # the billed cancelled count


def test_print_report_in_microseconds_and_empty() -> None:
    text, _ = render(print_report, to_json(result(level(1, [0.05, 0.1]), target="embedded")))
    assert "99.5 µs" in text  # p99 of 50 and 100 µs
    assert "embedded stop p99 <= 0.2 ms" in text
    assert "200.0 µs" in text  # its limit
    text, _ = render(print_report, to_json(result(target="embedded")))
    assert "no concurrency level was measured" in text


# --- plot ------------------------------------------------------------------------


PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pyplot_before = "matplotlib.pyplot" in sys.modules
    path = tmp_path / "out.png"
    plot(to_json(http_result()), path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules


def test_plot_without_samples(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    errors_only = result(level(1, [], sample(1, 1.0, error="boom")))
    plot(to_json(errors_only), str(path))
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# --- compare -----------------------------------------------------------------------


def test_compare_prints_ratios() -> None:
    a = to_json(result(level(20, [2.0, 4.0]), level(100, [10.0])))
    b = to_json(result(level(20, [1.0, 2.0]), level(100, [20.0])))
    text, styled = render(compare, a, b)
    assert "x0.50" in text  # 20 concurrent, stop: twice as fast
    assert "x2.00" in text  # 100 concurrent: twice as slow
    assert "x1.00" in text  # first event unchanged
    assert "4.000 → 2.000" in text  # stop max at 20, in ms
    assert "stop (ms)" in text
    assert "500.0 → 500.0" in text  # headers, in µs
    assert "\x1b[32mx0.50" in styled
    assert "\x1b[31mx2.00" in styled
    assert "options differ" not in text


def test_compare_reports_mismatches() -> None:
    a = to_json(result(level(1, [1.0]), level(20, [2.0])))
    tool = result(
        LevelResult(
            concurrency=20, samples=(sample(20, 3.0, group_gone_ms=50.0),), wall_seconds=1.0
        ),
        level(100, [1.0]),
        scenario="tool",
    )
    text, _ = render(compare, a, to_json(tool))
    assert "options differ: scenario 'stream' (a) vs 'tool' (b)" in text
    assert "concurrency 1 only in a" in text
    assert "concurrency 100 only in b" in text
    assert "20 concurrent: group gone only in b" in text
    assert "x1.50" in text  # stop at 20, the level in both

    text, _ = render(compare, {"schema": SCHEMA, "levels": []}, to_json(tool))
    assert "nothing to compare" in text

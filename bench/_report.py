"""What ``bench cancel`` writes and shows: JSON document, tables, plot, comparison.

Everything but :func:`to_json` works from the JSON document (a ``dict`` as
:func:`load_json` returns it), so ``bench compare`` and the RESULTS.md
generator show saved runs exactly as a live run is shown.

The document (``schema`` :data:`bench._samples.SCHEMA`)::

    {"schema": "agent-runtime.bench.cancel/1", "kind": "cancel",
     "started_at": <unix time>, "machine": {...machine_info()...},
     "options": {...CancelOptions without api_key...},
     "levels": [{"concurrency": 20, "wall_seconds": 1.2,
                 "client_cpu_percent": [35.0], "warnings": ["..."],
                 "counts": {"turns": 50, "ok": 50, "errors": 0,
                            "billed_cancelled": 0,
                            "terminals": {"response.cancelled": 50}},
                 "summary": {"stop_ms": {"count": 50, "p50": ..., "p90": ...,
                                         "p99": ..., "max": ..., "mean": ...},
                             "group_gone_ms": null, ...},
                 "samples": [{...TurnSample...}, ...]}],
     "targets": [{"name": "...", "metric": "stop_ms", "concurrency": 20,
                  "limit_ms": 5.0, "value": 3.1, "met": true}]}

Summaries cover the samples without an ``error`` (errors are counted, their
partial timings are not latencies of a cancel); every metric of
:data:`~bench._samples.METRICS` plus ``deltas_after_ack`` and
``upstream_tokens_after_ack`` has a key, ``null`` when no sample has a value.
A billed cancelled turn is a sample with ``billed`` true and a
``*.cancelled`` terminal. A target's ``value`` is the p99 at its
``concurrency`` level (``null``: the worst p99 over all levels), or for
``billed_cancelled`` the number of billed cancelled turns (``limit_ms`` is
then a count, 0); ``value`` and ``met`` are ``null`` when nothing was
measured (e.g. a remote server's process groups).
"""

from __future__ import annotations

import collections
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
from rich.table import Table
from rich.text import Text

from bench._samples import METRICS, SCHEMA, converter, redact_url
from bench._stats import summarize

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from matplotlib.axes import Axes
    from matplotlib.axis import XAxis, YAxis
    from rich.console import Console

    from bench._samples import CancelOptions, CancelResult, LevelResult, TurnSample

#: Count metrics summarized besides the latencies (not milliseconds).
COUNT_METRICS: Final = ("deltas_after_ack", "upstream_tokens_after_ack")
#: Every key of a level's ``summary``, in the order tables show them.
SUMMARY_METRICS: Final = (*METRICS, *COUNT_METRICS)
#: The percentiles tables and comparisons show.
PERCENTILES: Final = ("p50", "p90", "p99", "max")

LABELS: Final = {
    "headers_ms": "headers",
    "first_event_ms": "first event",
    "ack_ms": "ack",
    "stop_ms": "stop",
    "group_gone_ms": "group gone",
    "upstream_closed_ms": "upstream closed",
    "deltas_after_ack": "deltas after ack",
    "upstream_tokens_after_ack": "upstream tokens after ack",
    "billed_cancelled": "billed cancelled turns",
}


# --- JSON -------------------------------------------------------------------


@attrs.frozen
class _Target:
    name: str
    metric: str
    limit_ms: float
    concurrency: int | None = None


def _targets_for(options: CancelOptions) -> list[_Target]:
    """The issue's targets that apply to a run's target and scenario."""
    targets: list[_Target] = []
    if options.target == "http" and options.scenario in ("stream", "delete", "upstream"):
        targets += [
            _Target("HTTP stop p99 <= 5 ms at 20 concurrent", "stop_ms", 5.0, 20),
            _Target("HTTP stop p99 <= 10 ms at 100 concurrent", "stop_ms", 10.0, 100),
            _Target("HTTP first event p99 <= 10 ms", "first_event_ms", 10.0),
        ]
    if options.target == "embedded" and options.scenario == "stream":
        targets.append(_Target("embedded stop p99 <= 0.2 ms", "stop_ms", 0.2))
    if options.scenario == "tool":
        targets.append(_Target("tool group gone p99 <= 100 ms", "group_gone_ms", 100.0))
    if options.scenario == "upstream":
        targets.append(_Target("upstream closed p99 <= 50 ms", "upstream_closed_ms", 50.0))
    targets.append(_Target("0 billed cancelled turns", "billed_cancelled", 0.0))
    return targets


def _is_billed_cancelled(sample: TurnSample) -> bool:
    return (
        sample.billed is True
        and sample.terminal is not None
        and sample.terminal.endswith(".cancelled")
    )


def _values(samples: Iterable[TurnSample], metric: str) -> list[float]:
    """``metric`` of the samples without an error, where it has a value."""
    values: list[float] = []
    for sample in samples:
        if sample.error is None:
            value = getattr(sample, metric)
            if value is not None:
                values.append(float(value))
    return values


def _level_json(level: LevelResult) -> dict[str, Any]:
    samples = level.samples
    terminals = collections.Counter(s.terminal or "none" for s in samples)
    summary: dict[str, Any] = {}
    for metric in SUMMARY_METRICS:
        s = summarize(_values(samples, metric))
        summary[metric] = None if s is None else attrs.asdict(s)
    return {
        "concurrency": level.concurrency,
        "wall_seconds": level.wall_seconds,
        "client_cpu_percent": list(level.client_cpu_percent),
        "warnings": list(level.warnings),
        "counts": {
            "turns": len(samples),
            "ok": sum(s.ok for s in samples),
            "errors": sum(s.error is not None for s in samples),
            "billed_cancelled": sum(_is_billed_cancelled(s) for s in samples),
            "terminals": dict(sorted(terminals.items())),
        },
        "summary": summary,
        "samples": [converter.unstructure(s) for s in samples],
    }


def _target_json(
    target: _Target, result: CancelResult, levels: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    value: float | None
    if target.metric == "billed_cancelled":
        observed = any(s.billed is not None for level in result.levels for s in level.samples)
        value = sum(level["counts"]["billed_cancelled"] for level in levels) if observed else None
    else:
        p99s = [
            level["summary"][target.metric]["p99"]
            for level in levels
            if target.concurrency in (None, level["concurrency"])
            and level["summary"][target.metric] is not None
        ]
        value = max(p99s) if p99s else None
    return {
        "name": target.name,
        "metric": target.metric,
        "concurrency": target.concurrency,
        "limit_ms": target.limit_ms,
        "value": value,
        "met": None if value is None else value <= target.limit_ms,
    }


def to_json(result: CancelResult) -> dict[str, Any]:
    """The JSON document of a run (see the module docstring); no API key in it."""
    options: dict[str, Any] = converter.unstructure(result.options)
    options.pop("api_key", None)
    options["url"] = redact_url(options.get("url"))
    levels = [_level_json(level) for level in result.levels]
    measured = {level.concurrency for level in result.levels}
    targets = [
        _target_json(target, result, levels)
        for target in _targets_for(result.options)
        if target.concurrency is None or target.concurrency in measured
    ]
    return {
        "schema": SCHEMA,
        "kind": "cancel",
        "started_at": result.started_at,
        "machine": result.machine,
        "options": options,
        "levels": levels,
        "targets": targets,
    }


def write_json(path: str | Path, result: CancelResult) -> dict[str, Any]:
    """Write :func:`to_json` of ``result`` to ``path`` (strict JSON); return the document."""
    doc = to_json(result)
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return doc


def load_json(path: str | Path) -> dict[str, Any]:
    """A document :func:`write_json` wrote; :class:`ValueError` if ``path`` holds anything else."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    found = doc.get("schema") if isinstance(doc, dict) else None
    if found != SCHEMA:
        raise ValueError(
            f"{path}: not a result of 'agent-runtime bench cancel' of this version "
            f"(schema {found!r}, expected {SCHEMA!r})"
        )
    assert isinstance(doc, dict)
    if doc.get("kind") != "cancel" or not isinstance(doc.get("levels"), list):
        raise ValueError(f"{path}: malformed bench cancel result (no 'kind' or 'levels')")
    return doc


# --- formatting -------------------------------------------------------------


def format_ms(value: float | None) -> str:
    """Milliseconds, readably: ``52.3 µs``, ``4.125 ms``, ``12.500 s``; ``-`` for none."""
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude == 0:
        return "0 ms"
    if magnitude < 1:
        return f"{value * 1000:.1f} µs"
    if magnitude < 10_000:
        return f"{value:.3f} ms"
    return f"{value / 1000:.3f} s"


def format_count(value: float | None) -> str:
    """A count or a percentile of counts: ``3``, ``3.6``; ``-`` for none."""
    if value is None:
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_value(metric: str, value: float | None) -> str:
    """``value`` of ``metric`` in its unit (milliseconds for ``*_ms``, else a count)."""
    return format_ms(value) if metric.endswith("_ms") else format_count(value)


def _label(metric: str) -> str:
    return LABELS.get(metric, metric)


def _describe(doc: dict[str, Any]) -> str:
    """One line: target, scenario, options, when, where."""
    options: dict[str, Any] = doc.get("options") or {}
    machine: dict[str, Any] = doc.get("machine") or {}
    parts = [f"{options.get('target', '?')} / {options.get('scenario', '?')}"]
    if options.get("url"):
        parts.append(str(options["url"]))
    parts.append(f"cancel at {options.get('cancel_at', '?')}")
    if options.get("tokens_per_second") is not None:
        parts.append(f"{options['tokens_per_second']:g} tokens/s")
    if options.get("turns") is not None:
        parts.append(f"{options['turns']} turns/level")
    if options.get("stateless"):
        parts.append("stateless")
    started = doc.get("started_at")
    if isinstance(started, int | float):
        parts.append(time.strftime("%Y-%m-%d %H:%M", time.localtime(started)))
    if machine.get("cores") is not None:
        parts.append(f"{machine['cores']} cores")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if machine.get("git_commit"):
        parts.append(f"commit {str(machine['git_commit'])[:10]}")
    return ", ".join(parts)


def _cpu(percents: Sequence[float]) -> str:
    if not percents:
        return "-"
    if len(percents) <= 3:
        return ", ".join(f"{p:.0f}%" for p in percents)
    return f"max {max(percents):.0f}% ({len(percents)} processes)"


def _status(met: bool | None) -> Text:
    if met is None:
        return Text("no data", style="yellow")
    return Text("met", style="green") if met else Text("missed", style="bold red")


# --- report -----------------------------------------------------------------


def print_report(doc: dict[str, Any], console: Console) -> None:
    """Print a run: percentiles per level and metric, counts, warnings, targets."""
    levels: list[dict[str, Any]] = doc.get("levels") or []
    console.print(Text(f"bench cancel: {_describe(doc)}", style="bold"))
    if not levels:
        console.print(Text("no concurrency level was measured", style="yellow"))

    latency = Table(title="Latency per concurrency level", title_justify="left")
    latency.add_column("concurrency", justify="right")
    latency.add_column("metric")
    latency.add_column("count", justify="right")
    for name in PERCENTILES:
        latency.add_column(name, justify="right")
    for index, level in enumerate(levels):
        if index:
            latency.add_section()
        first = True
        for metric in SUMMARY_METRICS:
            s = (level.get("summary") or {}).get(metric)
            if s is None:
                continue
            cells = [Text(format_value(metric, s[name])) for name in PERCENTILES]
            limits = [
                t["limit_ms"]
                for t in doc.get("targets") or []
                if t["metric"] == metric and t["concurrency"] in (None, level["concurrency"])
            ]
            if limits:  # the p99 a target judges: green within it, red over it
                cells[PERCENTILES.index("p99")].stylize(
                    "green" if s["p99"] <= min(limits) else "red"
                )
            latency.add_row(
                str(level["concurrency"]) if first else "",
                _label(metric),
                str(s["count"]),
                *cells,
            )
            first = False
        if first:
            latency.add_row(str(level["concurrency"]), Text("no measurement", style="red"))
    if levels:
        console.print(latency)

    turns = Table(title="Turns", title_justify="left")
    for column in ("concurrency", "turns", "ok", "errors", "billed cancelled"):
        turns.add_column(column, justify="right")
    turns.add_column("terminals")
    turns.add_column("wall", justify="right")
    turns.add_column("client CPU", justify="right")
    for level in levels:
        counts: dict[str, Any] = level.get("counts") or {}
        n, ok = counts.get("turns", 0), counts.get("ok", 0)
        errors, billed = counts.get("errors", 0), counts.get("billed_cancelled", 0)
        terminals = counts.get("terminals") or {}
        turns.add_row(
            str(level["concurrency"]),
            str(n),
            Text(str(ok), style="green" if ok == n else "yellow"),
            Text(str(errors), style="red" if errors else ""),
            Text(str(billed), style="bold red" if billed else "green"),
            ", ".join(f"{k} {v}" for k, v in terminals.items()) or "-",
            f"{level.get('wall_seconds', 0.0):.2f} s",
            _cpu(level.get("client_cpu_percent") or []),
        )
    if levels:
        console.print(turns)

    for level in levels:
        for warning in level.get("warnings") or []:
            console.print(Text(f"warning ({level['concurrency']} concurrent): {warning}", "yellow"))
        errors_seen = collections.Counter(
            str(s["error"]) for s in level.get("samples") or [] if s.get("error") is not None
        )
        for error, n in errors_seen.most_common(3):
            console.print(Text(f"error ({level['concurrency']} concurrent, {n}x): {error}", "red"))
        if len(errors_seen) > 3:
            console.print(Text(f"... and {len(errors_seen) - 3} other kinds of error", "red"))

    targets: list[dict[str, Any]] = doc.get("targets") or []
    if targets:
        table = Table(title="Targets", title_justify="left")
        table.add_column("target")
        table.add_column("value", justify="right")
        table.add_column("limit", justify="right")
        table.add_column("result")
        for target in targets:
            metric = target["metric"]
            table.add_row(
                target["name"],
                format_value(metric, target.get("value")),
                format_value(metric, target["limit_ms"]),
                _status(target.get("met")),
            )
        console.print(table)


# --- plot -------------------------------------------------------------------


def _positive(level: dict[str, Any], metric: str) -> list[float]:
    """Sorted positive values of ``metric`` in a level's samples without an error."""
    return sorted(
        float(s[metric])
        for s in level.get("samples") or []
        if s.get("error") is None and s.get(metric) is not None and s[metric] > 0
    )


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot(doc: dict[str, Any], path: str | Path) -> None:
    """Write a PNG: the CDF of stop latency per level, and p50/p99 vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    def plain(axis: XAxis | YAxis) -> None:
        """Log-axis labels as "0.05" and "2" (not 5x10^-2); 2, 3, 5 too when few decades."""

        def minor(value: float, _pos: int | None) -> str:
            low, high = axis.get_view_interval()
            if value <= 0 or low <= 0 or math.log10(high / low) > 1.3:
                return ""
            mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
            return f"{value:g}" if round(mantissa) in (2, 3, 5) else ""

        axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        axis.set_minor_formatter(FuncFormatter(minor))

    levels: list[dict[str, Any]] = sorted(doc.get("levels") or [], key=lambda x: x["concurrency"])
    targets: list[dict[str, Any]] = doc.get("targets") or []
    fig = Figure(figsize=(13, 5.5))  # fixed margins: a layout engine would draw twice
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.1, top=0.88, wspace=0.18)
    ax_cdf, ax_pct = fig.subplots(1, 2)
    fig.suptitle(f"bench cancel: {_describe(doc)}", fontsize="medium")

    # Panel 1: CDF of stop_ms, one curve per level.
    colors: dict[int, str] = {}
    for level in levels:
        values = _positive(level, "stop_ms")
        if not values:
            continue
        n = len(values)
        (line,) = ax_cdf.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            label=f"{level['concurrency']} concurrent (n={n})",
        )
        colors[level["concurrency"]] = line.get_color()
    if colors:
        ax_cdf.set_xscale("log")
        plain(ax_cdf.xaxis)
        ax_cdf.axhline(0.99, color="grey", linestyle=":", linewidth=0.8)
        for target in targets:
            if target["metric"] == "stop_ms":
                at = target["concurrency"]
                ax_cdf.axvline(
                    target["limit_ms"],
                    color=colors.get(at, "red") if at is not None else "red",
                    linestyle="--",
                    linewidth=1,
                    label=f"target p99 {target['limit_ms']:g} ms"
                    + (f" at {at}" if at is not None else ""),
                )
    else:
        ax_cdf.text(
            0.5, 0.5, "no stop samples", ha="center", va="center", transform=ax_cdf.transAxes
        )
    ax_cdf.set_title("stop (cancel sent -> terminal event): CDF")
    ax_cdf.set_xlabel("ms")
    ax_cdf.set_ylabel("fraction of turns")
    ax_cdf.set_ylim(0, 1.02)
    ax_cdf.grid(True, which="both", alpha=0.3)
    _legend(ax_cdf)

    # Panel 2: p50/p99 vs concurrency.
    concurrencies: set[int] = set()
    for color, metric in (("C0", "stop_ms"), ("C1", "first_event_ms")):
        points = [
            (level["concurrency"], level["summary"][metric])
            for level in levels
            if (level.get("summary") or {}).get(metric) is not None
        ]
        if not points:
            continue
        xs = [c for c, _ in points]
        concurrencies.update(xs)
        label = _label(metric)
        ax_pct.plot(xs, [s["p50"] for _, s in points], "o-", color=color, label=f"{label} p50")
        ax_pct.plot(xs, [s["p99"] for _, s in points], "s--", color=color, label=f"{label} p99")
        for target in targets:
            if target["metric"] != metric:
                continue
            if target["concurrency"] is None:
                ax_pct.axhline(target["limit_ms"], color=color, linestyle=":", linewidth=1)
            else:
                ax_pct.plot(
                    [target["concurrency"]], [target["limit_ms"]], "v", color="red", markersize=8
                )
    if concurrencies:
        ax_pct.set_xscale("log")
        ax_pct.set_yscale("log")
        plain(ax_pct.yaxis)
        ticks = sorted(concurrencies)
        ax_pct.set_xticks(ticks, labels=[str(c) for c in ticks])
        ax_pct.xaxis.set_minor_locator(NullLocator())  # only the levels run
    else:
        ax_pct.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax_pct.transAxes)
    ax_pct.set_title("p50 / p99 vs concurrency (targets: red marks, dotted lines)")
    ax_pct.set_xlabel("concurrent turns")
    ax_pct.set_ylabel("ms")
    ax_pct.grid(True, which="both", alpha=0.3)
    _legend(ax_pct)

    fig.savefig(Path(path), format="png", dpi=100)


# --- compare ----------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> Text:
    if a is None or b is None:
        return Text("")
    if a == 0:
        return Text("x1.00" if b == 0 else "n/a", style="dim")
    ratio = b / a
    style = "green" if ratio < 1 else "red" if ratio > 1 else ""
    return Text(f"x{ratio:.2f}", style=style)


def _row_unit(metric: str, values: Iterable[float | None]) -> tuple[str, float]:
    """A unit for a row of a comparison, ``(suffix, divisor)``: one unit reads faster."""
    if not metric.endswith("_ms"):
        return "", 1.0
    largest = max((abs(v) for v in values if v is not None), default=0.0)
    if 0 < largest < 1:
        return "µs", 0.001
    if largest >= 10_000:
        return "s", 1000.0
    return "ms", 1.0


def _number(value: float | None, unit: str, divisor: float) -> str:
    if value is None:
        return "-"
    if not unit:
        return format_count(value)
    return f"{value / divisor:.{1 if unit == 'µs' else 3}f}"


def _side_by_side(a: float | None, b: float | None, unit: str, divisor: float) -> Text:
    text = Text(f"{_number(a, unit, divisor)} → {_number(b, unit, divisor)} ")
    text.append_text(_ratio(a, b))
    return text


def compare(a: dict[str, Any], b: dict[str, Any], console: Console) -> None:
    """Print run ``b`` against run ``a``: each percentile side by side with ``b/a``."""
    console.print(Text(f"a: {_describe(a)}", style="bold"))
    console.print(Text(f"b: {_describe(b)}", style="bold"))
    options_a: dict[str, Any] = a.get("options") or {}
    options_b: dict[str, Any] = b.get("options") or {}
    for key in ("target", "scenario", "cancel_at", "tokens_per_second", "turns", "stateless"):
        if options_a.get(key) != options_b.get(key):
            console.print(
                Text(
                    f"options differ: {key} {options_a.get(key)!r} (a) vs "
                    f"{options_b.get(key)!r} (b)",
                    style="yellow",
                )
            )
    by_a = {level["concurrency"]: level for level in a.get("levels") or []}
    by_b = {level["concurrency"]: level for level in b.get("levels") or []}
    for only, name in ((by_a.keys() - by_b.keys(), "a"), (by_b.keys() - by_a.keys(), "b")):
        if only:
            levels = ", ".join(str(c) for c in sorted(only))
            console.print(Text(f"concurrency {levels} only in {name}", style="yellow"))
    common = sorted(by_a.keys() & by_b.keys())

    table = Table(title="b vs a (ratio b/a: below 1 is faster)", title_justify="left")
    table.add_column("conc.", justify="right", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    for name in PERCENTILES:
        table.add_column(name, justify="right")
    rows = 0
    for concurrency in common:
        summary_a: dict[str, Any] = by_a[concurrency].get("summary") or {}
        summary_b: dict[str, Any] = by_b[concurrency].get("summary") or {}
        first = True
        for metric in SUMMARY_METRICS:
            sa, sb = summary_a.get(metric), summary_b.get(metric)
            if sa is None or sb is None:
                if (sa is None) != (sb is None):
                    side = "a" if sb is None else "b"
                    console.print(
                        Text(
                            f"{concurrency} concurrent: {_label(metric)} only in {side}",
                            style="yellow",
                        )
                    )
                continue
            if first and rows:
                table.add_section()
            unit, divisor = _row_unit(
                metric,
                [sa.get(name) for name in PERCENTILES] + [sb.get(name) for name in PERCENTILES],
            )
            table.add_row(
                str(concurrency) if first else "",
                f"{_label(metric)} ({unit})" if unit else _label(metric),
                f"{sa['count']}/{sb['count']}",
                *(_side_by_side(sa.get(name), sb.get(name), unit, divisor) for name in PERCENTILES),
            )
            first = False
            rows += 1
    if rows:
        console.print(table)
    else:
        console.print(Text("nothing to compare: no metric of a level in both runs", "yellow"))

    if common:
        counts = Table(title="Turns (a → b)", title_justify="left")
        for column in ("concurrency", "turns", "ok", "errors", "billed cancelled"):
            counts.add_column(column, justify="right")
        for concurrency in common:
            ca: dict[str, Any] = by_a[concurrency].get("counts") or {}
            cb: dict[str, Any] = by_b[concurrency].get("counts") or {}
            cells: list[Text] = []
            for key in ("turns", "ok", "errors", "billed_cancelled"):
                style = ""
                if key in ("errors", "billed_cancelled") and cb.get(key):
                    style = "bold red" if key == "billed_cancelled" else "red"
                cells.append(Text(f"{ca.get(key, '-')} → {cb.get(key, '-')}", style=style))
            counts.add_row(str(concurrency), *cells)
        console.print(counts)

"""Load benchmark (issue 9): idle streams and paced streaming turns on ``agent-runtime serve``.

    python benchmarks/load.py                      # full counts (~10 minutes here)
    python benchmarks/load.py --smoke              # reduced counts (~20 s)
    python benchmarks/load.py --json results/load.json

Targets: 5,000 idle streams held with ``/health`` p99 < 50 ms; RSS per idle
stream <= 40 KB; 1,000 concurrent streaming turns at 20 tokens/s for 2 minutes
with delivery lag p99 < 250 ms and 0 errors (lag counted from each word's due
time, so a server that falls behind its own model's schedule cannot pass).
See :mod:`bench._load` for what is measured and how (the server, the stamped
model, the client processes).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import LoadOptions, run_load
from bench._script import cancelled_on_sigterm

SMOKE = {
    "idle_streams": 300,
    "streams": 100,
    "duration": 5.0,
    "health_seconds": 2.0,
    "capacity": [],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-streams", type=int, default=5000, help="default 5000 (0: skip)")
    parser.add_argument("--streams", type=int, default=1000, help="default 1000 (0: skip)")
    parser.add_argument("--tokens-per-second", type=float, default=20.0, help="default 20")
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds each streaming turn lasts (120)"
    )
    parser.add_argument(
        "--health-seconds",
        type=float,
        default=10.0,
        help="seconds of /health probes while the idle streams are held (10)",
    )
    parser.add_argument(
        "--session-turns",
        action="store_true",
        help="session turns (POST /v1/sessions + .../messages) instead of stateless "
        "streamed responses (POST /v1/responses)",
    )
    parser.add_argument(
        "--processes", type=int, default=0, help="client processes per phase (0: automatic)"
    )
    parser.add_argument(
        "--capacity",
        type=int,
        nargs="*",
        default=[200, 300],
        metavar="N",
        help="after the main phases, stream at these counts too, to show where the lag "
        "target holds (default 200 300; none: skip)",
    )
    parser.add_argument(
        "--capacity-duration",
        type=float,
        default=30.0,
        help="seconds each capacity phase's turns last (30)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="reduced counts: 300 idle streams, 100 streams for 5 s, 2 s of /health, "
        "no capacity phases",
    )
    parser.add_argument("--json", metavar="OUT", help="write the result document here")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def options_of(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(
        idle_streams=args.idle_streams,
        streams=args.streams,
        tokens_per_second=args.tokens_per_second,
        duration=args.duration,
        health_seconds=args.health_seconds,
        stateless=not args.session_turns,
        processes=args.processes,
        capacity_streams=tuple(args.capacity),
        capacity_duration=args.capacity_duration,
    )


def _ms(summary: dict[str, Any]) -> str:
    if summary["p50"] is None:
        return "-"
    return f"{summary['p50']:.1f} / {summary['p99']:.1f} / {summary['max']:.1f} ms"


def report(doc: dict[str, Any], console: Console) -> None:
    idle, stream = doc["idle"], doc["stream"]
    if idle is not None:
        table = Table(title="Idle streams held", show_header=False)
        rows = [
            ("streams held / opened", f"{idle['held']} / {idle['streams']}"),
            ("errors", f"{idle['errors']} {idle['error_kinds'] or ''}"),
            ("opened in", f"{idle['open_seconds']} s"),
            ("first event p50 / p99 / max", _ms(idle["first_event_ms"])),
            ("/health p50 / p99 / max (held)", _ms(idle["health_ms"])),
            ("/health p50 / p99 / max (no streams)", _ms(idle["health_idle_ms"])),
            ("server RSS before -> held", f"{idle['rss_before_mb']} -> {idle['rss_held_mb']} MB"),
            ("RSS per idle stream", f"{idle['rss_per_stream_kb']} KB"),
            ("server fds before -> held", f"{idle['fds_before']} -> {idle['fds_held']}"),
            ("server CPU while held", f"{idle['server_cpu_percent_while_held']}%"),
            ("client processes, CPU", _client(idle["client"])),
        ]
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if stream is not None:
        table = Table(title="Streaming turns", show_header=False)
        rows = [
            (
                "streams x words at rate",
                f"{stream['streams']} x {stream['words_per_stream']} at "
                f"{stream['tokens_per_second']:g}/s",
            ),
            ("completed", f"{stream['completed']} / {stream['streams']}"),
            ("errors", f"{stream['errors']} {stream['error_kinds'] or ''}"),
            ("deltas delivered / expected", f"{stream['deltas']} / {stream['deltas_expected']}"),
            ("duration", f"{stream['seconds']} s"),
            ("event rate", f"{stream['event_rate']} events/s"),
            ("deltas per client read", f"{stream['deltas_per_read']}"),
            ("delivery lag p50 / p99 / max", _ms(stream["lag_ms"])),
            ("model lateness p50 / p99 / max", _ms(stream["model_late_ms"])),
            ("lag from due p50 / p99 / max", _ms(stream["due_lag_ms"])),
            ("first event p50 / p99 / max", _ms(stream["first_event_ms"])),
            ("/health p50 / p99 / max", _ms(stream["health_ms"])),
            (
                "server RSS before / peak / after",
                f"{stream['rss_before_mb']} / {stream['rss_peak_mb']} / "
                f"{stream['rss_after_mb']} MB",
            ),
            ("server CPU", f"{stream['server_cpu_percent']}%"),
            ("client processes, CPU", _client(stream["client"])),
        ]
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if doc.get("capacity"):
        table = Table(title="Capacity: streams at the same rate, lag target per count")
        for column in ("streams", "completed", "errors", "events/s", "lag p50 / p99 / max"):
            table.add_column(column)
        table.add_column("lag from due p50 / p99 / max")
        table.add_column("server CPU")
        table.add_column("lag target")
        for phase in doc["capacity"]:
            table.add_row(
                str(phase["streams"]),
                str(phase["completed"]),
                str(phase["errors"]),
                str(phase["event_rate"]),
                _ms(phase["lag_ms"]),
                _ms(phase["due_lag_ms"]),
                f"{phase['server_cpu_percent']}%",
                "[green]met[/]" if phase["lag_target_met"] else "[red]missed[/]",
            )
        console.print(table)
    for target in doc["targets"]:
        mark = "[green]met[/]" if target["met"] else "[red]missed[/]"
        console.print(f"- {target['name']}: {target['value']} - {mark}")
    console.print(
        f"client: {doc['client']}; {doc['machine']['cores']} cores; load average "
        f"{doc['load_average_start']} -> {doc['load_average_end']}"
    )


def _client(client: dict[str, Any]) -> str:
    cpu = ", ".join(f"{c}%" for c in client["cpu_percent"])
    lag = max(client["loop_lag_p99_ms"], default=0.0)
    return f"{client['processes']}: {cpu} (loop lag p99 <= {lag} ms)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=False)
    try:
        log = console.log
        doc = trio.run(cancelled_on_sigterm, partial(run_load, options_of(args), log), log)
    except KeyboardInterrupt:
        return 130
    if doc is None:
        return 143  # SIGTERM: stopped, servers and workers stopped too
    report(doc, console)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(t["met"] for t in doc["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())

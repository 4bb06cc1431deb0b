"""Stream floor (issue 9): what one SSE write and one paced event cost under the runtime.

    python benchmarks/stream_floor.py                  # full counts (~2-3 minutes)
    python benchmarks/stream_floor.py --smoke          # reduced counts (~15 s)
    python benchmarks/stream_floor.py --json results/stream_floor.json

Two measurements, no runtime code in either (see :mod:`bench._floor`): server
CPU per write of one SSE frame through bare trio, hypercorn's trio worker with
a bare ASGI app, and hypercorn + quart-trio, at 1 and 100 connections; and
1,000 paced streams at 20 events/s over socketpairs with no HTTP at all
(shared pacer or per-task ``trio.sleep_until``, writes coalesced on a shared
tick or one per event, stream schedules spread over a period or aligned),
with the delivery lag a client process measures.
Exit status 1 if any measurement lost frames or events; missing the lag target
is a finding, not a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._floor import PACERS, PHASES, SERVERS, FloorOptions, run_floor
from bench._script import cancelled_on_sigterm

if TYPE_CHECKING:
    from collections.abc import Callable

SMOKE = {"writes": 3000, "streams": 100, "duration": 2.0}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,100, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1 like 1,100, not {text!r}")
    return values


def _servers(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(values) - set(SERVERS)
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"servers are among {','.join(SERVERS)}, not {text!r}")
    return values


DEFAULT_CONFIGS = "shared:0.1,shared:0.1:aligned,shared:0,trio:0.1"


def _configs(text: str) -> tuple[tuple[str, float, str], ...]:
    """``shared:0.1:aligned,trio:0`` -> (("shared", 0.1, "aligned"), ("trio", 0.0, "spread"))."""
    out = []
    for part in text.split(","):
        pacer, _, rest = part.strip().partition(":")
        tick, _, phases = rest.partition(":")
        try:
            seconds = float(tick)
        except ValueError:
            seconds = -1.0
        phases = phases or "spread"
        if pacer not in PACERS or seconds < 0 or phases not in PHASES:
            raise argparse.ArgumentTypeError(
                f"configs look like shared:0.1,trio:0:aligned (pacer among "
                f"{','.join(PACERS)}: tick seconds, 0 = write every event[: phases among "
                f"{','.join(PHASES)}, default spread]), not {text!r}"
            )
        out.append((pacer, seconds, phases))
    return tuple(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--writes", type=int, default=50_000, help="frames per write-cost run (50000; 0: skip)"
    )
    parser.add_argument(
        "--connections", type=_ints, default=(1, 100), help="write-cost connections (1,100)"
    )
    parser.add_argument(
        "--servers", type=_servers, default=SERVERS, help=f"default {','.join(SERVERS)}"
    )
    parser.add_argument("--streams", type=int, default=1000, help="default 1000 (0: skip)")
    parser.add_argument("--tokens-per-second", type=float, default=20.0, help="default 20")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of events per stream (10)"
    )
    parser.add_argument(
        "--configs",
        type=_configs,
        default=_configs(DEFAULT_CONFIGS),
        help=f"stream-floor runs as pacer:tick[:phases] ({DEFAULT_CONFIGS}); pacer shared = "
        "runtime._pace, trio = trio.sleep_until; tick 0 = one write per event; phases "
        "spread (default: stream starts spread over one period) or aligned (all at once)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="reduced counts: 3000 writes, 100 streams for 2 s",
    )
    parser.add_argument("--json", metavar="OUT", help="write the result document here")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def options_of(args: argparse.Namespace) -> FloorOptions:
    return FloorOptions(
        writes=args.writes,
        connections=args.connections,
        servers=args.servers,
        streams=args.streams,
        tokens_per_second=args.tokens_per_second,
        duration=args.duration,
        configs=args.configs,
    )


def _ms(summary: dict[str, Any]) -> str:
    if summary["p50"] is None:
        return "-"
    return f"{summary['p50']:.1f} / {summary['p99']:.1f} / {summary['max']:.1f}"


def report(doc: dict[str, Any], console: Console) -> None:
    costs = doc["write_cost"]
    if costs:
        floor = {c["connections"]: c["us_per_write"] for c in costs if c["server"] == "trio"}
        table = Table(title=f"Server CPU per write of one {costs[0]['frame_bytes']}-byte SSE frame")
        for column in (
            "server",
            "connections",
            "delivered / writes",
            "server CPU",
            "wall",
            "µs CPU per write",
            "x bare trio",
            "client CPU",
        ):
            table.add_column(column, justify="left" if column == "server" else "right")
        for c in costs:
            base = floor.get(c["connections"])
            table.add_row(
                c["server"],
                str(c["connections"]),
                f"{c['delivered']} / {c['writes']}",
                f"{c['server_cpu_seconds']:.2f} s",
                f"{c['wall_seconds']:.2f} s",
                f"{c['us_per_write']:.1f}",
                f"{c['us_per_write'] / base:.1f}" if base else "-",
                f"{c['client_cpu_percent']}%",
            )
        console.print(table)
    runs = doc["stream_floor"]
    if runs:
        table = Table(title="Stream floor: paced streams over socketpairs, no HTTP")
        table.add_column("")
        for r in runs:
            table.add_column(
                f"{r['pacer']} pacer\ntick {r['tick']:g} s\n{r['phases']}", justify="right"
            )
        rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
            ("streams x rate", lambda r: f"{r['streams']} x {r['tokens_per_second']:g}/s"),
            ("delivered / expected", lambda r: f"{r['events_delivered']} / {r['events_expected']}"),
            ("wall", lambda r: f"{r['wall_seconds']:.1f} s"),
            ("events/s", lambda r: f"{r['events_per_second']:.0f}"),
            ("server CPU", lambda r: f"{r['server_cpu_percent']}%"),
            ("µs server CPU per event", lambda r: f"{r['us_per_event']:.1f}"),
            ("lag p50/p99/max ms", lambda r: _ms(r["lag_ms"])),
            ("model late p50/p99/max ms", lambda r: _ms(r["model_late_ms"])),
            ("lag from due p50/p99/max ms", lambda r: _ms(r["due_lag_ms"])),
            ("deltas per read", lambda r: f"{r['deltas_per_read']}"),
            ("client CPU", lambda r: f"{r['client_cpu_percent']}%"),
        ]
        for label, cell in rows:
            table.add_row(label, *(cell(r) for r in runs))
        console.print(table)
    for target in doc["targets"]:
        mark = "[green]met[/]" if target["met"] else "[red]missed[/]"
        console.print(f"- {target['name']}: {target['value']} ms - {mark}")
    console.print(
        f"client: {doc['client']}; {doc['machine']['cores']} cores; load average "
        f"{doc['load_average_start']} -> {doc['load_average_end']}"
    )


def complete(doc: dict[str, Any]) -> bool:
    """Every frame and every event reached the client, every response was a 200."""
    return all(
        c["delivered"] == c["writes"] and not c["bad_responses"] for c in doc["write_cost"]
    ) and all(r["events_delivered"] == r["events_expected"] for r in doc["stream_floor"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 120)
    try:
        log = console.log
        doc = trio.run(cancelled_on_sigterm, partial(run_floor, options_of(args), log), log)
    except KeyboardInterrupt:
        return 130
    if doc is None:
        return 143  # SIGTERM: stopped, client processes stopped too
    report(doc, console)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if complete(doc) else 1


if __name__ == "__main__":
    sys.exit(main())

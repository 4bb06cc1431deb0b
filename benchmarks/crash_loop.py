"""Crash loop: SIGKILL a busy ``agent-runtime serve`` ``--iterations`` times at
random moments and restart it on the same data dir (issue 9, point 4).

Each iteration starts the server, checks the previous crash against it, runs a
busy load (streamed essays, ``run_shell`` and ``write_file`` tool calls, long
``run_shell`` calls with background and ``setsid`` children, cancels, DELETEs,
stateless ``/v1/responses``, persistent sessions and file uploads on two
accounts), SIGKILLs it after a random delay and runs ``PRAGMA
integrity_check`` on the dead server's database. The invariants (integrity,
no turn left running, billed set == completed set, debits == usage per
account, persistent sessions and files intact, no tool process alive) are
stated in ``bench/_crashloop.py``; every breach is a violation, and the
script exits 1 if there is any.

    python3 benchmarks/crash_loop.py --iterations 100 --seed 1 \\
        --json benchmarks/results/crash_loop.json

``tests/server/test_crash_loop.py`` runs the same driver at 8 iterations.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

import trio
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._crashloop import (  # noqa: E402
    KILL_POINTS,
    CrashLoopOptions,
    CrashLoopResult,
    IterationReport,
    run_crash_loop,
)
from bench._samples import machine_info  # noqa: E402
from bench._stats import percentile  # noqa: E402


def _progress(console: Console, total: int) -> Callable[[IterationReport], None]:
    def show(r: IterationReport) -> None:
        status = "[green]ok[/]" if not r.violations else f"[red]{len(r.violations)} violations[/]"
        console.print(
            f"{r.index + 1:>4}/{total} kill at {r.kill_delay:5.2f} s  "
            f"{','.join(r.kill_points) or '-':<60} started {r.started:>3} "
            f"in flight {r.in_flight:>2} survivors {r.survivors}  {status}",
            highlight=False,
        )
        for violation in r.violations[:3]:
            console.print(f"      {violation}", style="red", highlight=False)

    return show


def report(result: CrashLoopResult, console: Console) -> None:
    totals, points = result.totals(), result.kill_point_counts()
    n = len(result.iterations)
    options = result.options
    table = Table(
        title=f"crash loop: {n} SIGKILLs of a busy server, seed {options.seed}, "
        f"--sandbox {options.sandbox}"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    for point in KILL_POINTS:
        table.add_row(f"kill point: {point}", f"{points[point]} / {n}")
    rows = (
        ("turns started (given a response id)", totals["started"]),
        ("  seen completed by their client", totals["completed"]),
        ("  seen cancelled by their client", totals["cancelled"]),
        ("  seen failed by their client", totals["failed"]),
        ("  no terminal event before the kill", totals["in_flight"]),
        ("    found cancelled(interrupted) after restart", totals["interrupted"]),
        ("    found completed and billed after restart", totals["completed_unseen"]),
        ("billed (usage rows at the end)", totals["billed"]),
        ("file uploads acknowledged", totals["uploads"]),
        ("tool processes alive right after a kill", totals["orphans_at_kill"]),
        ("tool processes alive after the restart", totals["survivors"]),
        ("VIOLATIONS", totals["violations"]),
    )
    for name, value in rows:
        table.add_row(name, str(value), style="bold red" if name == "VIOLATIONS" and value else "")
    starts = result.start_seconds
    table.add_row(
        "server start-up p50 / max",
        f"{percentile(starts, 50):.2f} s / {max(starts):.2f} s",
    )
    table.add_row("total time", f"{result.seconds:.1f} s")
    console.print(table)
    for violation in result.violations[:50]:
        console.print(violation, style="red", highlight=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--sandbox",
        choices=("auto", "bwrap", "none"),
        default="auto",
        help="serve --sandbox: with 'none', tools outlive the kill until the next start-up",
    )
    parser.add_argument(
        "--max-kill-delay", type=float, default=1.5, help="latest kill after the load starts (s)"
    )
    parser.add_argument("--tokens-per-second", type=float, default=2000.0)
    parser.add_argument(
        "--finalize-delay",
        type=float,
        default=0.03,
        help="the finalize hook sleeps uniform(0, this) before the ledger write (s)",
    )
    parser.add_argument("--json", metavar="OUT", help="write the result as JSON here")
    parser.add_argument(
        "--work-dir", metavar="DIR", help="keep the data dir and server logs here (default: temp)"
    )
    args = parser.parse_args()
    options = CrashLoopOptions(
        iterations=args.iterations,
        seed=args.seed,
        sandbox=args.sandbox,
        max_kill_delay=args.max_kill_delay,
        tokens_per_second=args.tokens_per_second,
        finalize_delay=args.finalize_delay,
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    started_at = time.time()

    async def run(work: Path) -> CrashLoopResult:
        return await run_crash_loop(
            options, work, on_iteration=_progress(console, options.iterations)
        )

    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        result = trio.run(run, work)
    else:
        with tempfile.TemporaryDirectory(prefix="crash-loop-") as tmp:
            result = trio.run(run, Path(tmp))
    report(result, console)
    if args.json:
        doc = result.to_json()
        doc |= {"machine": machine_info(), "started_at": started_at, "finished_at": time.time()}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return 1 if result.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())

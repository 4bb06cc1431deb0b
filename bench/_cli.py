"""``agent-runtime bench``: the command line of the benchmarks.

``bench cancel`` sweeps concurrency levels of one scenario against one target
and shows a rich progress bar, then the percentile table; ``--json`` and
``--plot`` keep the run. ``bench compare`` sets two runs side by side.
``bench sessions`` measures idle sessions and held streams.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._samples import (
    SCENARIOS,
    CancelOptions,
    CancelResult,
    LevelResult,
    TurnSample,
    machine_info,
    parse_cancel_at,
    parse_levels,
)

#: Above this (percent of a core) the fake upstream's host process may have
#: delayed what it measured.
UPSTREAM_CPU_WARN: Final = 85.0

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from rich.console import Console


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` and its subcommands to the ``agent-runtime`` parser."""
    bench = sub.add_parser(
        "bench", help="cancel-latency and capacity benchmarks (cancel, compare, sessions)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")

    cancel = bench.add_parser(
        "cancel",
        help="measure how fast a cancel stops a turn, over a sweep of concurrency levels",
        description=(
            "Start turns, cancel each mid-flight, and measure: time to headers and first "
            "event, ack (cancel -> 202), stop (cancel -> terminal event), deltas after the "
            "ack, and whether a cancelled turn was billed (a failure). Against any server "
            "that speaks this API (--url, --api-key) or the runtime in-process (--embedded)."
        ),
    )
    target = cancel.add_mutually_exclusive_group()
    target.add_argument(
        "--url",
        help="base URL of the server, e.g. http://127.0.0.1:8000 (one of --url and "
        "--embedded is needed, except for --scenario upstream)",
    )
    target.add_argument(
        "--embedded", action="store_true", help="the runtime in-process, no HTTP (demo model)"
    )
    cancel.add_argument("--api-key", help="API key for --url")
    cancel.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="stream",
        help="stream: cancel mid-text; tool: cancel during a run_shell call (time until "
        "its process group is gone); upstream: a fake OpenAI-compatible upstream and a "
        "server using it (time until the upstream connection closes; starts its own "
        "server, so no --url); delete: DELETE the session mid-turn (default stream)",
    )
    cancel.add_argument(
        "--concurrency",
        type=parse_levels,
        default=(1, 20, 100),
        metavar="N,N,...",
        help="turns in flight at once, one level per value (default 1,20,100)",
    )
    cancel.add_argument(
        "--turns",
        type=int,
        default=100,
        metavar="N",
        help="turns per level, at least the largest --concurrency (default 100)",
    )
    cancel.add_argument(
        "--tokens-per-second",
        type=float,
        default=50.0,
        metavar="N",
        help="words per second of the in-process demo model and of the fake upstream "
        "(default 50; a --url server streams at its own pace)",
    )
    cancel.add_argument(
        "--cancel-at",
        type=parse_cancel_at,
        default=parse_cancel_at("20e"),
        metavar="WHEN",
        help="when to cancel: 20e (after 20 events, the default), 0.5 (seconds after the "
        "first event) or 0.2-1.0 (uniformly random in that range)",
    )
    cancel.add_argument(
        "--stateless", action="store_true", help="stateless turns (POST /v1/responses)"
    )
    cancel.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    cancel.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="client processes for --url (default: one per 50 concurrent streams)",
    )
    cancel.add_argument("--json", metavar="PATH", help="write samples, summary and machine info")
    cancel.add_argument("--plot", metavar="PATH", help="write a PNG: latency CDF and p50/p99")

    compare = bench.add_parser(
        "compare", help="print two 'bench cancel --json' results side by side, with ratios"
    )
    compare.add_argument("a", metavar="A.json")
    compare.add_argument("b", metavar="B.json")

    sessions = bench.add_parser(
        "sessions",
        help="memory and file descriptors of N idle sessions and M held streams",
        description=(
            "Create N idle sessions, then hold M streams open until each has its first "
            "event; report the server's RSS and open file descriptors. Starts its own "
            "server unless --url is given; --embedded measures idle sessions in-process."
        ),
    )
    where = sessions.add_mutually_exclusive_group()
    where.add_argument("--url", help="an existing server (RSS/fds only if it runs here)")
    where.add_argument("--embedded", action="store_true", help="idle sessions in-process")
    sessions.add_argument("--api-key", help="API key for --url")
    sessions.add_argument("--count", type=int, default=10_000, help="idle sessions (default 10000)")
    sessions.add_argument(
        "--streams", type=int, default=1_000, help="streams held open (default 1000)"
    )
    sessions.add_argument("--json", metavar="PATH", help="write the result as JSON")


def main(args: argparse.Namespace) -> int:
    """Run ``agent-runtime bench ACTION``; returns the exit status."""
    from rich.console import Console

    console = Console()
    try:
        if args.action == "cancel":
            return _cancel(args, console)
        if args.action == "compare":
            from ._report import compare, load_json

            compare(load_json(args.a), load_json(args.b), console)
            return 0
        if args.action == "sessions":
            return _sessions(args, console)
    except BaseException as exc:
        # Errors raised inside trio nurseries arrive in exception groups.
        if _find(exc, KeyboardInterrupt) is not None:
            console.print("[yellow]agent-runtime bench: interrupted[/yellow]")
            return 130
        found = _find(exc, ValueError, OSError, RuntimeError)
        if found is None:
            raise
        console.print(f"[red]agent-runtime bench: {found}[/red]")
        return 2
    raise AssertionError(args.action)


def _find(exc: BaseException, *kinds: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of one of ``kinds`` inside its groups."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, *kinds)
            if found is not None:
                return found
    return None


def options_from(args: argparse.Namespace) -> CancelOptions:
    """The :class:`CancelOptions` of ``bench cancel``'s arguments (ValueError if bad)."""
    if args.turns < max(args.concurrency):
        raise ValueError(
            f"--turns ({args.turns}) must be at least the largest --concurrency "
            f"({max(args.concurrency)}): a level runs that many turns at once"
        )
    if args.processes < 0:
        raise ValueError("--processes must be >= 0")
    if not args.tokens_per_second > 0:
        raise ValueError("--tokens-per-second must be > 0")
    if args.url is not None and args.api_key is None:
        raise ValueError("--url needs --api-key")
    if args.url is not None and args.scenario == "upstream":
        raise ValueError(
            "--scenario upstream starts its own server and fake upstream: use it without "
            "--url (or with --embedded)"
        )
    if args.url is None and not args.embedded and args.scenario != "upstream":
        raise ValueError("say where: --url URL --api-key KEY, or --embedded")
    return CancelOptions(
        target="embedded" if args.embedded else "http",
        scenario=args.scenario,
        concurrency=args.concurrency,
        turns=args.turns,
        tokens_per_second=args.tokens_per_second,
        cancel_at=args.cancel_at,
        stateless=args.stateless,
        seed=args.seed,
        url=args.url.rstrip("/") if args.url else None,
        api_key=args.api_key,
        processes=args.processes,
    )


def _cancel(args: argparse.Namespace, console: Console) -> int:
    from ._report import plot, print_report, to_json, write_json

    options = options_from(args)
    result = trio.run(run_cancel, options, console)
    doc = to_json(result)
    print_report(doc, console)
    if args.json:
        write_json(args.json, result)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(doc, args.plot)
        console.print(f"wrote {args.plot}")
    samples = [s for level in result.levels for s in level.samples]
    unknown = sum(1 for s in samples if s.billed is None)
    if unknown:
        console.print(
            f"[red]{unknown} turns: whether they were billed is unknown "
            f"(GET /v1/usage failed?): not a pass[/red]"
        )
    failed = unknown > 0 or any(not s.ok for s in samples)
    return 1 if failed else 0


async def run_cancel(options: CancelOptions, console: Console | None = None) -> CancelResult:
    """Run every level of ``options``, with a progress bar on ``console``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    started_at = time.time()
    levels: list[LevelResult] = []
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
        transient=False,
    ) as progress:
        for concurrency in options.concurrency:
            task = progress.add_task(
                f"{options.target} {options.scenario} x{concurrency}", total=options.turns
            )

            def advance(sample: TurnSample, task: Any = task) -> None:
                progress.advance(task)
                if not sample.ok:
                    progress.console.print(f"[red]turn failed: {_why(sample)}[/red]")

            levels.append(await _run_level(options, concurrency, advance))
    return CancelResult(
        options=options, levels=tuple(levels), machine=machine_info(), started_at=started_at
    )


def _why(sample: TurnSample) -> str:
    if sample.error is not None:
        return sample.error
    if sample.billed:
        return f"{sample.response_id} was cancelled and billed"
    if sample.workspace_gone is False:
        return f"{sample.response_id}: the workspace outlived DELETE"
    return f"{sample.response_id} ended {sample.terminal}"


async def _run_level(
    options: CancelOptions, concurrency: int, on_sample: Callable[[TurnSample], None]
) -> LevelResult:
    if options.target == "embedded":
        from ._embedded import run_embedded_level

        return await run_embedded_level(options, concurrency, on_sample)
    from ._http import run_http_level

    if options.scenario != "upstream":
        return await run_http_level(options, concurrency, on_sample)
    # The upstream scenario: our own server in front of an in-process fake
    # upstream; the turns are stream turns, and the fake tells when it saw
    # each connection close and what it produced after the ack.
    from ._upstream import (
        current_clock_offset,
        serve_with_fake_upstream,
        upstream_metrics,
        wait_upstream_closed,
    )

    with tempfile.TemporaryDirectory(prefix="agent-runtime-bench-") as data_dir:
        async with serve_with_fake_upstream(options.tokens_per_second, data_dir=data_dir) as (
            url,
            api_key,
            up,
        ):
            streams = attrs.evolve(options, url=url, api_key=api_key, scenario="stream")
            cpu, wall = time.process_time(), time.perf_counter()
            level = await run_http_level(streams, concurrency, on_sample)
            # This process hosts the fake upstream, which stamps the close times.
            busy = 100 * (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
            # The last turns' connections may close a moment after their
            # terminal event: let the fake see them before reading it.
            await wait_upstream_closed(up, level.samples)
            clock_offset = current_clock_offset()
            samples = upstream_metrics(up, list(level.samples), clock_offset)
    samples = [attrs.evolve(s, scenario="upstream") for s in samples]
    warnings = level.warnings
    if busy >= UPSTREAM_CPU_WARN:
        warnings += (
            f"the fake upstream's process used {busy:.0f}% of a core: its close times "
            f"include waiting for the CPU",
        )
    return attrs.evolve(level, samples=tuple(samples), warnings=warnings)


def _sessions(args: argparse.Namespace, console: Console) -> int:
    import json

    from ._sessions import print_sessions_report, run_sessions_bench

    if args.url is not None and args.api_key is None:
        raise ValueError("--url needs --api-key")
    if args.count < 1 or args.streams < 0:
        raise ValueError("--count must be >= 1 and --streams >= 0")
    doc = trio.run(
        lambda: run_sessions_bench(
            count=args.count,
            streams=args.streams,
            url=args.url,
            api_key=args.api_key,
            embedded=args.embedded,
        )
    )
    print_sessions_report(doc, console)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(doc, file, indent=2, allow_nan=False)
        console.print(f"wrote {args.json}")
    met = all(t.get("met") is not False for t in doc.get("targets", []))
    return 0 if met else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: agent-runtime bench ...")

"""Regenerate benchmarks/RESULTS.md: run every benchmark, then write the page.

    python3 benchmarks/make_results.py            # run everything (about 30 minutes)
    python3 benchmarks/make_results.py --render   # only rewrite RESULTS.md from results/

Every cancel run is ``agent-runtime bench cancel ... --json results/NAME.json
--plot results/NAME.png``; HTTP runs go against an ``agent-runtime serve``
this script starts (demo model, 50 words/s, a fresh data dir) and stops. The
page shows each run's command, its table, its targets and its plot, then the
hand-written analysis kept in ``benchmarks/ANALYSIS.md``. Nothing else on the
machine should run meanwhile: it has two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE: Final = Path(__file__).resolve().parent
RESULTS: Final = HERE / "results"
CLI: Final = [sys.executable, "-c", "from server._cli import main; raise SystemExit(main())"]
#: (name, title, arguments of `agent-runtime`, needs a server)
CANCEL_RUNS: Final = (
    (
        "embedded_stream",
        "Embedded: cancel mid-stream (no HTTP)",
        "bench cancel --embedded --scenario stream --concurrency 1,20,100 --turns 300 "
        "--tokens-per-second 200",
        False,
    ),
    (
        "http_stream",
        "HTTP: cancel a session turn mid-stream",
        "bench cancel --scenario stream --concurrency 1,20,100 --turns 200",
        True,
    ),
    (
        "http_stateless",
        "HTTP: cancel a stateless response (POST /v1/responses) mid-stream",
        "bench cancel --scenario stream --stateless --concurrency 1,20,100 --turns 200",
        True,
    ),
    (
        "http_tool",
        "HTTP: cancel during a run_shell call (process group gone)",
        "bench cancel --scenario tool --concurrency 1,20 --turns 40",
        True,
    ),
    (
        "http_delete",
        "HTTP: DELETE the session mid-turn",
        "bench cancel --scenario delete --concurrency 1,20,100 --turns 200",
        True,
    ),
    (
        "upstream",
        "HTTP in front of an OpenAI-compatible upstream: cancel -> upstream closed",
        "bench cancel --scenario upstream --concurrency 1,20,100 --turns 100 "
        "--tokens-per-second 50",
        False,
    ),
    (
        "embedded_tool",
        "Embedded: cancel during a run_shell call",
        "bench cancel --embedded --scenario tool --concurrency 1,20 --turns 40",
        False,
    ),
)
SESSIONS_RUN: Final = "bench sessions --count 10000 --streams 1000"
STORE_RUNS: Final = (
    ("store_finalize", "benchmarks/store_finalize.py --configs normal full to_thread"),
    ("store_finalize_think100", "benchmarks/store_finalize.py --configs normal --think-ms 100"),
    (
        "store_finalize_runtime",
        "benchmarks/store_finalize.py --configs runtime runtime_memory --levels 1 20",
    ),
)
#: Issue 9: load (idle streams, paced streaming turns) and the crash loop.
LOAD_RUN: Final = ("load", "benchmarks/load.py")
#: Issue 9: the floors under the load target (a write through trio, hypercorn and
#: quart-trio; paced streams without HTTP).
STREAM_FLOOR_RUN: Final = ("stream_floor", "benchmarks/stream_floor.py")
CRASH_RUNS: Final = (
    ("crash_loop", "benchmarks/crash_loop.py --iterations 100 --seed 1"),
    ("crash_loop_none", "benchmarks/crash_loop.py --iterations 100 --seed 1 --sandbox none"),
)


@contextlib.contextmanager
def server() -> Iterator[tuple[str, str]]:
    """``agent-runtime serve`` on a free port with a fresh data dir and key."""
    key = f"pk_bench_{secrets.token_hex(8)}"
    with tempfile.TemporaryDirectory(prefix="agent-runtime-results-") as data_dir:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--data-dir", data_dir, "--api-key", key],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert process.stdout is not None
            deadline = time.monotonic() + 30
            url = None
            while url is None and time.monotonic() < deadline:
                line = process.stdout.readline()
                if not line:
                    break
                match = re.search(r"serving on (http://\S+)", line)
                url = match.group(1) if match else None
            if url is None:
                raise RuntimeError("the server did not start")
            yield url, key
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(args: list[str]) -> None:
    print("+", shlex.join(args), flush=True)
    subprocess.run(args, check=False, cwd=HERE.parent)


def run_all(only: set[str] | None) -> None:
    RESULTS.mkdir(exist_ok=True)
    for name, _, command, needs_server in CANCEL_RUNS:
        if only and name not in only:
            continue
        out = ["--json", str(RESULTS / f"{name}.json"), "--plot", str(RESULTS / f"{name}.png")]
        if needs_server:
            with server() as (url, key):
                run([*CLI, *command.split(), "--url", url, "--api-key", key, *out])
        else:
            run([*CLI, *command.split(), *out])
    if not only or "sessions" in only:
        run([*CLI, *SESSIONS_RUN.split(), "--json", str(RESULTS / "sessions.json")])
    for name, command in (*STORE_RUNS, LOAD_RUN, STREAM_FLOOR_RUN, *CRASH_RUNS):
        if not only or name in only:
            script, *rest = command.split()
            run([sys.executable, script, *rest, "--json", str(RESULTS / f"{name}.json")])


# -- rendering -------------------------------------------------------------------


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} µs"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def pct(summary: dict[str, Any] | None, key: str) -> float | None:
    return None if summary is None else summary.get(key)


def cancel_section(name: str, title: str, command: str, needs_server: bool) -> list[str]:
    path = RESULTS / f"{name}.json"
    shown = f"agent-runtime {command}"
    if needs_server:
        shown += " --url URL --api-key KEY"
    shown += f" --json results/{name}.json --plot results/{name}.png"
    lines = [f"## {title}", "", "```sh", shown, "```", ""]
    if not path.exists():
        return [*lines, "_not run_", ""]
    doc = json.loads(path.read_text())
    lines += [
        "| concurrency | turns ok / all | billed cancelled | first event p50 / p99 "
        "| ack p99 | stop p50 / p99 / max | group gone p99 | upstream closed p99 "
        "| deltas after ack p99 | client CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in doc["levels"]:
        s, c = level["summary"], level["counts"]
        stop = s.get("stop_ms")
        first = s.get("first_event_ms")
        deltas = s.get("deltas_after_ack")
        cpu = max(level["client_cpu_percent"], default=None)
        deltas_p99 = "-" if deltas is None else f"{deltas['p99']:.0f}"
        cpu_shown = "-" if cpu is None else f"{cpu:.0f}%"
        upstream_shown = ms(pct(s.get("upstream_closed_ms"), "p99"))
        tokens = s.get("upstream_tokens_after_ack")
        if tokens is not None:
            upstream_shown += f" ({tokens['max']:.0f} tokens after ack, max)"
        first_shown = f"{ms(pct(first, 'p50'))} / {ms(pct(first, 'p99'))}"
        stop_shown = f"{ms(pct(stop, 'p50'))} / {ms(pct(stop, 'p99'))} / {ms(pct(stop, 'max'))}"
        cells = [
            str(level["concurrency"]),
            f"{c['ok']} / {c['turns']}",
            str(c["billed_cancelled"]),
            first_shown,
            ms(pct(s.get("ack_ms"), "p99")),
            stop_shown,
            ms(pct(s.get("group_gone_ms"), "p99")),
            upstream_shown,
            deltas_p99,
            cpu_shown,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    warnings = sorted({w for level in doc["levels"] for w in level["warnings"]})
    lines.append("")
    for target in doc.get("targets", []):
        mark = {True: "met", False: "**missed**", None: "no data"}[target["met"]]
        value = target["value"]
        shown_value = (
            "-"
            if value is None
            else (f"{value:g}" if target["metric"] == "billed_cancelled" else ms(value))
        )
        lines.append(f"- {target['name']}: {shown_value} — {mark}")
    for warning in warnings:
        lines.append(f"- warning: {warning}")
    lines += ["", f"![{title}](results/{name}.png)", ""]
    return lines


def sessions_section() -> list[str]:
    path = RESULTS / "sessions.json"
    lines = [
        "## Sessions and streams held",
        "",
        "```sh",
        f"agent-runtime {SESSIONS_RUN}",
        "```",
        "",
    ]
    if not path.exists():
        return [*lines, "_not run_", ""]
    doc = json.loads(path.read_text())
    idle, streams = doc.get("idle") or {}, doc.get("streams") or {}
    lines += [
        "| what | count | server RSS | fds | notes |",
        "|---|---:|---:|---:|---|",
        f"| idle sessions | {idle.get('count')} | {idle.get('rss_after_mb')} MB "
        f"| {idle.get('fds_after')} | {idle.get('rss_per_session_kb')} KB per session |",
        f"| streams held | {streams.get('held')} / {streams.get('count')} "
        f"| {streams.get('rss_mb')} MB | {streams.get('fds')} | {streams.get('errors')} "
        f"errors, first event p99 {ms(streams.get('first_event_p99_ms'))} |",
        "",
    ]
    for target in doc.get("targets", []):
        mark = {True: "met", False: "**missed**", None: "no data"}[target.get("met")]
        lines.append(f"- {target['name']}: {target.get('value')} — {mark}")
    return [*lines, ""]


def store_section() -> list[str]:
    lines = ["## Durable store: finalize latency and throughput", ""]
    for name, command in STORE_RUNS:
        path = RESULTS / f"{name}.json"
        lines += ["```sh", f"python3 {command} --json results/{name}.json", "```", ""]
        if not path.exists():
            lines += ["_not run_", ""]
            continue
        doc = json.loads(path.read_text())
        if any(config.startswith("runtime") for config in doc["results"]):
            lines += runtime_rows(doc)
            continue
        lines += [
            "| config | sessions | turns/s | finalize p50 / p99 / max | finalize-only tx/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for config, levels in doc["results"].items():
            for level in levels:
                fin = level.get("finalize") or {}
                only = level.get("finalize_only") or {}
                latency = f"{ms(fin.get('p50_ms'))} / {ms(fin.get('p99_ms'))}"
                latency += f" / {ms(fin.get('max_ms'))}"
                lines.append(
                    f"| {config} | {level.get('sessions')} | {level.get('turns_per_s', 0):.0f} "
                    f"| {latency} | {only.get('tx_per_s', 0):.0f} |"
                )
        lines.append("")
    return lines


def _p(summary: dict[str, Any] | None) -> str:
    """``p50 / p99 / max`` of a summary in ms."""
    if not summary or summary.get("p50") is None:
        return "-"
    return f"{summary['p50']:.1f} / {summary['p99']:.1f} / {summary['max']:.1f} ms"


def load_section() -> list[str]:
    name, command = LOAD_RUN
    path = RESULTS / f"{name}.json"
    lines = [
        "## Load: idle streams and paced streaming turns",
        "",
        "```sh",
        f"python3 {command} --json results/{name}.json",
        "```",
        "",
        "Against its own `agent-runtime serve` (a model that stamps each word with the "
        "server's CLOCK_MONOTONIC when it produces it); the load comes from client worker "
        "processes on the same machine (raw HTTP/1.1 over loopback). Delivery lag = client "
        "read time - production stamp; lag from due = client read time - the word's due "
        "time on the model's schedule (delivery lag + the model's lateness: what the "
        "targets are judged on, so a server that falls behind cannot pass). An idle "
        "stream is a streamed stateless response whose model is waiting.",
        "",
    ]
    if not path.exists():
        return [*lines, "_not run_", ""]
    doc = json.loads(path.read_text())
    idle, stream = doc.get("idle"), doc.get("stream")
    if idle:
        lines += [
            "| idle streams | held | errors | /health p50 / p99 / max | RSS before -> held "
            "| per stream | fds | server CPU | clients |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {idle['streams']} | {idle['held']} | {idle['errors']} | {_p(idle['health_ms'])} "
            f"| {idle['rss_before_mb']} -> {idle['rss_held_mb']} MB "
            f"| {idle['rss_per_stream_kb']} KB | {idle['fds_held']} "
            f"| {idle['server_cpu_percent_while_held']}% | {_clients(idle['client'])} |",
            "",
        ]
    if stream:
        lines += [
            "| streams x words at rate | completed | errors | deltas | duration | events/s "
            "| lag p50 / p99 / max | model late p99 | lag from due p50 / p99 / max "
            "| /health p99 | RSS peak | server CPU | clients |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {stream['streams']} x {stream['words_per_stream']} at "
            f"{stream['tokens_per_second']:g}/s | {stream['completed']} | {stream['errors']} "
            f"| {stream['deltas']} / {stream['deltas_expected']} | {stream['seconds']} s "
            f"| {stream['event_rate']} | {_p(stream['lag_ms'])} "
            f"| {ms(stream['model_late_ms'].get('p99'))} | {_p(stream.get('due_lag_ms'))} "
            f"| {ms(stream['health_ms'].get('p99'))} | {stream['rss_peak_mb']} MB "
            f"| {stream['server_cpu_percent']}% | {_clients(stream['client'])} |",
            "",
        ]
    if doc.get("capacity"):
        lines += [
            f"Capacity: the same streaming load at fewer streams "
            f"({doc['options']['capacity_duration']:g} s each), where the lag target holds:",
            "",
            "| streams | completed | errors | events/s | lag p50 / p99 / max "
            "| lag from due p50 / p99 / max | server CPU | lag target |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for phase in doc["capacity"]:
            mark = "met" if phase["lag_target_met"] else "**missed**"
            lines.append(
                f"| {phase['streams']} | {phase['completed']} | {phase['errors']} "
                f"| {phase['event_rate']} | {_p(phase['lag_ms'])} "
                f"| {_p(phase.get('due_lag_ms'))} | {phase['server_cpu_percent']}% | {mark} |"
            )
        lines.append("")
    for target in doc.get("targets", []):
        mark = "met" if target.get("met") else "**missed**"
        lines.append(f"- {target['name']}: {target.get('value')} — {mark}")
    lines.append(_load_average(doc))
    return [*lines, ""]


def floor_section() -> list[str]:
    name, command = STREAM_FLOOR_RUN
    path = RESULTS / f"{name}.json"
    lines = [
        "## Stream floor: a write and a paced event, without the runtime",
        "",
        "```sh",
        f"python3 {command} --json results/{name}.json",
        "```",
        "",
        "No runtime code (`bench/_floor.py`): the server is the benchmark process (one trio "
        "loop), the client a separate Python process on the same machine reading raw "
        "sockets; server CPU is `time.process_time()` over the run. Write cost: one 167-byte "
        "SSE frame per write through bare trio (`SocketStream.send_all`), hypercorn's trio "
        "worker with a bare ASGI app, and hypercorn + quart-trio (an async generator, as "
        "`server/` returns). Stream floor: paced streams over socketpairs, no HTTP; models "
        "pace with `runtime._pace` (shared) or `trio.sleep_until` (trio), with stream "
        "schedules spread over one period or aligned; a writer per stream sends what is "
        "pending once per shared tick (tick 0: on every event). Lag = client read - "
        "production; lag from due = client read - scheduled time (it includes the model's "
        "lateness once the loop falls behind).",
        "",
    ]
    if not path.exists():
        return [*lines, "_not run_", ""]
    doc = json.loads(path.read_text())
    costs = doc.get("write_cost") or []
    if costs:
        base = {c["connections"]: c["us_per_write"] for c in costs if c["server"] == "trio"}
        lines += [
            "| server | connections | delivered / writes | server CPU per write | x bare trio "
            "| client CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in costs:
            ratio = base.get(c["connections"])
            lines.append(
                f"| {c['server']} | {c['connections']} | {c['delivered']} / {c['writes']} "
                f"| {c['us_per_write']:.1f} µs "
                f"| {'-' if not ratio else format(c['us_per_write'] / ratio, '.1f')} "
                f"| {c['client_cpu_percent']:.0f}% |"
            )
        lines.append("")
    runs = doc.get("stream_floor") or []
    if runs:
        lines += [
            "| pacer | tick | phases | streams x rate | delivered / expected | events/s "
            "| server CPU | CPU per event | lag p50 / p99 / max | model late p99 "
            "| lag from due p50 / p99 / max | deltas per read | client CPU |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            lines.append(
                f"| {r['pacer']} | {r['tick']:g} s | {r['phases']} "
                f"| {r['streams']} x {r['tokens_per_second']:g}/s "
                f"| {r['events_delivered']} / {r['events_expected']} "
                f"| {r['events_per_second']:.0f} | {r['server_cpu_percent']:.0f}% "
                f"| {r['us_per_event']:.1f} µs | {_p(r['lag_ms'])} "
                f"| {ms(r['model_late_ms'].get('p99'))} | {_p(r['due_lag_ms'])} "
                f"| {r['deltas_per_read']} | {r['client_cpu_percent']:.0f}% |"
            )
        lines.append("")
    for target in doc.get("targets", []):
        mark = "met" if target.get("met") else "**missed**"
        lines.append(f"- {target['name']}: {ms(target.get('value'))} — {mark}")
    lines.append(_load_average(doc))
    return [*lines, ""]


def _load_average(doc: dict[str, Any]) -> str:
    start, end = (
        " ".join(f"{x:.2f}" for x in doc.get(key) or ())
        for key in ("load_average_start", "load_average_end")
    )
    return f"- load average (1, 5, 15 min) {start} -> {end}"


def _clients(client: dict[str, Any]) -> str:
    cpu = ", ".join(f"{c:.0f}%" for c in client.get("cpu_percent", []))
    return f"{client.get('processes')} processes ({cpu} CPU)"


def crash_section() -> list[str]:
    lines = [
        "## Crash loop: SIGKILL a busy server, restart on the same data dir",
        "",
        "Each iteration starts `serve`, checks the previous crash, runs a busy load on two "
        "accounts (essays, run_shell/write_file turns, long run_shell calls with background "
        "and `setsid` children, cancels, DELETEs, stateless streams, persistent sessions, "
        "uploads), SIGKILLs it at a seeded random moment (0-1.5 s), then runs "
        "`PRAGMA integrity_check` offline. After every restart: no turn in_progress; billed "
        "set == completed set; every turn seen completed is billed, none seen cancelled is; "
        "debits == usage per account; persistent sessions listed, histories complete, files "
        "byte-identical; no tool process alive. A test hook sleeps up to 30 ms before each "
        "ledger write so kills land inside finalizes. `tests/server/test_crash_loop.py` runs "
        "the same driver at 6 (auto) + 4 (none) iterations.",
        "",
    ]
    docs = []
    for name, command in CRASH_RUNS:
        lines += ["```sh", f"python3 {command} --json results/{name}.json", "```", ""]
        path = RESULTS / f"{name}.json"
        if path.exists():
            docs.append(json.loads(path.read_text()))
    if not docs:
        return [*lines, "_not run_", ""]
    head = " | ".join(f"`--sandbox {d['options']['sandbox']}`" for d in docs)
    lines += [f"| | {head} |", "|---|" + "---:|" * len(docs)]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(str(cell(d)) for d in docs) + " |")

    row("iterations", lambda d: d["options"]["iterations"])
    row(
        "kills: before turns / mid-stream / mid tool call",
        lambda d: "{before_turns} / {mid_stream} / {mid_tool_call}".format(**d["kill_points"]),
    )
    row(
        "kills: mid-cancel / mid-finalize (uncommitted) / mid-upload",
        lambda d: "{mid_cancel} / {mid_finalize} ({finalize_uncommitted}) / {mid_upload}".format(
            **d["kill_points"]
        ),
    )
    row(
        "turns started / seen completed / seen cancelled / failed",
        lambda d: "{started} / {completed} / {cancelled} / {failed}".format(**d["totals"]),
    )
    row(
        "no terminal seen: interrupted / completed and billed",
        lambda d: "{interrupted} / {completed_unseen}".format(**d["totals"]),
    )
    row("billed (usage rows)", lambda d: d["totals"]["billed"])
    row("uploads acknowledged", lambda d: d["totals"]["uploads"])
    row(
        "tool processes alive right after a kill / after the restart",
        lambda d: "{orphans_at_kill} / {survivors}".format(**d["totals"]),
    )
    row("**violations**", lambda d: f"**{d['totals']['violations']}**")
    row("total time", lambda d: f"{d['seconds']:.0f} s")
    return [*lines, ""]


def runtime_rows(doc: dict[str, Any]) -> list[str]:
    """What a durable finalize adds to a whole turn: the SQLite store against
    the memory store, through ``Runtime`` (FINALIZING -> terminal event)."""
    lines = [
        "| store | sessions | turns/s | FINALIZING -> terminal p50 / p99 "
        "| send -> terminal p50 / p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, levels in doc["results"].items():
        store = "sqlite" if config == "runtime" else "memory"
        for level in levels:
            fin = level.get("finalize_to_terminal") or {}
            turn = level.get("send_to_terminal") or {}
            lines.append(
                f"| {store} | {level.get('sessions')} | {level.get('turns_per_s', 0):.0f} "
                f"| {ms(fin.get('p50_ms'))} / {ms(fin.get('p99_ms'))} "
                f"| {ms(turn.get('p50_ms'))} / {ms(turn.get('p99_ms'))} |"
            )
    return [*lines, ""]


def render() -> None:
    machine: dict[str, Any] = {}
    for name, *_ in CANCEL_RUNS:
        path = RESULTS / f"{name}.json"
        if path.exists():
            machine = json.loads(path.read_text())["machine"]
            break
    versions = ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items() if v)
    lines = [
        "# Benchmark results",
        "",
        "Written by `python3 benchmarks/make_results.py` (which runs every command below; "
        "`--render` only rewrites this page from `results/`). Do not edit by hand: the "
        "analysis lives in `benchmarks/ANALYSIS.md` and is included at the end.",
        "",
        f"Machine: {machine.get('cores')} cores, {machine.get('platform')}, Python "
        f"{machine.get('python')}; {versions}; commit {machine.get('git_commit')}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}. Shared and noisy: read the p99s "
        "as upper bounds.",
        "",
    ]
    for run_ in CANCEL_RUNS:
        lines += cancel_section(*run_)
    lines += sessions_section()
    lines += store_section()
    lines += load_section()
    lines += floor_section()
    lines += crash_section()
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists():
        lines += ["---", "", analysis.read_text().rstrip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only rewrite RESULTS.md")
    parser.add_argument("--only", nargs="*", help="run only these (names of results/*.json)")
    args = parser.parse_args()
    os.chdir(HERE.parent)
    if not args.render:
        run_all(set(args.only) if args.only else None)
    render()


if __name__ == "__main__":
    main()

"""Cancel latency over HTTP: N concurrent streaming turns, each cancelled mid-stream.

Starts ``agent-runtime serve`` as a subprocess (so the load generator measures
the server, not itself) and, for each concurrency level, runs N turns at once:
open the stream, wait a random time, POST the cancel, read to the terminal.

Per turn: time to headers, time to first event, ack (cancel POST -> 202), stop
(cancel POST sent -> terminal event read on the stream), deltas received
after the 202 arrived. Prints a table, writes JSON.

    python3 benchmarks/http_cancel.py --levels 1,20,100 --rounds 5 \\
        --json benchmarks/results/http_cancel.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedded_cancel import machine, percentile

KEY = "pk_bench_http"
ROOT = Path(__file__).resolve().parent.parent


class RawClient:
    """A minimal HTTP/1.1 client on trio sockets: the load generator should cost
    as little as possible per event, so that it measures the server, not itself
    (httpx adds ~2 ms per request on this machine)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def connect(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(self.host, self.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return stream

    @staticmethod
    def request(method: str, path: str, body: bytes = b"") -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    @staticmethod
    async def read_head(stream: trio.SocketStream, buf: bytearray) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        buf[:] = rest
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}

    async def call(
        self, stream: trio.SocketStream, method: str, path: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        await stream.send_all(self.request(method, path, body))
        buf = bytearray()
        status, headers = await self.read_head(stream, buf)
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            buf += await stream.receive_some(65536)
        return status, bytes(buf[:length])


async def one_turn(
    client: RawClient, cancel_after: float, results: list[dict[str, Any]], stateless: bool
) -> None:
    control = await client.connect()
    sample: dict[str, Any] = {}
    try:
        if stateless:
            sid = None
            start_path = "/v1/responses"
            start_body = b'{"input": "a 100000-word essay", "stream": true}'
        else:
            _, body = await client.call(control, "POST", "/v1/sessions", b"{}")
            sid = json.loads(body)["id"]
            start_path = f"/v1/sessions/{sid}/messages"
            start_body = b'{"message": "a 100000-word essay"}'
        delta_event = b"event: response.output_text.delta" if stateless else b"event: text.delta"
        stream = await client.connect()
        t0 = time.perf_counter()
        await stream.send_all(client.request("POST", start_path, start_body))
        buf = bytearray()
        _, headers = await client.read_head(stream, buf)
        sample["headers_ms"] = (time.perf_counter() - t0) * 1e3
        rid = headers["x-response-id"]
        while b"event: " not in buf:
            buf += await stream.receive_some(65536)
        sample["first_event_ms"] = (time.perf_counter() - t0) * 1e3
        with trio.move_on_at(t0 - time.perf_counter() + trio.current_time() + cancel_after):
            while True:
                if not await stream.receive_some(65536):
                    raise ConnectionError("stream ended before the cancel")
        acked = trio.Event()
        after_ack = 0

        async def cancel() -> None:
            sent = time.perf_counter()
            sample["cancel_sent"] = sent
            status, _ = await client.call(
                control,
                "POST",
                f"/v1/responses/{rid}/cancel"
                if stateless
                else f"/v1/sessions/{sid}/responses/{rid}/cancel",
            )
            sample["ack_ms"] = (time.perf_counter() - sent) * 1e3
            sample["ack_status"] = status
            acked.set()

        terminal = ""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel)
            tail = b""
            while not terminal:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                if acked.is_set():
                    after_ack += chunk.count(delta_event)
                tail = tail[-64:] + chunk
                match = re.search(
                    rb"event: ((?:message|response)\.(?:cancelled|completed|error|failed))\n", tail
                )
                if match:
                    terminal = match.group(1).decode()
                    sample["stop_ms"] = (time.perf_counter() - sample["cancel_sent"]) * 1e3
        await stream.aclose()
        sample["terminal"] = terminal
        sample["deltas_after_ack"] = after_ack
        del sample["cancel_sent"]
        if sid is not None:
            await client.call(control, "DELETE", f"/v1/sessions/{sid}")
    finally:
        await control.aclose()
    results.append(sample)


async def run_level(
    url: str, concurrency: int, rounds: int, rng: random.Random, stateless: bool
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    host, port = url.split("//")[1].split(":")
    client = RawClient(host, int(port))
    for _ in range(rounds):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(one_turn, client, rng.uniform(0.2, 1.0), results, stateless)
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        return await run_levels(args.url, args)
    data_dir = Path(args.data_dir)
    server = await trio.lowlevel.open_process(
        [
            sys.executable, "-c", "from server._cli import main; raise SystemExit(main())",
            "serve", "--port", "0", "--data-dir", str(data_dir), "--api-key", KEY,
            "--demo-tokens-per-second", str(args.tokens_per_second),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )  # fmt: skip
    assert server.stdout is not None
    out = b""
    while (m := re.search(rb"serving on (http://\S+)", out)) is None:
        out += await server.stdout.receive_some()
    url = m.group(1).decode()
    try:
        return await run_levels(url, args)
    finally:
        server.terminate()
        with trio.move_on_after(10):
            await server.wait()
        if server.returncode is None:
            server.kill()
            await server.wait()


async def run_levels(url: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    levels: dict[str, Any] = {}
    for level in args.levels:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.perf_counter()
        samples = await run_level(url, level, args.rounds, rng, args.stateless)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter() - wall0
        client_cpu = (cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime) / wall
        levels[str(level)] = {"samples": samples, "client_cpu": client_cpu}
    return levels


def summarize(samples: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples if key in s]
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels", default="1,20,100", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of N turns per level")
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default="/tmp/agent-runtime-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--stateless", action="store_true", help="stream POST /v1/responses instead of sessions"
    )
    parser.add_argument(
        "--url", help=f"measure this running server (its key must be {KEY}) instead of starting one"
    )
    args = parser.parse_args()
    levels = trio.run(main_async, args)
    console = Console(width=160)
    table = Table(title="HTTP cancel (ms)")
    for column in (
        "N", "turns", "headers p50", "first event p50/p99", "ack p50/p99",
        "stop p50/p99/max", "deltas after 202", "bad", "client CPU",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    report: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "json": str(args.json)}}
    for level, data in levels.items():
        samples = data["samples"]
        summary = {
            k: summarize(samples, f"{k}_ms") for k in ("headers", "first_event", "ack", "stop")
        }
        expected = "response.cancelled" if args.stateless else "message.cancelled"
        bad = sum(1 for s in samples if s["terminal"] != expected or s["ack_status"] != 202)
        after = sum(s["deltas_after_ack"] for s in samples)
        summary["deltas_after_ack_total"] = after  # type: ignore[assignment]
        summary["bad"] = bad  # type: ignore[assignment]
        summary["client_cpu"] = data["client_cpu"]
        report[level] = {"summary": summary, "samples": samples}
        cpu = data["client_cpu"]
        table.add_row(
            level,
            str(len(samples)),
            f"{summary['headers']['p50']:.1f}",
            f"{summary['first_event']['p50']:.1f}/{summary['first_event']['p99']:.1f}",
            f"{summary['ack']['p50']:.1f}/{summary['ack']['p99']:.1f}",
            f"{summary['stop']['p50']:.1f}/{summary['stop']['p99']:.1f}/{summary['stop']['max']:.1f}",
            str(after),
            f"[red]{bad}[/red]" if bad else "0",
            f"[red]{cpu:.0%}[/red]" if cpu > 0.8 else f"{cpu:.0%}",
        )
    console.print(table)
    if any(levels[level]["client_cpu"] > 0.8 for level in levels):
        console.print("[red]the client used > 80% of a core: it may be the bottleneck[/red]")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""Slow and stalled clients (issue 9, point 6), on a real ``agent-runtime serve``.

A reader that never reads fills its socket, and hypercorn's write to it then
blocks (shielded: no cancel reaches it, STACK-NOTES 4). What must hold:

* the turn never writes to a socket (turn -> its buffer -> one SSE writer per
  client), so other streams, a cancel, and billing go on as if it were not there;
* what a stalled reader pins in the server's memory is one SSE write, not the
  rest of the turn: 20 readers stalled at the start of a 20,000-event turn add
  a few MB, where writing the whole backlog at once would add 20 x ~4 MB;
* shutdown still ends (the serve code exits once its graceful timeout has
  passed) with stalled readers attached;
* finished requests release their sockets (no fd growth), SSE streams outlive
  the framework's response and keep-alive timeouts, and the listen backlog
  holds 1,000 connects made while the server is not accepting.

Stalled readers are raw sockets with a tiny ``SO_RCVBUF``; that a write really
is blocked is read from the kernel (``/proc/net/tcp``: the server side of the
connection has unacknowledged bytes queued), never assumed after a sleep.
These tests use the real clock with ``trio.fail_after`` guards.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import attrs
import httpx
import psutil
import pytest
import trio
from hypercorn.trio import serve

from runtime import MemoryStore, Pricing, Runtime, TextChunk, UsageChunk
from server import create_app
from server._serve import GRACEFUL_TIMEOUT, hypercorn_config

from ..fakes import FakeModel
from .conftest import KEY as HARNESS_KEY, parse_sse
from .served import KEY, Served, run_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

HEADERS: Final = {"Authorization": f"Bearer {KEY}"}
#: The stalled client's receive buffer (the kernel doubles it and keeps a floor).
TINY_RCVBUF: Final = 4096
#: Readers stalled at the start of the long finished turn, and its length in words.
STALLED_RESUMERS: Final = 20
LONG_TURN_WORDS: Final = 20_000
NORMAL_STREAMS: Final = 100
NORMAL_WORDS: Final = 30
#: Server RSS growth allowed while the stalled resumers hang (bytes). Each pins
#: one SSE write (<= server._app.MAX_EVENTS_PER_WRITE events of ~130 bytes,
#: ~33 KB, plus h11's framed copy of it) and a connection (~30 KB, STACK-NOTES
#: 9): ~0.1 MB each, 2 MB for 20; the rest is allocator slack and the probes'
#: own requests. Writing the whole backlog at once pins 20,000 x ~130 bytes
#: (~2.6 MB, twice with h11's copy) per reader: 50-100 MB for 20 (measured:
#: +190 MB with a 30,000-word turn).
STALL_RSS_BOUND: Final = 24 * 2**20
#: Server RSS growth allowed over the stalled reader's turn and the 100 other
#: streams (bytes): those 100 finished turns stay in memory for their grace
#: period (~40 events each) and the stalled turn's buffer grows at ~1,000
#: events/s (a few thousand events of a few hundred bytes): ~5 MB, plus ~30 KB
#: per connection and allocator slack. Unbounded buffering for the stalled
#: client would add every frame of its turn on top.
STREAMS_RSS_BOUND: Final = 32 * 2**20
PLAIN_REQUESTS: Final = 500
#: Server descriptors allowed above the baseline after the plain requests
#: (the store's files, a connection hypercorn has not closed yet, ...).
FD_SLACK: Final = 10
SIMULTANEOUS_CONNECTS: Final = 1_000


# -- kernel views ------------------------------------------------------------------


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def tcp_rows() -> list[tuple[int, int, int, int, int]]:
    """IPv4 TCP sockets of this machine: (local port, remote port, state, tx, rx).

    For a listening socket (state 0x0A) ``rx`` is its accept queue's length.
    """
    rows = []
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            tx, rx = (int(part, 16) for part in fields[4].split(":"))
            rows.append((_port(fields[1]), _port(fields[2]), int(fields[3], 16), tx, rx))
    return rows


def server_queued(server_port: int, client_port: int) -> int:
    """Bytes the server wrote to the connection from ``client_port`` that the
    client has not acknowledged (not read into its full window); -1 if gone."""
    for local, remote, _, tx, _ in tcp_rows():
        if local == server_port and remote == client_port:
            return tx
    return -1


async def wait_stalled(server_port: int, socks: list[trio.socket.SocketType]) -> None:
    """Poll until the server has bytes queued on every one of ``socks``' connections
    (it wrote more than the client's window: its write is blocked)."""
    ports = [s.getsockname()[1] for s in socks]
    while True:
        queued = {p: server_queued(server_port, p) for p in ports}
        assert all(q != -1 for q in queued.values()), f"a stalled connection was closed: {queued}"
        if all(q > 0 for q in queued.values()):
            return
        await trio.sleep(0.02)


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port``."""
    return sum(rx for local, _, state, _, rx in tcp_rows() if local == port and state == 0x0A)


# -- raw clients -------------------------------------------------------------------


def http_request(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    parts = urlsplit(url)
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def stalled_reader(url: str, request: bytes) -> trio.socket.SocketType:
    """A socket that sends ``request`` and never reads (tiny receive window)."""
    parts = urlsplit(url)
    sock = trio.socket.socket()
    # Before connect: the window scale is fixed at the handshake.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
    await sock.connect((parts.hostname, parts.port))
    sent = 0
    while sent < len(request):
        sent += await sock.send(request[sent:])
    return sock


def rss(served: Served) -> int:
    return int(psutil.Process(served.process.pid).memory_info().rss)


def fds(served: Served) -> int:
    return int(psutil.Process(served.process.pid).num_fds())


@attrs.define
class Output:
    """What the server printed so far; ``ended`` is set at its end of file."""

    data: bytearray = attrs.field(factory=bytearray)
    ended: trio.Event = attrs.field(factory=trio.Event)


@asynccontextmanager
async def draining(served: Served) -> AsyncIterator[Output]:
    """Read the server's output while the block runs (a full pipe would block
    its logging, and so its event loop)."""
    output = Output()
    assert served.process.stdout is not None
    stdout = served.process.stdout

    async def drain() -> None:
        while chunk := await stdout.receive_some():
            output.data.extend(chunk)
        output.ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        yield output
        nursery.cancel_scope.cancel()


async def poll(condition: Callable[[], bool], interval: float = 0.02) -> None:
    """Return once ``condition()`` is true, checking every ``interval`` seconds
    (the kernel's state and another process's descriptors send no event)."""
    while True:
        if condition():
            return
        await trio.sleep(interval)


async def stream_turn(client: httpx.AsyncClient, words: int) -> tuple[str, str, float]:
    """A new session and a ``words``-word turn read to its end; check every event
    arrived in order. Returns the session and response ids, and the seconds to
    the terminal."""
    created = await client.post("/v1/sessions", json={})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    started = time.perf_counter()
    body = {"message": f"Write a {words}-word essay on backpressure"}
    async with client.stream("POST", f"/v1/sessions/{sid}/messages", json=body) as response:
        assert response.status_code == 200, await response.aread()
        events = parse_sse((await response.aread()).decode())
    elapsed = time.perf_counter() - started
    assert [e.id for e in events] == list(range(len(events)))
    assert events[-1].event == "message.completed", events[-1]
    assert sum(e.event == "text.delta" for e in events) == words
    return sid, response.headers["X-Response-Id"], elapsed


# -- the tests ---------------------------------------------------------------------


@asynccontextmanager
async def serving(tmp_path: Path, *extra: str) -> AsyncIterator[tuple[Served, Output]]:
    """``agent-runtime serve`` with ``extra`` flags, its output drained."""
    async with run_server(tmp_path, *extra) as served, draining(served) as output:
        yield served, output


def client_for(served: Served) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=served.url,
        headers=HEADERS,
        timeout=60,
        limits=httpx.Limits(max_connections=NORMAL_STREAMS + 10),
    )


@pytest.mark.slow
async def test_stalled_readers_pin_one_write_each_and_shutdown_still_ends(
    tmp_path: Path,
) -> None:
    """20 readers stalled at the start of a 20,000-event turn add a few MB to the
    server (one write each, not the turn); SIGTERM still ends the server."""
    async with serving(tmp_path, "--demo-tokens-per-second", "0") as (served, output):
        port = urlsplit(served.url).port
        assert port is not None
        stalled: list[trio.socket.SocketType] = []
        try:
            with trio.fail_after(60):
                async with client_for(served) as client:
                    sid, rid, _ = await stream_turn(client, LONG_TURN_WORDS)
                resume = http_request(
                    served.url, "GET", f"/v1/sessions/{sid}/responses/{rid}/events"
                )
                rss_before = rss(served)
                for _ in range(STALLED_RESUMERS):
                    stalled.append(await stalled_reader(served.url, resume))
                await wait_stalled(port, stalled)
                grown = rss(served) - rss_before
                assert grown < STALL_RSS_BOUND, f"{STALLED_RESUMERS} stalled readers: +{grown} B"

            # Their writes cannot be cancelled (hypercorn shields them), so the
            # server drains, waits out its graceful timeout, and exits anyway.
            served.process.send_signal(signal.SIGTERM)
            with trio.fail_after(GRACEFUL_TIMEOUT + 1 + 15):
                await served.process.wait()
            assert served.process.returncode == 0
            with trio.fail_after(5):
                await output.ended.wait()
            assert b"draining" in output.data
            assert b"exiting without it" in output.data
        finally:
            for sock in stalled:
                sock.close()


@pytest.mark.slow
async def test_stalled_reader_holds_up_neither_other_streams_nor_its_cancel(
    tmp_path: Path,
) -> None:
    """While a turn's only reader is stalled, 100 other streams complete with
    every event, and that turn's cancel is acked (202), ends it cancelled and
    unbilled; the server's memory stays within a bound."""
    async with (
        serving(tmp_path, "--demo-tokens-per-second", "1000") as (served, _),
        client_for(served) as client,
    ):
        port = urlsplit(served.url).port
        assert port is not None
        with trio.fail_after(60):
            sid = (await client.post("/v1/sessions", json={})).json()["id"]
            post = http_request(
                served.url,
                "POST",
                f"/v1/sessions/{sid}/messages",
                {"message": "Write a 1000000-word essay on stalled readers"},
            )
            rss_before = rss(served)
            sock = await stalled_reader(served.url, post)
            with sock:
                await wait_stalled(port, [sock])
                session = (await client.get(f"/v1/sessions/{sid}")).json()
                rid = session["active_response_id"]
                assert session["busy"]
                assert rid is not None

                times: list[float] = []
                rids: list[str] = []

                async def normal() -> None:
                    _, rid, elapsed = await stream_turn(client, NORMAL_WORDS)
                    rids.append(rid)
                    times.append(elapsed)

                async with trio.open_nursery() as nursery:
                    for _ in range(NORMAL_STREAMS):
                        nursery.start_soon(normal)
                assert len(rids) == NORMAL_STREAMS
                assert server_queued(port, sock.getsockname()[1]) > 0  # still stalled

                got = await client.post(f"/v1/sessions/{sid}/responses/{rid}/cancel")
                assert got.status_code == 202, got.text
                state = (await client.get(f"/v1/sessions/{sid}/responses/{rid}")).json()
                last = state["last_sequence_number"]
                tail = await client.get(
                    f"/v1/sessions/{sid}/responses/{rid}/events",
                    params={"last_event_id": last - 1},
                )
                terminal = parse_sse(tail.text)[-1]
                assert terminal.event == "message.cancelled", terminal
                assert terminal.data["reason"] == "client_cancel"
                records = (await client.get("/v1/usage", params={"limit": 1000})).json()
                billed = {r["response_id"] for r in records["records"]}
                assert rid not in billed
                assert billed == set(rids)
                grown = rss(served) - rss_before
                assert grown < STREAMS_RSS_BOUND, f"+{grown} B"
                print(
                    f"{NORMAL_STREAMS} streams beside a stalled reader: "
                    f"max {max(times) * 1e3:.0f} ms; RSS +{grown / 2**20:.1f} MB",
                    file=sys.stderr,
                )


async def test_finished_requests_release_their_sockets(tmp_path: Path) -> None:
    """500 finished plain requests (Connection: close, and keep-alive closed by
    the client) leave the server's descriptor count where it was."""
    async with run_server(tmp_path) as served, draining(served):
        parts = urlsplit(served.url)
        host, port = parts.hostname, parts.port
        assert host is not None
        assert port is not None
        routes = [
            ("GET", "/health", {}),
            ("GET", "/v1/sessions", {"Authorization": f"Bearer {KEY}"}),
            ("GET", "/v1/sessions", {}),  # 401
            ("GET", "/v1/sessions/nope", {"Authorization": f"Bearer {KEY}"}),  # 404
        ]

        async def one(n: int) -> None:
            method, path, headers = routes[n % len(routes)]
            close = n % 2 == 0
            lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            if close:
                lines.append("Connection: close")
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = await stream.receive_some()
                    assert chunk, received
                    received += chunk
                head, _, body = received.partition(b"\r\n\r\n")
                assert head.split(b" ")[1] in (b"200", b"401", b"404"), head
                if close:
                    # The server closes after the response: read to EOF.
                    while chunk := await stream.receive_some():
                        body += chunk
                else:
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        chunk = await stream.receive_some()
                        assert chunk
                        body += chunk

        with trio.fail_after(60):
            await one(0)  # warm up (first-request imports and allocations)
            baseline = fds(served)
            limiter = trio.CapacityLimiter(20)

            async def limited(n: int) -> None:
                async with limiter:
                    await one(n)

            async with trio.open_nursery() as nursery:
                for n in range(PLAIN_REQUESTS):
                    nursery.start_soon(limited, n)
            # The server may close its side a moment after the client has read.
            await poll(lambda: fds(served) <= baseline + FD_SLACK)


@pytest.mark.slow
async def test_listen_backlog_holds_a_thousand_connects(tmp_path: Path) -> None:
    """1,000 connects made while the server is stopped (SIGSTOP: nothing is
    accepted) all wait in the accept queue, and all are served after SIGCONT."""
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
        somaxconn = int(f.read())
    if somaxconn < SIMULTANEOUS_CONNECTS:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: the kernel caps any backlog there")
    async with run_server(tmp_path) as served, draining(served):
        parts = urlsplit(served.url)
        host, port = parts.hostname, parts.port
        assert host is not None
        assert port is not None
        socks: list[trio.socket.SocketType] = []
        statuses: list[bytes] = []
        os.kill(served.process.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(30):
                for _ in range(SIMULTANEOUS_CONNECTS):
                    raw = socket.socket()
                    raw.setblocking(False)
                    # The handshake completes in the kernel, without the server.
                    assert raw.connect_ex((host, port)) in (0, errno.EINPROGRESS)
                    socks.append(trio.socket.from_stdlib_socket(raw))
                # A smaller backlog caps the queue there (the rest of the SYNs are
                # dropped and retried a second or more later).
                await poll(lambda: accept_queue(port) >= SIMULTANEOUS_CONNECTS)
        finally:
            os.kill(served.process.pid, signal.SIGCONT)

        async def health(sock: trio.socket.SocketType) -> None:
            request = f"GET /health HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
            await sock.send(request.encode())
            received = b""
            while chunk := await sock.recv(65536):
                received += chunk
            statuses.append(received.split(b" ", 2)[1])

        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for sock in socks:
                        nursery.start_soon(health, sock)
        finally:
            for sock in socks:
                sock.close()
        assert statuses == [b"200"] * SIMULTANEOUS_CONNECTS


async def test_sse_stream_outlives_framework_timeouts(tmp_path: Path) -> None:
    """With quart's RESPONSE_TIMEOUT and hypercorn's keep-alive timeout at 0.3 s, a
    stream that lasts over 1 s still ends with its terminal event."""
    model = FakeModel([[TextChunk("before "), "block", TextChunk("after"), UsageChunk(1, 2)]])
    store = MemoryStore()
    store.ensure_account_for_key(HARNESS_KEY)
    async with Runtime.open(
        data_dir=tmp_path, model=model, store=store, prices={"fake": Pricing(1.0, 2.0)}
    ) as rt:
        app = create_app(rt)
        app.config["RESPONSE_TIMEOUT"] = 0.3
        config = hypercorn_config("127.0.0.1", 0)
        config.keep_alive_timeout = 0.3
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, app, config, shutdown_trigger=trio.sleep_forever)
            )
            headers = {"Authorization": f"Bearer {HARNESS_KEY}"}
            async with httpx.AsyncClient(base_url=binds[0], headers=headers, timeout=30) as client:
                sid = (await client.post("/v1/sessions", json={})).json()["id"]
                url = f"/v1/sessions/{sid}/messages"

                async def release() -> None:
                    # Hold the stream open past both timeouts (real time: the
                    # timeouts are wall-clock).
                    await model.blocked.wait()
                    await trio.sleep(1.2)
                    model.gate.set()

                with trio.fail_after(30):
                    async with (
                        client.stream("POST", url, json={"message": "hi"}) as response,
                        trio.open_nursery() as inner,
                    ):
                        assert response.status_code == 200
                        started = trio.current_time()
                        inner.start_soon(release)
                        text = (await response.aread()).decode()
                    assert trio.current_time() - started >= 1.2
            nursery.cancel_scope.cancel()
    events = parse_sse(text)
    assert [e.id for e in events] == list(range(len(events)))
    assert events[-1].event == "message.completed"
    assert "".join(e.data["content"] for e in events if e.event == "text.delta") == "before after"

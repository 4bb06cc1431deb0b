"""Crash loop: SIGKILL a busy ``agent-runtime serve`` at random moments and
restart it on the same data dir, checking what a crash may and may not lose
(issue 9, point 4). Used by ``tests/server/test_crash_loop.py`` (a few
iterations) and ``benchmarks/crash_loop.py`` (the full count).

Theory of operation
-------------------
One data dir, ``iterations`` server processes in a row. Each iteration:

1. **start** ``agent-runtime serve`` on the data dir (demo model at
   ``tokens_per_second``, two API keys = two accounts) and wait for
   ``serving on``, i.e. for its start-up (recovery included) to be over;
2. **verify** the previous iteration's crash against the restarted server
   (see *Invariants*);
3. **load**: concurrent clients on both accounts: essays on persistent
   sessions, ``run_shell``/``write_file`` tool turns that complete, long
   ``run_shell`` calls (``sleep 300`` in the foreground, one in the
   background and one that called ``setsid``) that are cancelled, deleted
   with their ephemeral session or left running (one of them from the
   start of every iteration), essays cancelled
   mid-stream, streamed stateless ``POST /v1/responses`` (some cancelled),
   new persistent sessions and file uploads of known content;
4. **kill**: after a random delay (seeded; 10 % of them under 50 ms, the
   rest up to ``max_kill_delay``), note what the clients have seen (the
   kill point), SIGKILL the server and cancel every client, all in one
   synchronous step: the clients only ever see what the server sent before
   it died;
5. **offline**: with no server running, ``PRAGMA integrity_check`` on a
   read-only connection; note the kill point and the marked tool processes
   still alive.

After the last iteration one more start verifies the last crash, then that
server is SIGKILLed too (it is idle).

The server runs with one test hook, installed by the ``-c`` code before the
console script's ``main`` (as ``tests/server/test_crash.py`` does):
``Runtime._for_testing_finalizing`` appends the turn's id to a log file and
then sleeps up to ``finalize_delay`` (uniform), i.e. a store that takes a few
milliseconds to commit, so that kills land inside finalizes often enough to
be counted. Nothing else of the server is changed.

Tool processes are found by a per-run marker: every ``run_shell`` command of
the load contains it and exports it (``CRASHLOOP_MARK``), so the shell has it
in ``/proc/PID/cmdline`` and every process it starts, ``setsid`` or not, in
``/proc/PID/environ``. Zombies count as dead. Survivors are reported, then
SIGKILLed (so that each iteration is judged on its own and nothing is left
behind).

Invariants (each violation is a line in ``violations``)
--------------------------------------------------------
After each kill, before the restart:

* ``PRAGMA integrity_check`` is ``ok``.

After each restart, once it prints ``serving on`` (the database read through
a read-only connection while the idle server runs, plus the HTTP API):

* no turn is ``in_progress`` in the database, and none of the turns the
  clients left without a terminal event reads ``in_progress`` over the API;
* **billed set == completed set**: the response ids of the ``usage`` table
  are exactly the ids of the ``turns`` rows whose status is ``completed``
  (``usage.response_id`` is the primary key, so each is billed once);
* every turn whose terminal ``message.completed``/``response.completed`` a
  client received is in that set; no turn whose ``*.cancelled`` or
  ``*.error``/``response.failed`` a client received is; a turn the client
  did not see end may be either (it completed and was billed, or it is
  ``cancelled``, ``interrupted`` when it was running at the kill);
* every response id a client was given (``X-Response-Id``) has a row;
* per account: balance at the first start - balance now == sum of the
  account's ``usage.credits`` (within 1e-6);
* every persistent session whose ``POST /v1/sessions`` returned 201 is
  listed by ``GET /v1/sessions`` (and in the ``sessions`` table); its
  history (``GET .../messages``) holds each of its turns the clients saw,
  none ``in_progress``, the ones seen completed as ``completed``; every
  file whose ``PUT`` returned 201 is byte-identical on disk and over HTTP
  (the last iteration's uploads; all of them on disk);
* no ephemeral session is listed, and ``workspaces/`` holds nothing but
  listed sessions' directories;
* no marked tool process is alive, polled for ``process_grace`` seconds
  after the restarted server has finished its start-up (a kill signal needs
  a moment to take effect, and a sweep may run just after start-up).

During the load: every request gets the status it should (200, 201, 202,
204; a cancel may also find the turn ``already_complete``), every stream
ends with a terminal event, and no turn ends ``failed``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._rawhttp import FrameSplitter, Origin, ProtocolError, event_type

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

#: Two API keys, so the ledger is checked per account.
KEYS: Final = ("pk_crash_alice", "pk_crash_bob")
DB_NAME: Final = "agent-runtime.db"
#: The environment variable every tool command of the load exports.
MARK_VAR: Final = "CRASHLOOP_MARK"
#: Kill points (an iteration may hit several).
KILL_POINTS: Final = (
    "before_turns",  # no turn had sent its first event yet
    "mid_stream",  # a turn was streaming text
    "mid_tool_call",  # a turn was inside a run_shell/write_file call
    "mid_cancel",  # a cancel or DELETE was accepted, its terminal not yet seen
    "mid_finalize",  # a turn had entered its finalize, its terminal not yet seen
    "finalize_uncommitted",  # ... and its ledger transaction had not committed
    "mid_upload",  # a file PUT had not been answered
)
TERMINAL: Final = {
    "message.completed": "completed",
    "response.completed": "completed",
    "message.cancelled": "cancelled",
    "response.cancelled": "cancelled",
    "message.error": "failed",
    "response.failed": "failed",
    "response.incomplete": "failed",
}
_STREAMING: Final = frozenset({"text.delta", "response.output_text.delta"})
_HOOK: Final = """
import os, random, trio
import server._serve as serving

_original = serving.serve
_log = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
_rng = random.Random()

async def _finalizing(turn):
    os.write(_log, (turn.id + "\\n").encode())
    await trio.sleep(_rng.uniform(0, {delay!r}))

async def _serve(rt, **kwargs):
    rt._for_testing_finalizing = _finalizing
    await _original(rt, **kwargs)

serving.serve = _serve
from server._cli import main
raise SystemExit(main())
"""


@attrs.frozen(kw_only=True)
class CrashLoopOptions:
    """What one crash loop does."""

    iterations: int = 100
    seed: int = 1
    #: ``serve --sandbox``: ``auto`` (bubblewrap when it works here: tools die
    #: with the server) or ``none`` (left for the next start-up's sweep).
    sandbox: str = "auto"
    #: The kill comes at most this long after the load starts.
    max_kill_delay: float = 1.5
    tokens_per_second: float = 2000.0
    #: The finalize hook sleeps uniform(0, this) before the ledger write.
    finalize_delay: float = 0.03
    #: How long marked tool processes may take to vanish after a start-up.
    process_grace: float = 3.0
    start_timeout: float = 60.0
    request_timeout: float = 30.0

    def __attrs_post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, not {self.iterations!r}")
        if not self.max_kill_delay > 0.05:
            raise ValueError(f"max_kill_delay must be > 0.05 s, not {self.max_kill_delay!r}")


@attrs.define(kw_only=True)
class IterationReport:
    """One crash: what was in flight, and what the restart found."""

    index: int
    kill_delay: float
    kill_points: list[str] = attrs.Factory(list)
    #: Turns given a response id in this iteration, and how their clients saw them end.
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    in_flight: int = 0
    #: Found after the restart: in-flight turns now cancelled(interrupted), and
    #: in-flight turns completed (and billed) though the client never saw it.
    interrupted: int = 0
    completed_unseen: int = 0
    #: Usage rows in the database after the restart (all iterations so far).
    billed_total: int = 0
    uploads: int = 0
    files_checked: int = 0
    #: Marked tool processes alive right after the kill, and after the restart.
    orphans_at_kill: int = 0
    survivors: int = 0
    #: Long tool calls whose processes the marker scan saw while they ran.
    detector_hits: int = 0
    #: Its server's start-up; start-up to the offline checks' end; the
    #: checks after the next start-up.
    start_seconds: float = 0.0
    seconds: float = 0.0
    verify_seconds: float = 0.0
    violations: list[str] = attrs.Factory(list)


@attrs.define(kw_only=True)
class CrashLoopResult:
    options: CrashLoopOptions
    iterations: list[IterationReport]
    seconds: float
    start_seconds: list[float]

    @property
    def violations(self) -> list[str]:
        return [f"iteration {r.index}: {v}" for r in self.iterations for v in r.violations]

    def kill_point_counts(self) -> dict[str, int]:
        return {p: sum(p in r.kill_points for r in self.iterations) for p in KILL_POINTS}

    def totals(self) -> dict[str, int]:
        fields = (
            "started",
            "completed",
            "cancelled",
            "failed",
            "in_flight",
            "interrupted",
            "completed_unseen",
            "uploads",
            "orphans_at_kill",
            "survivors",
            "detector_hits",
        )
        totals = {f: sum(getattr(r, f) for r in self.iterations) for f in fields}
        totals["billed"] = self.iterations[-1].billed_total if self.iterations else 0
        totals["violations"] = len(self.violations)
        return totals

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "crash_loop",
            "options": attrs.asdict(self.options),
            "seconds": self.seconds,
            "start_seconds": self.start_seconds,
            "kill_points": self.kill_point_counts(),
            "totals": self.totals(),
            "violations": self.violations,
            "iterations": [attrs.asdict(r) for r in self.iterations],
        }


# -- processes -----------------------------------------------------------------


def marked_processes(marker: str) -> list[int]:
    """Pids of live processes (zombies count as dead) whose command line or
    environment contains ``marker``."""
    needle = marker.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                marked = needle in f.read()
            if not marked:
                with open(f"/proc/{name}/environ", "rb") as f:
                    marked = needle in f.read()
            if not marked:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the database, read-only ---------------------------------------------------


@attrs.frozen
class Ledger:
    integrity: list[str]
    #: id -> (status, session id, cancel reason)
    turns: dict[str, tuple[str, str | None, str | None]]
    #: response id -> (account, credits)
    usage: dict[str, tuple[str, float]]
    balances: dict[str, float]
    sessions: dict[str, str]  # id -> account

    @property
    def completed(self) -> set[str]:
        return {rid for rid, (status, _, _) in self.turns.items() if status == "completed"}


def read_ledger(db: Path, *, integrity: bool) -> Ledger:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        checked = (
            [row[0] for row in conn.execute("PRAGMA integrity_check")] if integrity else ["ok"]
        )
        turns = {
            row[0]: (row[1], row[2], row[3])
            for row in conn.execute(
                "SELECT id, status, session_id, json_extract(record, '$.cancel_reason') FROM turns"
            )
        }
        usage = {
            row[0]: (row[1], row[2])
            for row in conn.execute("SELECT response_id, account_id, credits FROM usage")
        }
        balances = dict(conn.execute("SELECT id, balance FROM accounts").fetchall())
        sessions = dict(conn.execute("SELECT id, account_id FROM sessions").fetchall())
    finally:
        conn.close()
    return Ledger(checked, turns, usage, balances, sessions)


# -- the server ----------------------------------------------------------------


@attrs.define(eq=False)
class _Server:
    process: trio.Process
    url: str


async def _start_server(
    options: CrashLoopOptions, data_dir: Path, logs: Path, index: int
) -> tuple[_Server, float]:
    log = logs / f"serve-{index}.log"
    code = _HOOK.format(log=str(logs / f"finalizing-{index}.log"), delay=options.finalize_delay)
    command = [
        sys.executable, "-c", code, "serve", "--port", "0", "--data-dir", str(data_dir),
        "--api-key", KEYS[0], "--api-key", KEYS[1],
        "--demo-tokens-per-second", f"{options.tokens_per_second:g}",
        "--sandbox", options.sandbox,
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # A terminal's Ctrl-C reaches only us; we kill the server ourselves.
            start_new_session=True,
        )
    try:
        with trio.fail_after(options.start_timeout):
            while True:
                text = (await trio.Path(log).read_bytes()).decode(errors="replace")
                if (match := re.search(r"serving on (http://\S+)", text)) is not None:
                    return _Server(process, match.group(1)), time.perf_counter() - started
                if process.returncode is not None:
                    raise RuntimeError(
                        f"the server exited ({process.returncode}) before serving:\n{text[-3000:]}"
                    )
                await trio.sleep(0.02)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _kill(process)
        raise


async def _kill(process: trio.Process) -> None:
    if process.returncode is None:
        process.kill()
    await process.wait()


@attrs.frozen
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class _Api:
    """HTTP to the server, one connection per request, with bench's raw
    client: no async generator is left half-read when the load is cancelled
    at the kill (httpx's would be, and warn)."""

    origins: tuple[Origin, ...]
    timeout: float

    @classmethod
    def to(cls, url: str, timeout: float) -> _Api:
        return cls(tuple(Origin.parse(url, key) for key in KEYS), timeout)

    async def __call__(
        self, account: int, method: str, path: str, body: bytes | dict[str, Any] | None = None
    ) -> _Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body else b""
        with trio.fail_after(self.timeout):
            conn = await self.origins[account].connect()
            try:
                head, raw = await conn.request(method, path, data)
            finally:
                await conn.aclose()
        return _Reply(head.status, head.headers, raw)


# -- the load ------------------------------------------------------------------


@attrs.define(eq=False, kw_only=True)
class _Turn:
    id: str
    kind: str
    account: int
    session_id: str | None
    iteration: int
    #: started | created | streaming | tool | completed | cancelled | failed
    state: str = "started"
    cancel_sent: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "cancelled", "failed")

    def on_event(self, event: str) -> None:
        if self.terminal:
            return
        if event in TERMINAL:
            self.state = TERMINAL[event]
        elif event in ("message.created", "response.created"):
            self.state = "created"
        elif event == "tool_use.executing":
            self.state = "tool"
        elif event in _STREAMING or event == "tool_result":
            self.state = "streaming"


@attrs.define(eq=False, kw_only=True)
class _Persistent:
    account: int
    files: dict[str, bytes] = attrs.Factory(dict)
    #: Turns of this session whose response id a client got.
    turns: list[str] = attrs.Factory(list)


@attrs.define(eq=False)
class _State:
    """What the clients know, across iterations."""

    marker: str
    turns: dict[str, _Turn] = attrs.Factory(dict)
    persistent: dict[str, _Persistent] = attrs.Factory(dict)
    ephemeral: set[str] = attrs.Factory(set)
    initial_balances: dict[str, float] = attrs.Factory(dict)
    counter: int = 0

    def next(self) -> int:
        self.counter += 1
        return self.counter


class _Stop(Exception):
    """A worker met an unexpected answer (already recorded); it stops."""


@attrs.define(eq=False)
class _Load:
    """One iteration's clients."""

    state: _State
    report: IterationReport
    api: _Api
    uploads_in_flight: int = 0

    def violation(self, text: str) -> None:
        self.report.violations.append(text)

    def expect(self, reply: _Reply, *statuses: int, what: str) -> None:
        if reply.status not in statuses:
            self.violation(f"{what}: HTTP {reply.status} {reply.body[:300]!r}")
            raise _Stop

    # -- turns --

    async def turn(
        self,
        account: int,
        url: str,
        body: dict[str, Any],
        kind: str,
        session_id: str | None,
        on_event: Callable[[_Turn, str], Awaitable[None]] | None = None,
    ) -> _Turn:
        """POST a turn and read its stream to the terminal event."""
        conn = await self.api.origins[account].connect()
        try:
            await conn.send("POST", url, json.dumps(body).encode())
            head = await conn.read_head()
            if head.status != 200:
                self.expect(
                    _Reply(head.status, head.headers, await conn.read_body(head)),
                    200,
                    what=f"POST {url}",
                )
            turn = _Turn(
                id=head.headers["x-response-id"],
                kind=kind,
                account=account,
                session_id=session_id,
                iteration=self.report.index,
            )
            self.state.turns[turn.id] = turn
            self.report.started += 1
            if session_id in self.state.persistent:
                self.state.persistent[session_id].turns.append(turn.id)
            stream, frames = conn.body(head), FrameSplitter()
            while not turn.terminal and (data := await stream.receive()):
                for frame in frames.feed(data):
                    if (name := event_type(frame)) is None:
                        continue
                    turn.on_event(name.decode())
                    if on_event is not None:
                        await on_event(turn, name.decode())
                    if turn.terminal:
                        break
        finally:
            await conn.aclose()
        if not turn.terminal:
            self.violation(f"{turn.id}: the stream ended without a terminal event")
            raise _Stop
        if turn.state == "failed":
            self.violation(f"{turn.id} ({kind}) failed")
        return turn

    async def cancel(self, turn: _Turn, url: str) -> None:
        turn.cancel_sent = True
        self.expect(await self.api(turn.account, "POST", url), 200, 202, what=f"cancel {turn.id}")

    def long_command(self) -> tuple[str, str]:
        """A run_shell line that runs until killed, and its own marker."""
        mark = f"{self.state.marker}-{self.state.next()}"
        return mark, (
            f"run: export {MARK_VAR}={mark}; (setsid sleep 300 &); sleep 300 & sleep 300; "
            f"echo {mark}"
        )

    async def detect(self, mark: str) -> None:
        """Check that the marker scan sees a running long tool call."""
        with trio.move_on_after(3):
            while True:
                if len(await trio.to_thread.run_sync(marked_processes, mark)) >= 3:
                    self.report.detector_hits += 1
                    return
                await trio.sleep(0.05)

    # -- workers --

    async def essays(self, account: int, sid: str, rng: random.Random) -> None:
        """Essays on a persistent session, with uploads between them."""
        while True:
            if rng.random() < 0.25:
                await self.upload(account, sid, rng)
            words = rng.randint(20, 200)
            message = f"Write a {words}-word essay on crash {self.report.index}"
            await self.turn(
                account, f"/v1/sessions/{sid}/messages", {"message": message}, "essay", sid
            )

    async def tools(self, account: int, sid: str, rng: random.Random) -> None:
        """Tool turns on a persistent session: short ones that complete, and a
        long run_shell that is cancelled or left running."""
        while True:
            if rng.random() < 0.35:
                await self.long_tool(account, sid, rng, rng.choice(("cancel", "hold", "hold")))
            else:
                await self.short_tool(account, sid)

    async def short_tool(self, account: int, sid: str) -> None:
        n = self.state.next()
        message = f"run: echo {self.state.marker} {n}\nwrite out/{n}.txt: crash loop {n}"
        await self.turn(account, f"/v1/sessions/{sid}/messages", {"message": message}, "tool", sid)

    async def long_tool(self, account: int, sid: str, rng: random.Random, end: str) -> None:
        """A long run_shell call, then ``end``: ``cancel`` the turn, ``delete``
        the session, or ``hold`` it (running until the kill)."""
        mark, command = self.long_command()

        async def on_event(turn: _Turn, event: str) -> None:
            if event != "tool_use.executing":
                return
            if self.report.detector_hits == 0:
                await self.detect(mark)
            if end == "hold":
                return
            await trio.sleep(rng.uniform(0, 0.2))
            if end == "cancel":
                await self.cancel(turn, f"/v1/sessions/{sid}/responses/{turn.id}/cancel")
            else:
                turn.cancel_sent = True
                reply = await self.api(account, "DELETE", f"/v1/sessions/{sid}")
                self.expect(reply, 204, what=f"DELETE {sid}")

        turn = await self.turn(
            account,
            f"/v1/sessions/{sid}/messages",
            {"message": command},
            "long_tool",
            sid,
            on_event,
        )
        if turn.state != "cancelled":
            self.violation(f"{turn.id}: long tool turn ended {turn.state}, not cancelled")
            raise _Stop

    async def ephemeral_tools(self, account: int, rng: random.Random) -> None:
        """Ephemeral sessions: a short tool turn, then a long one that is
        cancelled, ended by DELETE, or left running."""
        while True:
            sid = await self.new_session(account, persistent=False)
            await self.short_tool(account, sid)
            await self.long_tool(account, sid, rng, rng.choice(("cancel", "hold", "delete")))

    async def held_tool(self, account: int, rng: random.Random) -> None:
        """One long run_shell call from the start, running until the kill (so
        nearly every crash has tool processes to leave behind)."""
        await self.long_tool(
            account, await self.new_session(account, persistent=False), rng, "hold"
        )

    async def cancels(self, account: int, rng: random.Random) -> None:
        """Long essays on ephemeral sessions, cancelled after a few deltas."""
        while True:
            sid = await self.new_session(account, persistent=False)
            after = rng.randint(1, 40)
            deltas = 0

            async def on_event(turn: _Turn, event: str, sid: str = sid, after: int = after) -> None:
                nonlocal deltas
                if event == "text.delta":
                    deltas += 1
                    if deltas == after:
                        await self.cancel(turn, f"/v1/sessions/{sid}/responses/{turn.id}/cancel")

            message = "Write a 100000-word essay on interruptions"
            turn = await self.turn(
                account, f"/v1/sessions/{sid}/messages", {"message": message}, "cancel", sid,
                on_event,
            )  # fmt: skip
            if turn.state != "cancelled":
                self.violation(f"{turn.id}: cancelled essay ended {turn.state}")
                raise _Stop
            if rng.random() < 0.5:
                reply = await self.api(account, "DELETE", f"/v1/sessions/{sid}")
                self.expect(reply, 204, what=f"DELETE {sid}")

    async def stateless(self, account: int, rng: random.Random) -> None:
        """Streamed stateless responses; some cancelled mid-stream."""
        while True:
            words = rng.randint(20, 300)
            cancel_after = rng.randint(1, 20) if rng.random() < 0.3 else -1
            deltas = 0

            async def on_event(turn: _Turn, event: str, cancel_after: int = cancel_after) -> None:
                nonlocal deltas
                if event == "response.output_text.delta":
                    deltas += 1
                    if deltas == cancel_after:
                        await self.cancel(turn, f"/v1/responses/{turn.id}/cancel")

            body = {"input": f"Write a {words}-word essay on restarts", "stream": True}
            await self.turn(account, "/v1/responses", body, "stateless", None, on_event)

    async def sessions_and_files(self, rng: random.Random) -> None:
        """Maybe a new persistent session, then uploads of known content."""
        if rng.random() < 0.5:
            await self.new_session(rng.randrange(len(KEYS)), persistent=True)
        for _ in range(10):
            await trio.sleep(rng.uniform(0, 0.15))
            sid = rng.choice(sorted(self.state.persistent))
            await self.upload(self.state.persistent[sid].account, sid, rng)

    async def new_session(self, account: int, *, persistent: bool) -> str:
        reply = await self.api(account, "POST", "/v1/sessions", {"persistent": persistent})
        self.expect(reply, 201, what="POST /v1/sessions")
        sid: str = reply.json()["id"]
        if persistent:
            self.state.persistent[sid] = _Persistent(account=account)
        else:
            self.state.ephemeral.add(sid)
        return sid

    async def upload(self, account: int, sid: str, rng: random.Random) -> None:
        path = f"it{self.report.index}/f{self.state.next()}.bin"
        content = rng.randbytes(rng.randint(1, 8192))
        self.uploads_in_flight += 1
        reply = await self.api(account, "PUT", f"/v1/sessions/{sid}/files/{path}", content)
        self.uploads_in_flight -= 1
        self.expect(reply, 201, what=f"PUT {path}")
        self.state.persistent[sid].files[path] = content
        self.report.uploads += 1

    async def guarded(self, worker: Callable[[], Awaitable[None]]) -> None:
        try:
            await worker()
        except _Stop:
            pass
        except (OSError, ProtocolError, trio.TooSlowError, ValueError, KeyError) as exc:
            # Before the kill (the clients are cancelled with it): a bug.
            self.violation(f"client error: {type(exc).__name__}: {exc}")


# -- the loop ------------------------------------------------------------------


async def run_crash_loop(
    options: CrashLoopOptions,
    work_dir: Path,
    *,
    on_iteration: Callable[[IterationReport], object] | None = None,
) -> CrashLoopResult:
    """Run the crash loop in ``work_dir`` (its ``data`` and ``logs``).

    Cancellation: the server running at that moment is SIGKILLed and the
    marked tool processes still alive are SIGKILLed.
    """
    data_dir, logs = work_dir / "data", work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = _State(marker=f"crashloop-{options.seed}-{secrets.token_hex(6)}")
    master = random.Random(options.seed)
    reports: list[IterationReport] = []
    starts: list[float] = []
    began = time.perf_counter()
    server: _Server | None = None
    try:
        for index in range(options.iterations + 1):
            iteration_began = time.perf_counter()
            server, seconds = await _start_server(options, data_dir, logs, index)
            starts.append(seconds)
            api = _Api.to(server.url, options.request_timeout)
            if index == 0:
                await _setup(state, api, data_dir)
            else:
                last = reports[-1]
                verify_began = time.perf_counter()
                await _verify(state, last, api, data_dir, options)
                last.verify_seconds = time.perf_counter() - verify_began
                if on_iteration is not None:
                    on_iteration(last)
            if index == options.iterations:
                break
            rng = random.Random(master.getrandbits(64))
            delay = (
                rng.uniform(0, 0.05)
                if rng.random() < 0.1
                else rng.uniform(0.05, options.max_kill_delay)
            )
            report = IterationReport(index=index, kill_delay=delay, start_seconds=seconds)
            reports.append(report)
            await _crash(state, report, api, server, rng)
            await _after_kill(state, report, data_dir, logs)
            report.seconds = time.perf_counter() - iteration_began
        return CrashLoopResult(
            options=options,
            iterations=reports,
            seconds=time.perf_counter() - began,
            start_seconds=starts,
        )
    finally:
        with trio.CancelScope(shield=True):
            if server is not None:
                await _kill(server.process)
            kill_pids(marked_processes(state.marker))


async def _setup(state: _State, api: _Api, data_dir: Path) -> None:
    """The first start: note the balances; two persistent sessions per account."""
    ledger = await trio.to_thread.run_sync(lambda: read_ledger(data_dir / DB_NAME, integrity=False))
    state.initial_balances = dict(ledger.balances)
    for account in range(len(KEYS)):
        for _ in range(2):
            reply = await api(account, "POST", "/v1/sessions", {"persistent": True})
            if reply.status != 201:
                raise RuntimeError(f"setup: POST /v1/sessions: {reply.status} {reply.body!r}")
            state.persistent[reply.json()["id"]] = _Persistent(account=account)


async def _crash(
    state: _State,
    report: IterationReport,
    api: _Api,
    server: _Server,
    rng: random.Random,
) -> None:
    """Run the load, SIGKILL the server after ``report.kill_delay``."""
    load = _Load(state, report, api)
    bases: dict[int, list[str]] = {0: [], 1: []}
    for sid, session in list(state.persistent.items())[:4]:  # the setup's four
        bases[session.account].append(sid)
    workers: list[Callable[[], Awaitable[None]]] = []
    for account in range(len(KEYS)):
        essay_sid, tool_sid = bases[account]
        seeds = [rng.getrandbits(64) for _ in range(5)]
        workers += [
            functools.partial(load.essays, account, essay_sid, random.Random(seeds[0])),
            functools.partial(load.tools, account, tool_sid, random.Random(seeds[1])),
            functools.partial(load.stateless, account, random.Random(seeds[2])),
        ]
    seeds = [rng.getrandbits(64) for _ in range(4)]
    workers += [
        functools.partial(load.held_tool, 0, random.Random(seeds[3])),
        functools.partial(load.ephemeral_tools, 1, random.Random(seeds[0])),
        functools.partial(load.cancels, 0, random.Random(seeds[1])),
        functools.partial(load.sessions_and_files, random.Random(seeds[2])),
    ]
    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(load.guarded, worker)
        await trio.sleep(report.kill_delay)
        # One synchronous step: note what the clients saw, kill, stop the clients.
        turns = [t for t in state.turns.values() if t.iteration == report.index]
        points = report.kill_points
        if all(t.state == "started" for t in turns):
            points.append("before_turns")
        if any(t.state == "streaming" for t in turns):
            points.append("mid_stream")
        if any(t.state == "tool" for t in turns):
            points.append("mid_tool_call")
        if any(t.cancel_sent and not t.terminal for t in turns):
            points.append("mid_cancel")
        if load.uploads_in_flight:
            points.append("mid_upload")
        server.process.kill()
        nursery.cancel_scope.cancel()
    await server.process.wait()
    # Counted again: a client task already woken with data when the kill came
    # ran on until its next checkpoint (what it read was sent before the kill).
    turns = [t for t in state.turns.values() if t.iteration == report.index]
    report.completed = sum(t.state == "completed" for t in turns)
    report.cancelled = sum(t.state == "cancelled" for t in turns)
    report.failed = sum(t.state == "failed" for t in turns)
    report.in_flight = sum(not t.terminal for t in turns)


async def _after_kill(state: _State, report: IterationReport, data_dir: Path, logs: Path) -> None:
    """No server runs: check the file, note the finalizes in flight and the orphans."""
    report.orphans_at_kill = len(await trio.to_thread.run_sync(marked_processes, state.marker))
    ledger = await trio.to_thread.run_sync(lambda: read_ledger(data_dir / DB_NAME, integrity=True))
    if ledger.integrity != ["ok"]:
        report.violations.append(f"integrity_check after the kill: {ledger.integrity[:5]}")
    log = logs / f"finalizing-{report.index}.log"
    finalizing = (await trio.Path(log).read_text()).split() if log.exists() else []
    caught = [rid for rid in finalizing if rid in state.turns and not state.turns[rid].terminal]
    if caught:
        report.kill_points.append("mid_finalize")
        if any(rid not in ledger.usage for rid in caught):
            report.kill_points.append("finalize_uncommitted")


async def _verify(
    state: _State,
    report: IterationReport,
    api: _Api,
    data_dir: Path,
    options: CrashLoopOptions,
) -> None:
    """The restarted server against what the clients knew (see the module doc)."""
    problems = report.violations
    started = time.perf_counter()
    ledger = await trio.to_thread.run_sync(lambda: read_ledger(data_dir / DB_NAME, integrity=False))
    report.billed_total = len(ledger.usage)

    # Turns and the ledger.
    running = sorted(rid for rid, (status, _, _) in ledger.turns.items() if status == "in_progress")
    if running:
        problems.append(f"turns still in_progress after the restart: {running[:5]}")
    billed, completed = set(ledger.usage), ledger.completed
    if billed != completed:
        problems.append(
            f"billed set != completed set: billed only {sorted(billed - completed)[:5]}, "
            f"completed only {sorted(completed - billed)[:5]}"
        )
    for rid, turn in state.turns.items():
        if rid not in ledger.turns:
            problems.append(f"{rid}: a client got its id, the store has no row")
        elif turn.state == "completed" and rid not in billed:
            problems.append(f"{rid}: seen completed, not billed")
        elif turn.state in ("cancelled", "failed") and rid in billed:
            problems.append(f"{rid}: seen {turn.state}, billed")
    mine = [t for t in state.turns.values() if t.iteration == report.index]
    for turn in mine:
        if turn.terminal or turn.id not in ledger.turns:
            continue
        status, _, reason = ledger.turns[turn.id]
        if status == "completed":
            report.completed_unseen += 1
        elif status == "cancelled" and reason == "interrupted":
            report.interrupted += 1
    for account_id, initial in state.initial_balances.items():
        debited = initial - ledger.balances.get(account_id, math.nan)
        charged = sum(c for a, c in ledger.usage.values() if a == account_id)
        if not abs(debited - charged) <= 1e-6:
            problems.append(f"account {account_id}: debited {debited!r} != usage {charged!r}")

    # In-flight turns over the API: none still running.
    for turn in mine:
        if turn.terminal:
            continue
        if turn.session_id is None:
            url = f"/v1/responses/{turn.id}"
        elif turn.session_id in state.persistent:
            url = f"/v1/sessions/{turn.session_id}/responses/{turn.id}"
        else:
            continue  # its ephemeral session is gone: the database said enough
        got = await api(turn.account, "GET", url)
        if got.status != 200 or got.json().get("status") == "in_progress":
            problems.append(f"GET {url} after the restart: {got.status} {got.body[:200]!r}")

    # Sessions, histories and files.
    listed: set[str] = set()
    for account in range(len(KEYS)):
        got = await api(account, "GET", "/v1/sessions")
        ids = {s["id"] for s in got.json()} if got.status == 200 else set()
        listed |= ids
        for sid, session in state.persistent.items():
            if session.account == account and sid not in ids:
                problems.append(f"persistent session {sid} is not listed after the restart")
    if gone := state.ephemeral & listed:
        problems.append(f"ephemeral sessions listed after the restart: {sorted(gone)[:5]}")
    if lost := set(state.persistent) - set(ledger.sessions):
        problems.append(f"persistent sessions missing from the store: {sorted(lost)[:5]}")
    workspaces = data_dir / "workspaces"
    if extra := set(os.listdir(workspaces)) - listed:
        problems.append(f"workspaces left that no listed session owns: {sorted(extra)[:5]}")
    for sid, session in state.persistent.items():
        if sid not in listed:
            continue
        recent = [rid for rid in session.turns if state.turns[rid].iteration == report.index]
        if recent:
            got = await api(session.account, "GET", f"/v1/sessions/{sid}/messages")
            history = {h["id"]: h["status"] for h in got.json()} if got.status == 200 else {}
            for rid in recent:
                seen = state.turns[rid].state
                found = history.get(rid)
                if found in (None, "in_progress") or (seen == "completed" and found != seen):
                    problems.append(f"{sid} history: {rid} is {found}, seen {seen}")
        for path, content in session.files.items():
            report.files_checked += 1
            on_disk = await trio.Path(workspaces / sid / path).read_bytes()
            if on_disk != content:
                problems.append(f"{sid}/{path}: {len(on_disk)} bytes on disk, not the uploaded")
            if path.startswith(f"it{report.index}/"):
                got = await api(session.account, "GET", f"/v1/sessions/{sid}/files/{path}")
                if got.status != 200 or got.body != content:
                    problems.append(f"GET {sid}/{path}: {got.status}, not the uploaded bytes")

    # Tool processes: none may survive a start-up (plus a grace for signals).
    with trio.move_on_after(max(0.0, options.process_grace - (time.perf_counter() - started))):
        while True:
            if not await trio.to_thread.run_sync(marked_processes, state.marker):
                break
            await trio.sleep(0.05)
    if survivors := await trio.to_thread.run_sync(marked_processes, state.marker):
        report.survivors = len(survivors)
        problems.append(
            f"{len(survivors)} tool processes survived the crash and the restart: "
            + "; ".join(_describe(pid) for pid in survivors[:4])
        )
        kill_pids(survivors)  # last resort, so the next iteration is judged alone


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[:80]}"


__all__ = [
    "KILL_POINTS",
    "CrashLoopOptions",
    "CrashLoopResult",
    "IterationReport",
    "marked_processes",
    "run_crash_loop",
]

"""Store and disk faults over HTTP (issue 9, point 5).

A store write that fails (each write of a realistic sequence in turn, and
each statement of the ledger transaction inside SQLite), a full database and
a full or size-limited workspace. Whatever fails: the request gets its
documented answer (503 ``store_error`` when a turn cannot be admitted), a
turn that had started ends with its error terminal event naming
``store_error``, the ledger (read from the SQLite file by a connection of the
test's own) bills exactly the turns clients saw complete, the server keeps
serving meanwhile, and once the store or disk has room again the same
requests succeed.

A tool that hits the disk (a full workspace, or the per-call file-size limit)
is the tool's failure, not the turn's: the model gets an error result and the
turn goes on (see the module's last tests).
"""

from __future__ import annotations

import itertools
import json
import resource
import sqlite3
import subprocess
from collections import Counter
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx
import pytest
import trio
from hypercorn.trio import serve

from runtime import (
    Pricing,
    Runtime,
    SQLiteStore,
    StoreError,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    UsageChunk,
)
from runtime._sqlite import database_path
from server import create_app
from server._serve import hypercorn_config

from ..fakes import DelegatingStore
from .conftest import KEY, SSE, parse_sse

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Iterator
    from pathlib import Path

    from runtime import (
        IdempotencyRecord,
        ModelChunk,
        ModelRequest,
        SessionRecord,
        TurnRecord,
        UsageRecord,
    )

PRICES: Final = {"fake": Pricing(1_000_000.0, 2_000_000.0)}  # 1 credit/input, 2/output token
CREDITS: Final = 1000.0
TIMEOUT: Final = 30.0
STORE_ERROR: Final = "store_error"
#: Every kind of write the runtime makes to its store.
WRITE_KINDS: Final = frozenset(
    {
        "save_session",
        "delete_session",
        "begin_turn",
        "complete_turn",
        "end_turn",
        "put_idempotency_key",
    }
)


# -- a model scripted by the user's message ---------------------------------------------


@attrs.define(eq=False)
class ScriptModel:
    """Acts on the last message: ``fail`` raises; ``big:N`` answers N
    characters; ``tool:{"name", "arguments"}`` calls that tool (then answers
    ``done`` once its result is back); anything else answers ``ok``."""

    name: str = "fake"

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        last = request.messages[-1]
        await trio.lowlevel.checkpoint()
        if last.role == "tool":
            yield TextChunk("done")
        elif last.content == "fail":
            raise RuntimeError("model exploded")
        elif last.content.startswith("big:"):
            yield TextChunk("x" * int(last.content.removeprefix("big:")))
        elif last.content.startswith("tool:"):
            call = json.loads(last.content.removeprefix("tool:"))
            yield ToolCallStart("call_1", call["name"])
            yield ToolCallDelta("call_1", json.dumps(call["arguments"]))
        else:
            yield TextChunk("ok")
        yield UsageChunk(3, 2)


# -- a store that fails its Nth write -----------------------------------------------------


@attrs.define(eq=False)
class FailingStore(DelegatingStore):
    """The real store, except that the ``n``-th write of one kind after
    :meth:`arm` fails with :class:`StoreError`, as a write whose transaction
    was rolled back: nothing of it is stored. A failing ``end_turn`` (which
    never raises: the SQLite store writes it later, in its thread, logging
    failures) is a record that never reaches the database.

    Writes are counted per kind, not overall: a turn's idempotency key and
    its ledger transaction are written in either order (the turn task and the
    request race), and "the second begin_turn" names the same request in
    every run where "the fourth write" does not.
    """

    #: Every write since :meth:`arm`, in order.
    writes: list[str] = attrs.field(factory=list)
    fail_at: tuple[str, int] | None = None
    #: The kinds of the writes that failed, in order.
    failed: list[str] = attrs.field(factory=list)
    #: Ids of turns whose end record was lost.
    lost_ends: set[str] = attrs.field(factory=set)

    def arm(self, kind: str | None = None, n: int = 1) -> None:
        """Fail the ``n``-th (1-based) write of ``kind`` from now; None: none."""
        self.writes.clear()
        self.fail_at = None if kind is None else (kind, n)

    def _fails(self, kind: str) -> bool:
        self.writes.append(kind)
        if self.fail_at == (kind, self.writes.count(kind)):
            self.failed.append(kind)
            return True
        return False

    async def _refuse(self, kind: str) -> None:
        await trio.lowlevel.checkpoint()
        raise StoreError(f"the store failed: injected fault on {kind} {self.fail_at}")

    async def begin_turn(self, record: TurnRecord) -> None:
        if self._fails("begin_turn"):
            await self._refuse("begin_turn")
        await self.inner.begin_turn(record)

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        if self._fails("complete_turn"):
            await self._refuse("complete_turn")
        return await self.inner.complete_turn(usage, record)

    def end_turn(self, record: TurnRecord) -> None:
        if self._fails("end_turn"):
            self.lost_ends.add(record.id)
            return
        self.inner.end_turn(record)

    async def save_session(self, record: SessionRecord) -> None:
        if self._fails("save_session"):
            await self._refuse("save_session")
        await self.inner.save_session(record)

    async def delete_session(self, session_id: str) -> None:
        if self._fails("delete_session"):
            await self._refuse("delete_session")
        await self.inner.delete_session(session_id)

    async def put_idempotency_key(self, record: IdempotencyRecord) -> None:
        if self._fails("put_idempotency_key"):
            await self._refuse("put_idempotency_key")
        await self.inner.put_idempotency_key(record)


# -- the server, and the ledger as the database file has it ---------------------------------


@attrs.define
class Server:
    rt: Runtime
    store: FailingStore
    sqlite: SQLiteStore
    client: httpx.AsyncClient
    account: str
    #: Ids of the turns whose stream ended completed (what must be billed).
    completed: set[str] = attrs.field(factory=set)
    #: Persistent sessions whose DELETE answered 204 but whose row stayed.
    undeleted: set[str] = attrs.field(factory=set)
    #: Every turn a client saw, and the URL that started it.
    seen: dict[str, str] = attrs.field(factory=dict)

    async def ledger(self) -> Ledger:
        """The ledger as committed in the database file (end records queued
        before this call included)."""
        await self.sqlite.run(lambda conn: None)  # after the queued writes
        return await trio.to_thread.run_sync(read_ledger, self.sqlite.path, self.account)

    async def check_ledger(self) -> Ledger:
        """Billed == the turns clients saw complete, each once; the balance is
        the initial credits less exactly their usage; no turn is left running
        but those whose end record was lost."""
        ledger = await self.ledger()
        assert set(ledger.usage) == self.completed
        assert {rid for rid, s in ledger.turns.items() if s == "completed"} == self.completed
        assert ledger.balance == pytest.approx(CREDITS - sum(ledger.usage.values()))
        running = {rid for rid, s in ledger.turns.items() if s == "in_progress"}
        assert running == self.store.lost_ends & set(ledger.turns)
        assert self.rt.statistics().running_turns == 0
        return ledger


@attrs.frozen
class Ledger:
    usage: dict[str, float]  # response id -> credits
    turns: dict[str, str]  # response id -> status
    sessions: set[str]
    balance: float


def read_ledger(path: Path, account: str) -> Ledger:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        usage = {
            str(r): float(c) for r, c in conn.execute("SELECT response_id, credits FROM usage")
        }
        turns = {str(i): str(s) for i, s in conn.execute("SELECT id, status FROM turns")}
        sessions = {str(i) for (i,) in conn.execute("SELECT id FROM sessions")}
        (balance,) = conn.execute(
            "SELECT balance FROM accounts WHERE id = ?", (account,)
        ).fetchone()
    finally:
        conn.close()
    return Ledger(usage, turns, sessions, float(balance))


@asynccontextmanager
async def open_server(data_dir: Path, **runtime_kwargs: Any) -> AsyncIterator[Server]:
    """SQLite store (behind a FailingStore), runtime and server on 127.0.0.1:0."""
    async with SQLiteStore.open(database_path(data_dir)) as sqlite:
        account = await sqlite.ensure_account_for_key(KEY, credits=CREDITS)
        store = FailingStore(sqlite)
        async with Runtime.open(
            data_dir=data_dir, model=ScriptModel(), store=store, prices=PRICES, **runtime_kwargs
        ) as rt:
            config = hypercorn_config("127.0.0.1", 0)
            async with trio.open_nursery() as nursery:
                serving = partial(
                    serve, create_app(rt), config, shutdown_trigger=trio.sleep_forever
                )
                binds = await nursery.start(serving)
                async with httpx.AsyncClient(
                    base_url=binds[0],
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=TIMEOUT,
                    transport=httpx.AsyncHTTPTransport(verify=False),  # no CA store to load
                ) as client:
                    yield Server(rt, store, sqlite, client, account)
                nursery.cancel_scope.cancel()


# -- requests ---------------------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    rid: str | None = None
    events: list[SSE] = attrs.field(factory=list)
    body: Any = None
    retry_after: str | None = None

    @property
    def terminal(self) -> SSE:
        return self.events[-1]

    def error(self) -> str | None:
        """The error text of a ``message.error`` / ``response.failed`` terminal."""
        data = self.terminal.data
        if self.terminal.event == "message.error":
            return str(data["error"])
        if self.terminal.event == "response.failed":
            return str(data["response"]["error"]["message"])
        return None


async def post_stream(client: httpx.AsyncClient, url: str, body: Any, key: str) -> Answer:
    """POST a streamed turn; read its stream to the end (or its error body)."""
    async with client.stream("POST", url, json=body, headers={"Idempotency-Key": key}) as r:
        raw = (await r.aread()).decode()
    if r.status_code != 200:
        assert r.headers["Content-Type"].startswith("application/json")
        return Answer(r.status_code, body=json.loads(raw), retry_after=r.headers.get("Retry-After"))
    events = parse_sse(raw)
    assert [e.id for e in events] == list(range(len(events)))
    terminals = [e for e in events if e.event.split(".")[-1] in ("completed", "error", "failed")]
    terminals = [e for e in terminals if e.event.startswith(("message.", "response."))]
    assert terminals == [events[-1]], [e.event for e in events]
    return Answer(200, r.headers["X-Response-Id"], events)


_keys = itertools.count()


def new_key() -> str:
    return f"key-{next(_keys)}"


async def run_turn(s: Server, url: str, body: dict[str, Any], *, fails_with: str | None) -> Answer:
    """Start a turn until it runs to its end (at most 3 tries); return its stream.

    Each try's outcome must be a documented one: 503 ``store_error`` (not
    admitted: the same key is free to retry), a stream ending in an error that
    names ``store_error`` (the failed turn keeps its key: retry with a new
    one), or the turn's own ending (``fails_with``: the model's error, else
    completed). Every fault the store injected shows as exactly one of these,
    or is one the client cannot see (an idempotency key or an end record
    that was not stored).
    """
    key = new_key()
    stateless = url == "/v1/responses"
    for _ in range(3):
        faults = len(s.store.failed)
        answer = await post_stream(s.client, url, body, key)
        if answer.status == 503:
            assert answer.body["error"] == STORE_ERROR, answer.body
            assert answer.retry_after == "1"  # not admitted: safe to retry
            assert s.store.failed[faults:] == ["begin_turn"]
            continue
        assert answer.status == 200, answer
        assert answer.rid is not None
        s.seen[answer.rid] = url
        got = await get_turn(s, url, answer.rid, stateless)
        error = answer.error()
        if error is not None and error.startswith(STORE_ERROR):
            assert s.store.failed[faults:] == ["complete_turn"]
            assert got == ("failed", error)
            key = new_key()
            continue
        # Any fault now is one the client cannot see.
        assert set(s.store.failed[faults:]) <= {"put_idempotency_key", "end_turn"}
        if fails_with is None:
            assert answer.terminal.event.endswith(".completed"), answer.events[-1]
            assert got == ("completed", None)
            s.completed.add(answer.rid)
        else:
            assert error is not None
            assert fails_with in error
            assert got == ("failed", error)
        # An idempotent retry replays the same turn, whatever was stored.
        again = await post_stream(s.client, url, body, key)
        assert (again.rid, again.events) == (answer.rid, answer.events)
        return answer
    raise AssertionError(f"{url}: no success in 3 tries")


async def get_turn(s: Server, url: str, rid: str, stateless: bool) -> tuple[str, str | None]:
    """(status, error) of a turn, as GET answers it."""
    if stateless:
        got = await s.client.get(f"/v1/responses/{rid}")
        assert got.status_code == 200, got.text
        body = got.json()
        return body["status"], body["error"] and body["error"]["message"]
    sid = url.split("/")[3]
    got = await s.client.get(f"/v1/sessions/{sid}/responses/{rid}")
    assert got.status_code == 200, got.text
    return got.json()["status"], got.json().get("error")


async def create_session(s: Server) -> str:
    """A persistent session (its creation writes to the store), with one retry."""
    for _ in range(2):
        faults = len(s.store.failed)
        r = await s.client.post("/v1/sessions", json={"persistent": True})
        if r.status_code == 503:
            assert r.json()["error"] == STORE_ERROR
            assert s.store.failed[faults:] == ["save_session"]
            continue
        assert r.status_code == 201, r.text
        return str(r.json()["id"])
    raise AssertionError("no session in 2 tries")


async def scenario(s: Server) -> None:
    """Every kind of store write, over HTTP: a persistent session, a turn, a
    failing turn, a stateless response, and the session's deletion."""
    sid = await create_session(s)
    messages = f"/v1/sessions/{sid}/messages"
    await run_turn(s, messages, {"message": "hello"}, fails_with=None)
    await run_turn(s, messages, {"message": "fail"}, fails_with="internal_error (RuntimeError)")
    body = {"model": "fake", "input": "hello", "stream": True}
    await run_turn(s, "/v1/responses", body, fails_with=None)
    faults = len(s.store.failed)
    deleted = await s.client.delete(f"/v1/sessions/{sid}")
    assert deleted.status_code == 204
    assert (await s.client.get(f"/v1/sessions/{sid}")).status_code == 404
    ledger = await s.ledger()
    # A failed delete leaves the row (documented: the session comes back
    # after a restart and can be deleted then); else it is gone.
    assert (sid in ledger.sessions) == (s.store.failed[faults:] == ["delete_session"])
    if sid in ledger.sessions:
        s.undeleted.add(sid)
    assert (await s.client.get("/health")).status_code == 200


# -- 1. the Nth write fails ---------------------------------------------------------------


async def test_faults_every_store_write_failing_in_turn(tmp_path: Path) -> None:
    """For each write of the scenario (every write kind, every occurrence),
    that write fails: each request gets a documented answer, the ledger bills
    exactly the completed turns, the retry succeeds; then a clean scenario
    succeeds first time, and a restart on the same data dir finds the ledger
    unchanged and no turn left running."""
    with trio.fail_after(60):
        async with open_server(tmp_path) as s:
            s.store.arm(None)
            await scenario(s)
            clean = Counter(s.store.writes)
            assert set(clean) == WRITE_KINDS, clean
            await s.check_ledger()
            sweep = [(kind, n) for kind, count in clean.items() for n in range(1, count + 1)]
            for i, (kind, n) in enumerate(sweep):
                s.store.arm(kind, n)
                await scenario(s)
                assert s.store.failed[i:] == [kind], (kind, n, s.store.failed)  # it fired, once
                await s.check_ledger()
            # Recovered: no fault, everything succeeds first time.
            s.store.arm(None)
            await scenario(s)
            assert len(s.store.failed) == len(sweep)
            before = await s.check_ledger()
            lost, undeleted = set(s.store.lost_ends), set(s.undeleted)
        assert lost
        assert undeleted
        async with open_server(tmp_path) as again:
            again.completed = s.completed
            after = await again.check_ledger()  # nothing running: the lost ends recovered
            assert (after.usage, after.balance) == (before.usage, before.balance)
            assert {after.turns[rid] for rid in lost} == {"cancelled"}  # "interrupted"
            for sid in undeleted:  # back, as documented, and deletable now
                assert (await again.client.get(f"/v1/sessions/{sid}")).status_code == 200
                assert (await again.client.delete(f"/v1/sessions/{sid}")).status_code == 204
            assert not (await again.ledger()).sessions & undeleted
            # Every turn, now only in the store, answers GET with its final status.
            for rid, url in s.seen.items():
                status, _ = await get_turn(again, url, rid, url == "/v1/responses")
                assert status == after.turns[rid]
            await scenario(again)
            await again.check_ledger()


# -- 2. a statement of the ledger transaction fails inside SQLite ---------------------------

#: Temp triggers on the store's own connection that make one statement of
#: the ledger transaction fail for real (``RAISE(ABORT)``, an IntegrityError
#: inside the transaction), when ``fault.armed`` names it. The end record of
#: the failed turn (status ``failed``) is not hit, nor a touch of a session
#: that has nothing billed.
TRIGGERS: Final = (
    "CREATE TEMP TABLE fault (armed TEXT)",
    "INSERT INTO fault VALUES (NULL)",
    "CREATE TEMP TRIGGER fault_usage BEFORE INSERT ON main.usage "
    "WHEN (SELECT armed FROM fault) = 'usage' BEGIN SELECT RAISE(ABORT, 'fault'); END",
    "CREATE TEMP TRIGGER fault_debit BEFORE UPDATE ON main.accounts "
    "WHEN (SELECT armed FROM fault) = 'debit' BEGIN SELECT RAISE(ABORT, 'fault'); END",
    "CREATE TEMP TRIGGER fault_insert_turn BEFORE INSERT ON main.turns "
    "WHEN (SELECT armed FROM fault) = 'turn' AND NEW.status = 'completed' "
    "BEGIN SELECT RAISE(ABORT, 'fault'); END",
    "CREATE TEMP TRIGGER fault_update_turn BEFORE UPDATE ON main.turns "
    "WHEN (SELECT armed FROM fault) = 'turn' AND NEW.status = 'completed' "
    "BEGIN SELECT RAISE(ABORT, 'fault'); END",
    "CREATE TEMP TRIGGER fault_touch BEFORE UPDATE ON main.sessions "
    "WHEN (SELECT armed FROM fault) = 'touch' "
    "AND EXISTS (SELECT 1 FROM main.usage WHERE session_id = NEW.id) "
    "BEGIN SELECT RAISE(ABORT, 'fault'); END",
)


def execute(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute(sql)


async def arm_sql(s: Server, statement: str | None) -> None:
    await s.sqlite.run(lambda conn: conn.execute("UPDATE fault SET armed = ?", (statement,)))


@pytest.mark.parametrize("statement", ["usage", "debit", "turn", "touch"])
async def test_faults_ledger_statement_failing_rolls_back_the_whole_charge(
    tmp_path: Path, statement: str
) -> None:
    """A statement of complete_turn failing in SQLite (usage row, debit, final
    record, session touch): the turn ends store_error, nothing of its charge
    is left (no usage row, balance intact, record 'failed'); disarmed, the
    next turn of the same session is billed once."""
    with trio.fail_after(TIMEOUT):
        async with open_server(tmp_path) as s:
            for sql in TRIGGERS:
                await s.sqlite.run(partial(execute, sql=sql))
            sid = await create_session(s)
            urls = [f"/v1/sessions/{sid}/messages"]
            if statement != "touch":  # a stateless response has no session to touch
                urls.append("/v1/responses")
            for url in urls:
                body = {"message": "hi"} if "sessions" in url else {"input": "hi", "stream": True}
                await arm_sql(s, statement)
                answer = await post_stream(s.client, url, body, new_key())
                error = answer.error()
                assert error is not None
                assert error.startswith(STORE_ERROR), answer.events[-1]
                assert "fault" in error
                assert answer.rid is not None
                ledger = await s.check_ledger()
                assert ledger.turns[answer.rid] == "failed"
                assert await get_turn(s, url, answer.rid, url == "/v1/responses") == (
                    "failed",
                    error,
                )
                await arm_sql(s, None)
                await run_turn(s, url, body, fails_with=None)
            ledger = await s.check_ledger()
            assert len(ledger.usage) == len(urls)


# -- 3. the database's disk is full ------------------------------------------------------------


async def test_faults_full_database_over_http(tmp_path: Path) -> None:
    """SQLite full (PRAGMA max_page_count): a turn whose record does not fit
    ends store_error unbilled, one whose input does not fit is refused 503
    store_error, the server answers meanwhile; with room again turns bill."""
    with trio.fail_after(TIMEOUT):
        async with open_server(tmp_path) as s:
            sid = (await s.client.post("/v1/sessions", json={})).json()["id"]
            url = f"/v1/sessions/{sid}/messages"

            def fill(conn: sqlite3.Connection) -> None:
                (pages,) = conn.execute("PRAGMA page_count").fetchone()
                conn.execute(f"PRAGMA max_page_count = {int(pages)}")

            await s.sqlite.run(fill)
            answer = await post_stream(s.client, url, {"message": "big:300000"}, new_key())
            error = answer.error()
            assert error is not None
            assert error.startswith(STORE_ERROR), answer.events[-1]
            assert "full" in error
            assert answer.rid is not None
            assert await get_turn(s, url, answer.rid, False) == ("failed", error)
            refused = await post_stream(s.client, url, {"message": "y" * 600_000}, new_key())
            assert refused.status == 503
            assert refused.retry_after == "1"
            assert refused.body["error"] == STORE_ERROR
            assert "full" in refused.body["message"]
            assert (await s.client.get("/health")).status_code == 200
            assert (await s.client.get(f"/v1/sessions/{sid}/messages")).status_code == 200
            ledger = await s.check_ledger()
            assert ledger.usage == {}

            await s.sqlite.run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
            await run_turn(s, url, {"message": "big:300000"}, fails_with=None)
            body = {"input": "hi", "stream": True}
            await run_turn(s, "/v1/responses", body, fails_with=None)
            ledger = await s.check_ledger()
            assert len(ledger.usage) == 2
            assert ledger.turns[answer.rid] == "failed"


# -- 4. the workspace's disk is full -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path`` whose ``workspaces/`` is a 256 KiB tmpfs (needs root)."""
    workspaces = tmp_path / "workspaces"
    workspaces.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(workspaces)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", "-l", str(workspaces)], check=True)


BIG: Final = 512 * 1024  # twice the small disk


async def tool_turn(s: Server, sid: str, name: str, arguments: dict[str, str]) -> SSE:
    """A turn whose model calls one tool; return its ``tool_result`` event
    (the turn must go on to complete)."""
    message = "tool:" + json.dumps({"name": name, "arguments": arguments})
    url = f"/v1/sessions/{sid}/messages"
    answer = await run_turn(s, url, {"message": message}, fails_with=None)
    [result] = [e for e in answer.events if e.event == "tool_result"]
    return result


async def test_faults_tools_on_a_full_workspace_disk_report_a_tool_error(
    small_disk: Path,
) -> None:
    """write_file (in-process) and run_shell (a child) on a full disk: the
    model gets an error result naming the cause, the turn completes and is
    billed once, and the server goes on serving."""
    with trio.fail_after(TIMEOUT):
        async with open_server(small_disk) as s:
            sid = (await s.client.post("/v1/sessions", json={})).json()["id"]
            written = await tool_turn(
                s, sid, "write_file", {"path": "big.txt", "content": "x" * BIG}
            )
            assert written.data["is_error"] is True
            assert "No space left on device" in written.data["content"]
            shell = await tool_turn(
                s, sid, "run_shell", {"command": f"head -c {BIG} /dev/zero > big.bin"}
            )
            assert shell.data["is_error"] is True
            assert "No space left on device" in shell.data["content"]
            await s.check_ledger()
            assert len(s.completed) == 2
            # Room again: the same tool works.
            removed = await s.client.delete(f"/v1/sessions/{sid}/files/big.bin")
            assert removed.status_code in (204, 404)
            await s.client.delete(f"/v1/sessions/{sid}/files/big.txt")
            small = await tool_turn(s, sid, "write_file", {"path": "a.txt", "content": "fits"})
            assert small.data["is_error"] is False
            got = await s.client.get(f"/v1/sessions/{sid}/files/a.txt")
            assert got.content == b"fits"


async def upload_to_full_disk(s: Server) -> tuple[str, httpx.Response]:
    sid = (await s.client.post("/v1/sessions", json={})).json()["id"]
    response = await s.client.put(f"/v1/sessions/{sid}/files/big.bin", content=b"z" * BIG)
    return sid, response


async def test_faults_upload_to_a_full_disk_keeps_serving(small_disk: Path) -> None:
    """A file upload that fills the disk: a JSON error, not a dropped
    connection; the server answers; with room again an upload succeeds."""
    with trio.fail_after(TIMEOUT):
        async with open_server(small_disk) as s:
            sid, response = await upload_to_full_disk(s)
            assert response.status_code >= 400
            assert response.headers["Content-Type"].startswith("application/json")
            assert isinstance(response.json()["error"], str)
            assert (await s.client.get("/health")).status_code == 200
            assert (await s.client.get(f"/v1/sessions/{sid}/files")).status_code == 200
            await s.client.delete(f"/v1/sessions/{sid}/files/big.bin")  # if left
            small = await s.client.put(f"/v1/sessions/{sid}/files/a.txt", content=b"fits")
            assert small.status_code == 201
            assert (await s.client.get(f"/v1/sessions/{sid}/files/a.txt")).content == b"fits"


async def test_faults_upload_to_a_full_disk_is_507_and_leaves_nothing(small_disk: Path) -> None:
    """A full disk on upload is 507 insufficient_storage, and no partial file
    is left behind to keep the disk full."""
    with trio.fail_after(TIMEOUT):
        async with open_server(small_disk) as s:
            sid, response = await upload_to_full_disk(s)
            listing = (await s.client.get(f"/v1/sessions/{sid}/files")).json()
    assert response.status_code == 507, response.text
    assert response.json()["error"] == "insufficient_storage"
    assert listing == []


async def test_faults_run_shell_past_its_file_size_limit_is_a_tool_error(
    tmp_path: Path,
) -> None:
    """ToolLimits(file_size_bytes): a shell writing past it is stopped
    (SIGXFSZ), the file ends at the limit, the model gets an error result and
    the turn completes; the server process's own limit is untouched."""
    from runtime import ToolLimits  # type: ignore[attr-defined,unused-ignore]

    limit = 64 * 1024
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    with trio.fail_after(TIMEOUT):
        async with open_server(tmp_path, tool_limits=ToolLimits(file_size_bytes=limit)) as s:
            sid = (await s.client.post("/v1/sessions", json={})).json()["id"]
            command = f"head -c {4 * limit} /dev/zero > big.bin"
            result = await tool_turn(s, sid, "run_shell", {"command": command})
            assert result.data["is_error"] is True
            info = (await s.client.get(f"/v1/sessions/{sid}/files")).json()
            assert [(f["name"], f["size"]) for f in info] == [("big.bin", limit)]
            # Within the limit, the same command works.
            fits = await tool_turn(
                s, sid, "run_shell", {"command": f"head -c {limit} /dev/zero > ok.bin"}
            )
            assert fits.data["is_error"] is False
            await s.check_ledger()
    assert resource.getrlimit(resource.RLIMIT_FSIZE) == before

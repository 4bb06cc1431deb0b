"""The store: one contract for MemoryStore and SQLiteStore (admission, the ledger,
rate windows, recovery, idempotency keys), SQLite durability and failure, and
exactly-once billing under a few hundred random turns through the runtime.

Every test here uses the real clock: the SQLite writer is a thread, and a
jumping clock would fire timeouts while it works.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

import runtime._turn
from runtime import (
    CancelOutcome,
    CreditMode,
    FunctionCall,
    IdempotencyRecord,
    MemoryStore,
    MessageCompleted,
    MessageError,
    NotFound,
    OutOfCredits,
    OutputMessage,
    Pricing,
    RateLimited,
    ResponseOptions,
    ResponseSnapshot,
    Runtime,
    SessionRecord,
    SQLiteStore,
    StoreError,
    TextChunk,
    ToolCallRecord,
    ToolSpec,
    Turn,
    TurnRecord,
    Usage,
    UsageChunk,
    UsageRecord,
    UsageWindow,
    WindowLimit,
)
from runtime._sqlite import (
    DB_NAME,
    SCHEMA_VERSION,
    add_credits as sqlite_add_credits,
    create_account as sqlite_create_account,
    set_limit,
    set_mode,
)

from ..fakes import FakeModel

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import AsyncGenerator, AsyncIterator
    from pathlib import Path

    from runtime import Event, ModelChunk, ModelRequest

#: 1 credit per input token, 2 per output token (as in conftest).
PRICES = {"fake": Pricing(1_000_000.0, 2_000_000.0)}
#: Every test's budget (the real clock).
TIMEOUT = 10.0


def cost(usage: Usage) -> float:
    return PRICES["fake"].cost(usage)


# -- a store under test, with its administration -------------------------------


@attrs.define(eq=False)
class Kit:
    """A store under test and the administration calls that differ by kind
    (MemoryStore has synchronous methods; SQLite has functions of a connection)."""

    kind: str
    store: MemoryStore | SQLiteStore

    async def create_account(
        self,
        account_id: str,
        *,
        credits: float,
        mode: CreditMode = CreditMode.HARD,
        min_balance: float = 0.0,
        limits: tuple[WindowLimit, ...] = (),
    ) -> None:
        store = self.store
        if isinstance(store, MemoryStore):
            await trio.lowlevel.checkpoint()
            store.create_account(
                account_id, credits=credits, mode=mode, min_balance=min_balance, limits=limits
            )
            return

        def create(conn: sqlite3.Connection) -> None:
            sqlite_create_account(
                conn, account_id, credits=credits, mode=mode, min_balance=min_balance
            )
            for limit in limits:
                set_limit(conn, account_id, limit)

        await store.run(create)

    async def set_mode(
        self, account_id: str, mode: CreditMode, min_balance: float | None = None
    ) -> None:
        store = self.store
        if isinstance(store, MemoryStore):
            await trio.lowlevel.checkpoint()
            store.set_account(account_id, mode=mode, min_balance=min_balance)
        else:
            await store.run(lambda conn: set_mode(conn, account_id, mode, min_balance))

    async def add_credits(self, account_id: str, amount: float) -> None:
        store = self.store
        if isinstance(store, MemoryStore):
            await trio.lowlevel.checkpoint()
            store.add_credits(account_id, amount)
        else:
            await store.run(lambda conn: sqlite_add_credits(conn, account_id, amount))

    async def balance(self, account_id: str) -> float:
        return (await self.store.get_account(account_id)).balance


@pytest.fixture(params=["memory", "sqlite"])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kit]:
    """Each contract test runs once on a MemoryStore and once on a SQLiteStore."""
    if request.param == "memory":
        yield Kit("memory", MemoryStore())
    else:
        async with SQLiteStore.open(tmp_path / DB_NAME) as store:
            yield Kit("sqlite", store)


# -- records -------------------------------------------------------------------


def running(
    account_id: str,
    *,
    session_id: str | None = "sess_contract",
    created_at: float | None = None,
    text: str = "hi",
) -> TurnRecord:
    """A turn record as ``Turn._begin`` hands it to ``begin_turn``."""
    prefix = "resp" if session_id is None else "msg"
    return TurnRecord(
        id=f"{prefix}_{secrets.token_hex(16)}",
        account_id=account_id,
        session_id=session_id,
        model="fake",
        status="in_progress",
        input=text,
        created_at=time.time() if created_at is None else created_at,
    )


def ended(record: TurnRecord, status: str, **changes: Any) -> TurnRecord:
    """``record`` as it ends with ``status``."""
    return attrs.evolve(record, status=status, finished_at=time.time(), **changes)


def bill(record: TurnRecord, usage: Usage) -> UsageRecord:
    """The ledger row of ``record`` completing with ``usage``."""
    return UsageRecord(
        response_id=record.id,
        account_id=record.account_id,
        session_id=record.session_id,
        model=record.model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        credits=cost(usage),
        created_at=time.time(),
        estimated=usage.estimated,
    )


async def complete(kit: Kit, record: TurnRecord, usage: Usage, **changes: Any) -> TurnRecord:
    """Write the completion of ``record`` (already begun); return its final record."""
    final = ended(record, "completed", usage=usage, **changes)
    assert await kit.store.complete_turn(bill(record, usage), final) is True
    return final


def window(report: dict[str, tuple[UsageWindow, ...]], bucket: str, name: str) -> UsageWindow:
    [found] = [w for w in report[bucket] if w.name == name]
    return found


# -- 1. the ledger ---------------------------------------------------------------


async def test_store_complete_turn_bills_exactly_once(kit: Kit) -> None:
    """complete_turn writes one usage record and one debit; a repeat writes and debits nothing."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        await kit.create_account("acct", credits=100.0)
        record = running("acct")
        assert await store.get_turn(record.id) is None
        await store.begin_turn(record)
        assert await store.get_turn(record.id) == record
        usage = Usage(3, 4)
        calls = (
            ToolCallRecord("call_1", "run_shell", '{"command": "ls"}', "a\nb\n", False),
            ToolCallRecord("call_2", "read_file", '{"path": "x"}', "no such file", True),
        )
        final = ended(record, "completed", usage=usage, output_text="héllo ✓", tool_calls=calls)
        first = bill(record, usage)
        assert await store.complete_turn(first, final) is True
        assert await kit.balance("acct") == 100.0 - 11.0
        assert await store.usage_records("acct") == [first]

        # The same response id again (a retried finalize): nothing is written.
        again = attrs.evolve(first, credits=50.0, created_at=time.time())
        other_final = attrs.evolve(final, output_text="changed")
        assert await store.complete_turn(again, other_final) is False
        assert await kit.balance("acct") == 100.0 - 11.0
        assert await store.usage_records("acct") == [first]

        stored = await store.get_turn(record.id)
        assert stored == final
        assert stored is not None
        assert (stored.status, stored.usage, stored.tool_calls) == ("completed", usage, calls)
        assert stored.output_text == "héllo ✓"


async def test_store_stateless_record_round_trips(kit: Kit) -> None:
    """A stateless turn's final record keeps its response snapshot (items, options, tools) equal."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        await kit.create_account("acct", credits=10.0)
        record = running("acct", session_id=None)
        await store.begin_turn(record)
        usage = Usage(5, 7, estimated=True)
        tool = ToolSpec(
            name="get_weather",
            description="The weather of a city",
            parameters={
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        )
        snapshot = ResponseSnapshot(
            id=record.id,
            status="completed",
            model="fake",
            created_at=record.created_at,
            output=(
                OutputMessage("msg_1", "Let me look that up: ", "completed"),
                FunctionCall("fc_1", "call_1", "get_weather", '{"city": "Paris"}', "completed"),
                OutputMessage("msg_2", "", "completed"),
            ),
            usage=usage,
            options=ResponseOptions(
                instructions="be brief",
                tools=(tool,),
                tool_choice="auto",
                max_output_tokens=64,
                metadata={"trace": "abc"},
            ),
        )
        final = await complete(
            kit, record, usage, output_text="Let me look that up: ", response=snapshot
        )
        stored = await store.get_turn(record.id)
        assert stored == final
        assert stored is not None
        assert stored.response == snapshot
        assert stored.bucket == "response"
        [row] = await store.usage_records("acct")
        assert (row.session_id, row.estimated, row.bucket) == (None, True, "response")


async def test_store_unknown_account(kit: Kit) -> None:
    """An unknown account is NotFound for get_account and begin_turn, and nothing is recorded."""
    with trio.fail_after(TIMEOUT):
        with pytest.raises(NotFound):
            await kit.store.get_account("nobody")
        record = running("nobody")
        with pytest.raises(NotFound):
            await kit.store.begin_turn(record)
        assert await kit.store.get_turn(record.id) is None


# -- 2. credit modes -------------------------------------------------------------


async def test_store_hard_mode_refuses_at_the_minimum(kit: Kit) -> None:
    """Hard mode refuses begin_turn while balance <= min_balance; a completion may overdraw."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        await kit.create_account("acct", credits=0.0)
        refused = running("acct")
        with pytest.raises(OutOfCredits) as info:
            await store.begin_turn(refused)
        assert info.value.status_hint == 402
        assert await store.get_turn(refused.id) is None

        await kit.add_credits("acct", 5.0)
        await kit.set_mode("acct", CreditMode.HARD, min_balance=5.0)
        with pytest.raises(OutOfCredits):  # equal to the minimum: refused
            await store.begin_turn(running("acct"))
        await kit.add_credits("acct", 0.5)
        admitted = running("acct")
        await store.begin_turn(admitted)  # 5.5 > 5: admitted

        # The ledger never refuses a completed turn: 5.5 - 11 goes negative.
        await complete(kit, admitted, Usage(3, 4))
        assert await kit.balance("acct") == 5.5 - 11.0
        with pytest.raises(OutOfCredits):
            await store.begin_turn(running("acct"))


async def test_store_soft_mode_never_refuses(kit: Kit) -> None:
    """Soft mode admits every turn whatever the balance; the balance goes negative."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        await kit.create_account("acct", credits=0.0, mode=CreditMode.SOFT, min_balance=10.0)
        for _ in range(3):
            record = running("acct")
            await store.begin_turn(record)
            await complete(kit, record, Usage(1, 1))
        assert await kit.balance("acct") == -9.0
        account = await store.get_account("acct")
        assert account.mode is CreditMode.SOFT
        # Switching to hard mode refuses at once; back to soft admits again.
        await kit.set_mode("acct", CreditMode.HARD)
        with pytest.raises(OutOfCredits):
            await store.begin_turn(running("acct"))
        await kit.set_mode("acct", CreditMode.SOFT)
        await store.begin_turn(running("acct"))


# -- 3. rate windows -----------------------------------------------------------


async def test_store_max_turns_counts_cancelled_turns(kit: Kit) -> None:
    """max_turns: start N+1 is RateLimited; cancelled turns count; other buckets are free."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        limit = WindowLimit(bucket="session_turn", window="hour", max_turns=3)
        await kit.create_account("acct", credits=100.0, limits=(limit,))
        first, second, third = (running("acct") for _ in range(3))
        await store.begin_turn(first)
        await complete(kit, first, Usage(1, 1))
        await store.begin_turn(second)
        store.end_turn(ended(second, "cancelled", cancel_reason="client_cancel"))
        await store.begin_turn(third)
        store.end_turn(ended(third, "failed", error="RuntimeError: boom"))

        refused = running("acct")
        with pytest.raises(RateLimited) as info:
            await store.begin_turn(refused)
        assert 1.0 <= info.value.retry_after <= 3600.0
        assert info.value.status_hint == 429
        assert await store.get_turn(refused.id) is None
        cancelled = await store.get_turn(second.id)
        assert cancelled is not None
        assert (cancelled.status, cancelled.cancel_reason) == ("cancelled", "client_cancel")

        # Stateless responses are another bucket, with no limit here.
        for _ in range(4):
            await store.begin_turn(running("acct", session_id=None))

        report = await store.usage_windows("acct")
        assert window(report, "session_turn", "hour") == UsageWindow(
            "hour", 3600.0, 3, 2, max_turns=3, max_tokens=None, enabled=True
        )
        assert window(report, "session_turn", "day") == UsageWindow("day", 86400.0, 3, 2)
        assert window(report, "response", "hour") == UsageWindow("hour", 3600.0, 4, 0)
        assert window(report, "response", "day") == UsageWindow("day", 86400.0, 4, 0)
        assert [w.name for w in report["session_turn"]] == ["hour", "day"]


async def test_store_max_tokens_counts_completed_usage_only(kit: Kit) -> None:
    """max_tokens: completed tokens at the max refuse the next start; cancelled add none."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        limit = WindowLimit(bucket="response", window="day", max_tokens=10)
        await kit.create_account("acct", credits=100.0, limits=(limit,))
        first = running("acct", session_id=None)
        await store.begin_turn(first)
        await complete(kit, first, Usage(3, 4))  # 7 tokens

        cancelled = running("acct", session_id=None)
        await store.begin_turn(cancelled)  # 7 < 10
        store.end_turn(ended(cancelled, "cancelled", cancel_reason="client_cancel"))
        report = await store.usage_windows("acct")
        assert window(report, "response", "day") == UsageWindow(
            "day", 86400.0, 2, 7, max_turns=None, max_tokens=10, enabled=True
        )

        last = running("acct", session_id=None)
        await store.begin_turn(last)  # still 7 < 10
        await complete(kit, last, Usage(2, 1))  # 10 tokens
        with pytest.raises(RateLimited) as info:
            await store.begin_turn(running("acct", session_id=None))
        assert 1.0 <= info.value.retry_after <= 86400.0
        # Session turns are not limited by the response bucket.
        await store.begin_turn(running("acct"))

        report = await store.usage_windows("acct")
        assert window(report, "response", "day") == UsageWindow(
            "day", 86400.0, 3, 10, max_turns=None, max_tokens=10, enabled=True
        )
        assert window(report, "response", "hour") == UsageWindow("hour", 3600.0, 3, 10)
        assert window(report, "session_turn", "day") == UsageWindow("day", 86400.0, 1, 0)


async def test_store_windows_count_only_recent_turns(kit: Kit) -> None:
    """A turn started more than an hour ago counts in the day window but not the hour."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        limit = WindowLimit(bucket="session_turn", window="hour", max_turns=1)
        await kit.create_account("acct", credits=100.0, limits=(limit,))
        old = running("acct", created_at=time.time() - 3700.0)
        await store.begin_turn(old)
        await store.begin_turn(running("acct"))  # the old one is outside the hour
        with pytest.raises(RateLimited) as info:
            await store.begin_turn(running("acct"))
        # The window has room again when the recent turn leaves it, about an hour on.
        assert 3500.0 <= info.value.retry_after <= 3600.0
        report = await store.usage_windows("acct")
        assert window(report, "session_turn", "hour").turns == 1
        assert window(report, "session_turn", "day").turns == 2


# -- 4. recovery -------------------------------------------------------------------


async def test_store_recover_interrupts_running_turns(kit: Kit) -> None:
    """recover(): running turns end cancelled 'interrupted', unbilled, stateless with a snapshot."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        await kit.create_account("acct", credits=100.0)
        session_turn = running("acct", session_id="sess_gone_with_the_process")
        stateless = running("acct", session_id=None)
        done = running("acct")
        for record in (session_turn, stateless, done):
            await store.begin_turn(record)
        final = await complete(kit, done, Usage(1, 2))

        recovered = await store.recover()
        assert recovered.interrupted == 2
        assert recovered.sessions == ()
        for record in (session_turn, stateless):
            stored = await store.get_turn(record.id)
            assert stored is not None
            assert (stored.status, stored.cancel_reason, stored.usage) == (
                "cancelled",
                "interrupted",
                None,
            )
            assert stored.finished_at is not None
            assert stored.finished_at >= record.created_at
            assert (stored.input, stored.created_at) == (record.input, record.created_at)
        interrupted = await store.get_turn(stateless.id)
        assert interrupted is not None
        assert interrupted.response == ResponseSnapshot(
            id=stateless.id,
            status="cancelled",
            model="fake",
            created_at=stateless.created_at,
            cancel_reason="interrupted",
        )
        stored_session_turn = await store.get_turn(session_turn.id)
        assert stored_session_turn is not None
        assert stored_session_turn.response is None
        assert await store.get_turn(done.id) == final
        assert [u.response_id for u in await store.usage_records("acct")] == [done.id]
        assert await kit.balance("acct") == 100.0 - 5.0

        again = await store.recover()
        assert again.interrupted == 0


async def test_store_recover_brings_back_persistent_sessions(kit: Kit) -> None:
    """recover(): saved sessions return with history oldest first; deleted/expired ones do not."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        await kit.create_account("acct", credits=100.0)
        now = time.time()

        def session(sid: str, *, created_at: float, ttl: float) -> SessionRecord:
            return SessionRecord(
                id=sid,
                account_id="acct",
                ttl=ttl,
                metadata={"project": "x", "n": 1, "nested": {"ok": True}},
                model="fake",
                created_at=created_at,
                last_activity=created_at,
            )

        keep = session("sess_keep", created_at=now - 60.0, ttl=3600.0)
        deleted = session("sess_deleted", created_at=now - 50.0, ttl=3600.0)
        expired = session("sess_expired", created_at=now - 100.0, ttl=50.0)
        for saved in (keep, deleted, expired):
            await store.save_session(saved)
        await store.delete_session(deleted.id)
        await store.delete_session("sess_never_saved")  # not an error

        # Begun out of order; the history is by start time.
        oldest = running("acct", session_id=keep.id, created_at=now - 30.0, text="one")
        middle = running("acct", session_id=keep.id, created_at=now - 20.0, text="two")
        newest = running("acct", session_id=keep.id, created_at=now - 10.0, text="three")
        for record in (middle, newest, oldest):
            await store.begin_turn(record)
        await complete(kit, oldest, Usage(1, 1), output_text="first answer")
        store.end_turn(ended(middle, "cancelled", cancel_reason="client_cancel"))
        # ``newest`` is left running: the process "died" during it.
        for sid in (deleted.id, expired.id):
            record = running("acct", session_id=sid)
            await store.begin_turn(record)
            await complete(kit, record, Usage(1, 1))

        recovered = await store.recover()
        assert recovered.interrupted == 1
        [(back, history)] = recovered.sessions
        assert attrs.evolve(back, last_activity=keep.last_activity) == keep
        assert back.last_activity >= keep.last_activity
        assert [t.id for t in history] == [oldest.id, middle.id, newest.id]
        assert [t.input for t in history] == ["one", "two", "three"]
        assert [t.status for t in history] == ["completed", "cancelled", "cancelled"]
        assert [t.cancel_reason for t in history] == [None, "client_cancel", "interrupted"]
        assert history[0].output_text == "first answer"
        assert history[0].usage == Usage(1, 1)
        # Only completed turns were billed: three of 3 credits each.
        assert await kit.balance("acct") == 100.0 - 9.0

        # A session saved again (a replace) is not duplicated.
        await store.save_session(attrs.evolve(keep, metadata={"project": "y"}))
        [(back, _)] = (await store.recover()).sessions
        assert back.metadata == {"project": "y"}


# -- 5. idempotency keys -------------------------------------------------------------


async def test_store_idempotency_first_binding_wins(kit: Kit) -> None:
    """put then get returns the binding; a second put of (account, key) does not overwrite."""
    with trio.fail_after(TIMEOUT):
        store = kit.store
        assert await store.get_idempotency_key("acct", "k") is None
        first = IdempotencyRecord(
            account_id="acct",
            key="k",
            fingerprint="fp-1",
            response_id="msg_1",
            created_at=time.time(),
        )
        await store.put_idempotency_key(first)
        assert await store.get_idempotency_key("acct", "k") == first
        second = attrs.evolve(first, fingerprint="fp-2", response_id="msg_2", created_at=0.5)
        await store.put_idempotency_key(second)
        assert await store.get_idempotency_key("acct", "k") == first
        # Keys are per account.
        assert await store.get_idempotency_key("other", "k") is None
        theirs = attrs.evolve(second, account_id="other")
        await store.put_idempotency_key(theirs)
        assert await store.get_idempotency_key("other", "k") == theirs
        assert await store.get_idempotency_key("acct", "k") == first


# -- 6. SQLite: durability and the schema ------------------------------------------


async def test_sqlite_data_survives_reopening(tmp_path: Path) -> None:
    """Accounts, keys, limits, usage, turns, sessions and idempotency keys survive a reopen."""
    with trio.fail_after(TIMEOUT):
        path = tmp_path / DB_NAME
        limit = WindowLimit(bucket="session_turn", window="day", max_turns=50, max_tokens=1000)
        async with SQLiteStore.open(path, default_credits=1000.0) as store:
            acct = await store.ensure_account_for_key("pk_test_secret", credits=200.0)
            await store.run(lambda conn: set_mode(conn, acct, CreditMode.SOFT, 1.5))
            await store.run(lambda conn: set_limit(conn, acct, limit))
            sess = SessionRecord(
                id="sess_durable",
                account_id=acct,
                ttl=3600.0,
                metadata={"a": [1, 2]},
                model="fake",
                created_at=time.time(),
                last_activity=time.time(),
            )
            await store.save_session(sess)
            turn = running(acct, session_id=sess.id)
            await store.begin_turn(turn)
            final = ended(turn, "completed", usage=Usage(10, 20), output_text="kept")
            usage = bill(turn, Usage(10, 20))
            assert await store.complete_turn(usage, final)
            key = IdempotencyRecord(
                account_id=acct,
                key="idem",
                fingerprint="fp",
                response_id=turn.id,
                created_at=time.time(),
            )
            await store.put_idempotency_key(key)
            before = await store.get_account(acct)
            local = await store.get_account("local")

        async with SQLiteStore.open(path, default_credits=5.0) as store:
            assert await store.authenticate("pk_test_secret") == acct
            assert await store.get_account(acct) == before
            assert before.balance == 200.0 - 50.0
            assert (before.mode, before.min_balance, before.limits) == (
                CreditMode.SOFT,
                1.5,
                (limit,),
            )
            # default_credits applies only when the default account is created.
            assert await store.get_account("local") == local
            assert local.balance == 1000.0
            assert await store.usage_records(acct) == [usage]
            assert await store.get_turn(turn.id) == final
            assert await store.get_idempotency_key(acct, "idem") == key
            recovered = await store.recover()
            assert recovered.interrupted == 0
            [(back, history)] = recovered.sessions
            assert attrs.evolve(back, last_activity=sess.last_activity) == sess
            assert history == (final,)
            # A completion repeated after the restart is still refused.
            assert await store.complete_turn(usage, final) is False
            assert (await store.get_account(acct)).balance == before.balance


async def test_sqlite_running_turn_is_interrupted_after_reopen(tmp_path: Path) -> None:
    """A turn running when the store closed shows as cancelled 'interrupted' after reopening."""
    with trio.fail_after(TIMEOUT):
        path = tmp_path / DB_NAME
        async with SQLiteStore.open(path) as store:
            record = running("local", session_id=None)
            await store.begin_turn(record)
        async with (
            SQLiteStore.open(path) as store,
            Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt,
        ):
            shown = await rt.turn_record(record.id)
            assert (shown.status, shown.cancel_reason) == ("cancelled", "interrupted")
            assert shown.response is not None
            assert shown.response.status == "cancelled"
            assert await store.usage_records("local") == []
            assert (await store.get_account("local")).balance == 1000.0


async def test_sqlite_schema_version_and_newer_database_refused(tmp_path: Path) -> None:
    """schema_version holds SCHEMA_VERSION; a newer database is refused with StoreError."""
    with trio.fail_after(TIMEOUT):
        path = tmp_path / DB_NAME
        async with SQLiteStore.open(path) as store:
            rows = await store.run(
                lambda conn: conn.execute("SELECT version FROM schema_version").fetchall()
            )
            assert rows == [(SCHEMA_VERSION,)]
            await store.run(
                lambda conn: conn.execute(
                    "UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,)
                )
            )
        with pytest.raises(StoreError, match="newer"):
            async with SQLiteStore.open(path):
                pytest.fail("a newer database was opened")


async def test_sqlite_not_a_database_refused(tmp_path: Path) -> None:
    """A file that is not a SQLite database is refused with StoreError at open."""
    with trio.fail_after(TIMEOUT):
        path = tmp_path / DB_NAME
        path.write_bytes(b"this is not a database, just some text " * 100)
        with pytest.raises(StoreError, match="cannot open"):
            async with SQLiteStore.open(path):
                pytest.fail("garbage was opened as a database")


# -- 7. SQLite: a full disk fails the turn, unbilled -----------------------------------


async def test_sqlite_full_database_fails_the_turn_unbilled(tmp_path: Path) -> None:
    """A full database fails the turn 'store_error' unbilled; with room again turns bill."""
    with trio.fail_after(TIMEOUT):
        model = FakeModel(
            steps=[
                [TextChunk("x" * 200_000), UsageChunk(3, 2)],  # cannot fit
                [TextChunk("small"), UsageChunk(3, 2)],
            ]
        )
        async with (
            SQLiteStore.open(tmp_path / DB_NAME) as store,
            Runtime.open(data_dir=tmp_path, model=model, store=store, prices=PRICES) as rt,
        ):
            session = await rt.create_session()

            def fill(conn: sqlite3.Connection) -> int:
                (pages,) = conn.execute("PRAGMA page_count").fetchone()
                (limit,) = conn.execute(f"PRAGMA max_page_count = {int(pages)}").fetchone()
                return int(limit)

            pages = await store.run(fill)
            assert pages > 0
            turn = await session.send("write a lot")
            terminal = await turn.wait_finished()
            assert isinstance(terminal, MessageError)
            assert terminal.error.startswith("store_error"), terminal.error
            assert "full" in terminal.error
            assert turn.usage is None
            assert await store.usage_records("local") == []
            assert (await store.get_account("local")).balance == 1000.0

            await store.run(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
            turn = await session.send("again")
            terminal = await turn.wait_finished()
            assert isinstance(terminal, MessageCompleted)
            [record] = await store.usage_records("local")
            assert (record.response_id, record.credits) == (turn.id, 7.0)
            assert (await store.get_account("local")).balance == 1000.0 - 7.0
            stored = await store.get_turn(turn.id)
            assert stored is not None
            assert (stored.status, stored.output_text) == ("completed", "small")


async def test_sqlite_finalize_is_bounded_by_the_ledger_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer busy past LEDGER_TIMEOUT fails the finalizing turn with store_error, unbilled."""
    monkeypatch.setattr(runtime._turn, "LEDGER_TIMEOUT", 0.1)
    entered, release = threading.Event(), threading.Event()

    def occupy(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(5.0)

    with trio.fail_after(TIMEOUT):
        async with (
            SQLiteStore.open(tmp_path / DB_NAME) as store,
            Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store, prices=PRICES) as rt,
        ):
            terminal: Event | None = None
            async with trio.open_nursery() as nursery:

                async def hook(turn: Turn) -> None:
                    # The writer thread is busy with another operation when the
                    # ledger transaction is queued.
                    nursery.start_soon(store.run, occupy)
                    await trio.to_thread.run_sync(lambda: entered.wait(5.0))

                rt._for_testing_finalizing = hook
                session = await rt.create_session()
                turn = await session.send("hi")
                try:
                    with trio.move_on_after(0.5):  # five times the ledger timeout
                        terminal = await turn.wait_finished()
                finally:
                    release.set()
            await turn.wait_finished()
            usage = await store.usage_records("local")
            balance = (await store.get_account("local")).balance
        assert isinstance(terminal, MessageError)
        assert terminal.error.startswith("store_error")
        assert usage == []
        assert balance == 1000.0


# -- 8. random turns: billing exactly once ----------------------------------------------


@attrs.define(eq=False)
class PerTurnModel:
    """A model whose every turn has its own FakeModel, chosen by the turn's input."""

    name: str = "fake"
    scripts: dict[str, FakeModel] = attrs.field(factory=dict)

    def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        return self.scripts[request.messages[-1].content].stream(request)


@attrs.frozen
class Plan:
    """One random turn: what its model does, and when the test cancels it."""

    tag: str
    account_id: str
    stateless: bool
    #: complete | cancel (blocked on the gate) | fail (raises) | race (a cancel
    #: after ``checkpoints`` checkpoints; it may land at any stage)
    action: str
    usage: Usage
    checkpoints: int

    def steps(self) -> list[list[ModelChunk | str]]:
        usage = UsageChunk(self.usage.input_tokens, self.usage.output_tokens)
        if self.action == "cancel":
            return [[TextChunk("partial "), "block", TextChunk("never"), usage]]
        if self.action == "fail":
            return [[TextChunk("partial "), "raise"]]
        return [[TextChunk(f"{self.tag} "), TextChunk("done"), usage]]


def plans(seed: int, accounts: list[str], count: int) -> list[Plan]:
    rng = random.Random(seed)
    return [
        Plan(
            tag=f"turn-{i:03d}",
            account_id=rng.choice(accounts),
            stateless=rng.random() < 0.5,
            action=rng.choices(["complete", "cancel", "fail", "race"], [5, 2, 1, 2])[0],
            usage=Usage(rng.randint(0, 40), rng.randint(0, 40)),
            checkpoints=rng.randint(0, 8),
        )
        for i in range(count)
    ]


async def play(rt: Runtime, model: PerTurnModel, session_id: str, plan: Plan) -> Turn:
    fake = FakeModel(steps=plan.steps())
    model.scripts[plan.tag] = fake
    if plan.stateless:
        turn = await rt.respond(plan.tag, account_id=plan.account_id)
    else:
        turn = await rt.get_session(session_id).send(plan.tag)
    if plan.action == "cancel":
        await fake.blocked.wait()
        assert await turn.cancel() is CancelOutcome.CANCELLING
    elif plan.action == "race":
        for _ in range(plan.checkpoints):
            await trio.lowlevel.checkpoint()
        await turn.cancel()
    await turn.wait_finished()
    if plan.action == "complete":
        assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    return turn


def status_of(terminal: Event) -> str:
    if terminal.type in ("message.completed", "response.completed"):
        return "completed"
    if terminal.type in ("message.cancelled", "response.cancelled"):
        return "cancelled"
    assert terminal.type in ("message.error", "response.failed"), terminal
    return "failed"


@pytest.mark.parametrize("seed", [20240611, 7])
async def test_store_random_turns_bill_exactly_once(kit: Kit, tmp_path: Path, seed: int) -> None:
    """200 random turns: debits == usage records == completed turns' cost; nothing else billed."""
    with trio.fail_after(TIMEOUT):
        accounts = ["acct_a", "acct_b", "acct_c"]
        initial = 30.0
        for account_id in accounts:
            await kit.create_account(account_id, credits=initial, mode=CreditMode.SOFT)
        model = PerTurnModel()
        outcomes: dict[str, tuple[Plan, Turn, str]] = {}
        async with Runtime.open(
            data_dir=tmp_path, model=model, store=kit.store, prices=PRICES
        ) as rt:
            sessions = {a: (await rt.create_session(account_id=a)).id for a in accounts}
            everything = plans(seed, accounts=accounts, count=200)

            # One lane per (account, kind): lanes run concurrently, turns in a lane in order.
            lanes: dict[tuple[str, bool], list[Plan]] = {}
            for plan in everything:
                lanes.setdefault((plan.account_id, plan.stateless), []).append(plan)

            async def lane(todo: list[Plan]) -> None:
                for plan in todo:
                    turn = await play(rt, model, sessions[plan.account_id], plan)
                    terminal = await turn.wait_finished()
                    outcomes[turn.id] = (plan, turn, status_of(terminal))

            async with trio.open_nursery() as nursery:
                for todo in lanes.values():
                    nursery.start_soon(lane, todo)

            assert len(outcomes) == 200
            expected = {"complete": {"completed"}, "cancel": {"cancelled"}, "fail": {"failed"}}
            for plan, turn, status in outcomes.values():
                assert status in expected.get(plan.action, {"completed", "cancelled"}), plan
                assert turn.status == status
                assert (turn.usage is not None) == (status == "completed")
            statuses = {s for _, _, s in outcomes.values()}
            assert statuses == {"completed", "cancelled", "failed"}

            for account_id in accounts:
                mine = [(p, t, s) for p, t, s in outcomes.values() if p.account_id == account_id]
                done = {t.id: p for p, t, s in mine if s == "completed"}
                records = await kit.store.usage_records(account_id, limit=1000)
                assert len(records) == len(done)
                assert {r.response_id for r in records} == set(done)
                for record in records:
                    plan = done[record.response_id]
                    assert (record.input_tokens, record.output_tokens) == (
                        plan.usage.input_tokens,
                        plan.usage.output_tokens,
                    )
                    assert record.credits == cost(plan.usage)
                billed = sum(r.credits for r in records)
                assert billed == sum(cost(p.usage) for p in done.values())
                assert initial - await kit.balance(account_id) == billed

                # The store's turn records agree with how each turn ended.
                for plan, turn, status in mine:
                    stored = await kit.store.get_turn(turn.id)
                    assert stored is not None
                    assert stored.status == status
                    assert stored.usage == (plan.usage if status == "completed" else None)

                # Every start counts in the windows; only completed turns' tokens do.
                report = await kit.store.usage_windows(account_id)
                for bucket, stateless in (("session_turn", False), ("response", True)):
                    ours = [(p, s) for p, _, s in mine if p.stateless is stateless]
                    hour = window(report, bucket, "hour")
                    assert hour.turns == len(ours)
                    assert hour.tokens == sum(
                        p.usage.total_tokens for p, s in ours if s == "completed"
                    )

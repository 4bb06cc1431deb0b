"""Store faults found in review, pinned: a batch that fails after some of its
operations ran fails them all; an expired idempotency key is replaced; a
session deleted while it was being stored does not come back; one runtime per
data dir; Retry-After of a token window is when enough tokens have left it."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from runtime import (
    IdempotencyRecord,
    MemoryStore,
    RateLimited,
    Runtime,
    SessionRecord,
    SQLiteStore,
    StoreError,
    UsageRecord,
    WindowLimit,
)
from runtime._records import TurnRecord
from runtime._sqlite import DB_NAME

from ..fakes import DelegatingStore, FakeModel

if TYPE_CHECKING:
    import sqlite3
    from pathlib import Path


class Boom(BaseException):
    """Not an Exception: escapes an operation's own error handling, as a failing
    SAVEPOINT or RELEASE statement does."""


async def test_sqlite_batch_that_fails_midway_fails_every_operation(tmp_path: Path) -> None:
    """An operation that already ran in a batch that was then rolled back is
    reported failed, not done (no write the caller believes in is lost)."""
    entered, release = threading.Event(), threading.Event()

    def occupy(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(5)

    def write(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE accounts SET balance = 1 WHERE id = 'local'")

    def explode(conn: sqlite3.Connection) -> None:
        raise Boom

    with trio.fail_after(10):
        async with SQLiteStore.open(tmp_path / DB_NAME) as store:
            results: dict[str, BaseException | None] = {}

            async def call(name: str, fn: object) -> None:
                try:
                    await store.run(fn)  # type: ignore[arg-type]
                except BaseException as exc:
                    results[name] = exc
                else:
                    results[name] = None

            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.run, occupy)
                await trio.to_thread.run_sync(entered.wait, 5)
                nursery.start_soon(call, "write", write)
                nursery.start_soon(call, "explode", explode)
                await trio.testing.wait_all_tasks_blocked()
                release.set()  # both queued: they run as one batch
            balance = (await store.get_account("local")).balance
    assert isinstance(results["write"], StoreError)
    assert isinstance(results["explode"], StoreError)
    assert balance == 1000.0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_expired_idempotency_binding_is_replaced(tmp_path: Path, kind: str) -> None:
    """A key bound more than a day ago is rebound by a new request, and the new
    binding is what a later lookup (after a restart) finds."""
    old = IdempotencyRecord(
        account_id="local", key="k", fingerprint="a", response_id="msg_old",
        created_at=time.time() - 2 * 86400,
    )  # fmt: skip
    new = attrs.evolve(old, fingerprint="b", response_id="msg_new", created_at=time.time())
    with trio.fail_after(10):
        if kind == "memory":
            store = MemoryStore()
            await store.put_idempotency_key(old)
            await store.put_idempotency_key(new)
            got = await store.get_idempotency_key("local", "k")
        else:
            async with SQLiteStore.open(tmp_path / DB_NAME) as sqlite_store:
                await sqlite_store.put_idempotency_key(old)
                await sqlite_store.put_idempotency_key(new)
            async with SQLiteStore.open(tmp_path / DB_NAME) as sqlite_store:
                got = await sqlite_store.get_idempotency_key("local", "k")
    assert got is not None
    assert got.response_id == "msg_new"


@attrs.define(eq=False)
class SlowSave(DelegatingStore):
    """Holds save_session until ``release`` is set."""

    release: trio.Event = attrs.field(factory=trio.Event)
    saving: trio.Event = attrs.field(factory=trio.Event)

    async def save_session(self, record: SessionRecord) -> None:
        self.saving.set()
        await self.release.wait()
        await self.inner.save_session(record)


async def test_session_deleted_while_being_stored_does_not_come_back(tmp_path: Path) -> None:
    """A bulk DELETE that takes a persistent session before its row is written
    leaves no row behind: after a restart the session is gone."""
    inner = MemoryStore()
    store = SlowSave(inner)
    with trio.fail_after(10):
        async with (
            Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(lambda: rt.create_session(persistent=True))
            await store.saving.wait()
            assert await rt.delete_sessions(account_id="local") == 1
            store.release.set()
        recovered = await inner.recover()
    assert recovered.sessions == ()


async def test_one_runtime_per_data_dir(tmp_path: Path) -> None:
    """A second runtime on a data dir in use is refused (it would take the first
    one's running turns for interrupted ones and sweep its workspaces)."""
    with trio.fail_after(10):
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=MemoryStore()):
            with pytest.raises(StoreError, match="in use"):
                async with Runtime.open(data_dir=tmp_path, model=FakeModel()):
                    pass
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=MemoryStore()):
            pass  # free again once the first has closed


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_token_window_retry_after_waits_for_enough_tokens(tmp_path: Path, kind: str) -> None:
    """Retry-After of a full token window is when the total drops below the
    maximum, not merely when the oldest record leaves."""
    now = time.time()
    limit = WindowLimit(bucket="session_turn", window="hour", max_tokens=10)

    def usage(rid: str, age: float, tokens: int) -> UsageRecord:
        return UsageRecord(
            response_id=rid, account_id="local", session_id="sess_x", model="fake",
            input_tokens=tokens, output_tokens=0, credits=0.0, created_at=now - age,
        )  # fmt: skip

    def turn(rid: str) -> TurnRecord:
        return TurnRecord(
            id=rid, account_id="local", session_id="sess_x", model="fake",
            status="in_progress", input="hi", created_at=now,
        )  # fmt: skip

    async def check(store: MemoryStore | SQLiteStore) -> float:
        for rid, age, tokens in (("msg_a", 3500, 2), ("msg_b", 600, 10)):
            await store.begin_turn(turn(rid))
            await store.complete_turn(usage(rid, age, tokens), attrs.evolve(turn(rid)))
        with pytest.raises(RateLimited) as refused:
            await store.begin_turn(turn("msg_c"))
        return refused.value.retry_after

    with trio.fail_after(10):
        if kind == "memory":
            store = MemoryStore()
            store.set_account("local", limits=(limit,))
            retry_after = await check(store)
        else:
            from runtime._sqlite import set_limit

            async with SQLiteStore.open(tmp_path / DB_NAME) as sqlite_store:
                await sqlite_store.run(lambda conn: set_limit(conn, "local", limit))
                retry_after = await check(sqlite_store)
    # msg_a leaving (in ~100 s) still leaves 10 tokens: it is msg_b's (in ~3000 s).
    assert 2990 <= retry_after <= 3010

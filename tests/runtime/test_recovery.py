"""Restart semantics of the embedded runtime: one store given to successive
``Runtime.open`` calls on one data dir (a MemoryStore; the SQLite store is
driven the same way across a real SIGKILL in tests/server/test_crash.py).

Real clock: session teardown removes workspaces in worker threads, and the
autojump clock would jump to the next session deadline while they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from runtime import (
    ChatMessage,
    MemoryStore,
    MessageCompleted,
    NotFound,
    Runtime,
    TextChunk,
    UsageChunk,
)

from ..fakes import FakeModel

if TYPE_CHECKING:
    from pathlib import Path


async def test_recovery_persistent_session_comes_back_with_history_and_files(
    tmp_path: Path,
) -> None:
    """A persistent session survives a restart: record, history, workspace, and its
    completed turns (not the cancelled one) become the next turn's context."""
    with trio.fail_after(20):
        store = MemoryStore()
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
            kept = await rt.create_session(persistent=True, metadata={"k": "v"}, ttl=1000)
            kept.workspace.write("notes.txt", b"kept")
            first = await kept.send("first question")
            await first.wait_finished()
            blocked = FakeModel(steps=[[TextChunk("partial"), "block"]])
            rt.model = blocked
            second = await kept.send("second question")
            await blocked.blocked.wait()
            await second.cancel()
            await second.wait_finished()
            rt.model = FakeModel()
            gone = await rt.create_session()
            await (await gone.send("hi")).wait_finished()
            deleted = await rt.create_session(persistent=True)
            await rt.delete_session(deleted.id)
            created_at = kept.created_at
        assert (tmp_path / "workspaces" / kept.id).is_dir()
        assert not (tmp_path / "workspaces" / gone.id).exists()

        # 998.5 s pass while the process is down (moved back rather than waited).
        record = store._sessions[kept.id]
        store._sessions[kept.id] = attrs.evolve(record, created_at=record.created_at - 998.5)
        created_at -= 998.5
        model = FakeModel(steps=[[TextChunk("third answer"), UsageChunk(1, 1)]])
        async with Runtime.open(data_dir=tmp_path, model=model, store=store) as rt:
            assert [s.id for s in rt.sessions()] == [kept.id]
            back = rt.get_session(kept.id)
            assert (back.persistent, back.metadata, back.created_at) == (
                True,
                {"k": "v"},
                created_at,
            )
            assert back.workspace.read("notes.txt") == b"kept"
            history = back.history()
            assert [(h.id, h.status) for h in history] == [
                (first.id, "completed"),
                (second.id, "cancelled"),
            ]
            assert history[0].output_text == "hello world"
            assert history[1].cancel_reason == "client_cancel"
            with pytest.raises(NotFound):
                rt.get_session(gone.id)
            third = await back.send("third question")
            assert isinstance(await third.wait_finished(), MessageCompleted)
            assert model.requests[0].messages[:2] == (
                ChatMessage(role="user", content="first question"),
                ChatMessage(role="assistant", content="hello world"),
            )
            assert model.requests[0].messages[2:] == (
                ChatMessage(role="user", content="third question"),
            )
            # The ttl runs from creation, not from the restart: 1000 s after creation
            # (about a second from now) the session expires, restart or not.
            assert rt.sessions() == [back]
            with trio.fail_after(10):
                await back.wait_closed()
            assert rt.sessions() == []
            assert not (tmp_path / "workspaces" / kept.id).exists()
        # Expired: it does not come back either.
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
            assert rt.sessions() == []


async def test_recovery_interrupted_turn_is_cancelled_unbilled(
    tmp_path: Path,
) -> None:
    """A turn the store still holds as running at start-up (the process died)
    becomes cancelled(interrupted), unbilled; its session takes new turns."""
    with trio.fail_after(20):
        store = MemoryStore()
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
            session = await rt.create_session(persistent=True)
            turn = await session.send("hi")
            await turn.wait_finished()
        balance = (await store.get_account("local")).balance
        # What a crash leaves: the turn's start recorded, its end never.
        running = await store.get_turn(turn.id)
        assert running is not None
        fake_rid = "msg_" + "0" * 32
        await store.begin_turn(attrs.evolve(running, id=fake_rid, status="in_progress", usage=None))
        async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
            record = await rt.turn_record(fake_rid)
            assert (record.status, record.cancel_reason, record.usage) == (
                "cancelled",
                "interrupted",
                None,
            )
            session = rt.get_session(session.id)
            assert [h.status for h in session.history()] == ["completed", "cancelled"]
            assert (await store.get_account("local")).balance == balance
            assert [r.response_id for r in await store.usage_records("local")] == [turn.id]
            again = await session.send("again")
            assert isinstance(await again.wait_finished(), MessageCompleted)

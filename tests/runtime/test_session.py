"""Sessions: the record, teardown by DELETE / idle / TTL / shutdown, history as context."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from runtime import (
    InvalidRequest,
    MemoryStore,
    MessageCancelled,
    NotFound,
    Runtime,
    SessionClosed,
    ShuttingDown,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    ToolLimits,
    TurnState,
    UsageChunk,
)
from runtime._process import DIRECT

from ..fakes import FakeModel
from ..helpers import collect, group_gone, process_gone, types, wait_for_children


async def test_session_record_fields(rt: Runtime) -> None:
    """A new session has DESIGN.md's record fields and its workspace directory exists."""
    session = await rt.create_session(ttl=600, metadata={"user": "u1"})
    assert session.id.startswith("sess_")
    assert len(session.id) == 5 + 32
    assert session.busy is False
    assert session.persistent is False
    assert session.ttl == 600.0
    assert session.metadata == {"user": "u1"}
    assert session.status == "ready"
    assert session.model == "fake"
    assert session.active_response_id is None
    assert session.created_at == session.last_activity
    assert os.path.isdir(session.workspace.root)
    assert Path(session.workspace.root).parent == rt.data_dir / "workspaces"
    assert rt.get_session(session.id) is session
    assert rt.sessions() == [session]
    assert rt.statistics().sessions == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"ttl": 0}, {"ttl": -1}, {"ttl": "1h"}, {"ttl": float("inf")}, {"metadata": [1]}],
)
async def test_session_create_rejects_bad_input(rt: Runtime, kwargs: dict[str, object]) -> None:
    """Malformed ttl or metadata raise InvalidRequest (HTTP 400)."""
    with pytest.raises(InvalidRequest) as info:
        await rt.create_session(**kwargs)  # type: ignore[arg-type]
    assert info.value.status_hint == 400


async def test_session_create_unknown_model_or_account(rt: Runtime) -> None:
    """A model this runtime does not serve is InvalidRequest; an unknown account NotFound."""
    with pytest.raises(InvalidRequest, match="gpt-9"):
        await rt.create_session(model="gpt-9")
    with pytest.raises(NotFound):
        await rt.create_session(account_id="nobody")
    assert (await rt.create_session(model="fake")).model == "fake"


async def test_session_delete_during_turn(
    rt: Runtime, model: FakeModel, store: MemoryStore
) -> None:
    """DELETE mid-turn: message.cancelled(session_deleted), unbilled, workspace gone, 404 after."""
    model.steps = [[TextChunk("a"), "block", UsageChunk(1, 1)]]
    session = await rt.create_session(persistent=True)
    session.workspace.write("notes.txt", b"keep me?")
    turn = await session.send("hi")
    await model.blocked.wait()
    await rt.delete_session(session.id)
    # delete_session returned: the teardown is complete.
    assert not os.path.exists(session.workspace.root)
    assert session.closed
    terminal = turn.buffer.terminal
    assert isinstance(terminal, MessageCancelled)
    assert terminal.reason == "session_deleted"
    assert turn.state is TurnState.CANCELLED
    assert await store.usage_records("local") == []
    with pytest.raises(NotFound):
        rt.get_session(session.id)
    with pytest.raises(NotFound):
        await rt.delete_session(session.id)
    with pytest.raises(SessionClosed):
        await session.send("more")
    # The turn's buffer outlives the session for its grace window.
    assert rt.get_turn(turn.id) is turn
    assert types(await collect(turn))[-1] == "message.cancelled"
    assert rt.statistics().sessions == 0


async def test_session_delete_idle(rt: Runtime) -> None:
    """DELETE of an idle session removes it and its workspace."""
    session = await rt.create_session()
    await rt.delete_session(session.id)
    assert not os.path.exists(session.workspace.root)
    assert rt.sessions() == []


async def test_session_delete_during_tool_call(tmp_path: Path, store: MemoryStore) -> None:
    """DELETE during run_shell kills the whole group (grandchild included), wipes the workspace."""
    pids: list[int] = []
    args = json.dumps({"command": "sleep 100 & sleep 100"})
    model = FakeModel(
        steps=[[ToolCallStart("c1", "run_shell"), ToolCallDelta("c1", args), UsageChunk(1, 1)]]
    )
    with trio.fail_after(10):
        async with Runtime.open(data_dir=tmp_path, model=model, store=store) as rt:
            rt._for_testing_on_process = pids.append
            session = await rt.create_session()
            turn = await session.send("run it")
            children = await wait_for_children(pids)
            await rt.delete_session(session.id)
            [pid] = pids
            assert process_gone(pid)
            assert all(process_gone(child) for child in children)
            assert group_gone(pid)
            terminal = turn.buffer.terminal
            assert isinstance(terminal, MessageCancelled)
            assert terminal.reason == "session_deleted"
            assert not os.path.exists(session.workspace.root)
            assert await store.usage_records("local") == []


async def test_session_idle_expiry(rt: Runtime, autojump_clock: trio.abc.Clock) -> None:
    """A non-persistent session is torn down exactly idle_timeout after its last turn ends."""
    session = await rt.create_session()
    turn = await session.send("hi")
    await turn.wait_finished()
    ended = trio.current_time()
    await trio.sleep(rt.idle_timeout - 1)
    assert rt.get_session(session.id) is session
    await session.wait_closed()
    assert trio.current_time() - ended == rt.idle_timeout
    assert not os.path.exists(session.workspace.root)
    with pytest.raises(NotFound):
        rt.get_session(session.id)


async def test_session_idle_timer_restarts_with_each_turn(
    rt: Runtime, autojump_clock: trio.abc.Clock
) -> None:
    """A turn's end restarts the idle timer; an unused session expires after idle_timeout."""
    session = await rt.create_session()
    created = trio.current_time()
    await trio.sleep(rt.idle_timeout - 10)
    await (await session.send("hi")).wait_finished()
    last = trio.current_time()
    await session.wait_closed()
    assert trio.current_time() - last == rt.idle_timeout
    other = await rt.create_session()
    created = trio.current_time()
    await other.wait_closed()
    assert trio.current_time() - created == rt.idle_timeout


async def test_session_idle_expiry_waits_for_running_turn(
    rt: Runtime, model: FakeModel, autojump_clock: trio.abc.Clock
) -> None:
    """No idle expiry while a turn runs, however long it takes."""
    model.steps = [["block", UsageChunk(1, 1)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    await trio.sleep(rt.idle_timeout * 3)
    assert rt.get_session(session.id) is session
    assert turn.state is TurnState.IN_PROGRESS
    model.gate.set()
    await turn.wait_finished()


async def test_session_persistent_is_not_idle_expired(
    rt: Runtime, autojump_clock: trio.abc.Clock
) -> None:
    """A persistent session outlives the idle timeout and ends at its ttl."""
    session = await rt.create_session(persistent=True, ttl=3600)
    start = trio.current_time()
    await trio.sleep(rt.idle_timeout * 2)
    assert rt.get_session(session.id) is session
    await session.wait_closed()
    assert trio.current_time() - start == 3600
    assert not os.path.exists(session.workspace.root)


async def test_session_ttl_cancels_running_turn(
    rt: Runtime, model: FakeModel, store: MemoryStore, autojump_clock: trio.abc.Clock
) -> None:
    """When the ttl runs out mid-turn the turn ends message.cancelled(session_expired), unbilled."""
    model.steps = [["block", UsageChunk(1, 1)]]
    session = await rt.create_session(ttl=60)
    start = trio.current_time()
    turn = await session.send("hi")
    terminal = await turn.wait_finished()
    assert trio.current_time() - start == 60
    assert isinstance(terminal, MessageCancelled)
    assert terminal.reason == "session_expired"
    await session.wait_closed()
    assert not os.path.exists(session.workspace.root)
    assert await store.usage_records("local") == []


async def test_session_history_is_model_context(rt: Runtime, model: FakeModel) -> None:
    """Later turns see completed turns as context; cancelled turns are kept but not given."""
    session = await rt.create_session()
    await (await session.send("first")).wait_finished()
    model.steps = [["block", UsageChunk(1, 1)]]
    cancelled = await session.send("second")
    await cancelled.cancel()
    await cancelled.wait_finished()
    model.steps = [[TextChunk("third answer"), UsageChunk(1, 1)]]
    await (await session.send("third")).wait_finished()
    [*_, request] = model.requests
    assert [(m.role, m.content) for m in request.messages] == [
        ("user", "first"),
        ("assistant", "hello world"),
        ("user", "third"),
    ]
    assert [entry.status for entry in session.history()] == ["completed", "cancelled", "completed"]


async def test_session_send_rejects_empty_message(rt: Runtime) -> None:
    """An empty or non-string message is InvalidRequest and does not make the session busy."""
    session = await rt.create_session()
    for bad in ("", "   ", None, 3):
        with pytest.raises(InvalidRequest):
            await session.send(bad)  # type: ignore[arg-type]
    assert not session.busy


async def test_runtime_shutdown_cancels_and_cleans(tmp_path: Path, store: MemoryStore) -> None:
    """Leaving Runtime.open: running turns end cancelled(shutdown), unbilled; only persistent
    workspaces are kept."""
    model = FakeModel(steps=[["block", UsageChunk(1, 1)]])
    async with Runtime.open(data_dir=tmp_path, model=model, store=store) as rt:
        keep = await rt.create_session(persistent=True)
        drop = await rt.create_session()
        keep.workspace.write("a.txt", b"data")
        t1 = await keep.send("hi")
        t2 = await drop.send("hi")
        t3 = await rt.respond("hi")
    for turn in (t1, t2, t3):
        assert turn.state is TurnState.CANCELLED
        assert turn.cancel_reason == "shutdown"
        assert turn.buffer.terminal is not None
        assert turn.buffer.terminal.type.endswith(".cancelled")
    assert types(await collect(t3))[-1] == "response.cancelled"
    assert (Path(keep.workspace.root) / "a.txt").read_bytes() == b"data"
    assert not os.path.exists(drop.workspace.root)
    assert await store.usage_records("local") == []
    with pytest.raises(ShuttingDown):
        await rt.create_session()
    with pytest.raises(ShuttingDown):
        await keep.send("more")


async def test_runtime_outer_cancel_still_ends_turns(tmp_path: Path, store: MemoryStore) -> None:
    """Cancelling the scope around Runtime.open still gives every turn its terminal event."""
    model = FakeModel(steps=[["block", UsageChunk(1, 1)]])
    with trio.CancelScope() as outer:
        async with Runtime.open(data_dir=tmp_path, model=model, store=store) as rt:
            session = await rt.create_session()
            turn = await session.send("hi")
            await model.blocked.wait()
            outer.cancel()
            await trio.sleep_forever()
    assert turn.state is TurnState.CANCELLED
    assert turn.cancel_reason == "shutdown"
    assert not os.path.exists(session.workspace.root)
    assert await store.usage_records("local") == []


async def test_runtime_statistics(rt: Runtime, model: FakeModel) -> None:
    """statistics() counts sessions, running turns and buffered turns."""
    model.steps = [["block", UsageChunk(1, 1)]]
    a = await rt.create_session()
    b = await rt.create_session()
    running = await a.send("x")
    stats = rt.statistics()
    assert (stats.sessions, stats.running_turns, stats.buffered_turns) == (2, 1, 1)
    model.gate.set()
    await running.wait_finished()
    await (await b.send("y")).wait_finished()
    stats = rt.statistics()
    assert (stats.sessions, stats.running_turns, stats.buffered_turns) == (2, 0, 2)
    assert "sessions=2" in repr(rt)


async def test_runtime_has_no_public_constructor(tmp_path: Path) -> None:
    """Runtime(...) is refused with advice; Runtime.open is the only way."""
    with pytest.raises(TypeError, match=r"Runtime\.open"):
        Runtime(
            data_dir=tmp_path,
            model=FakeModel(),
            store=MemoryStore(),
            grace_seconds=1,
            idle_timeout=1,
            tool_limits=ToolLimits(),
            sandbox=DIRECT,
            prices={},
            _token=object(),
            _nursery=None,  # type: ignore[arg-type]
        )

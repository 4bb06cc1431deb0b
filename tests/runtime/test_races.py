"""Races and faults around a turn's start and end (found in review, pinned here)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing

from runtime import (
    Account,
    InvalidRequest,
    MemoryStore,
    MessageCancelled,
    MessageError,
    OutOfCredits,
    ResponseFailed,
    Runtime,
    SessionBusy,
    SessionClosed,
    ShuttingDown,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    Turn,
    TurnState,
    Usage,
    UsageChunk,
)
from runtime._agent import AgentLoop
from runtime._tools import ToolBox

from ..fakes import DelegatingStore, FakeModel
from ..helpers import collect, process_gone, state_of, types

if TYPE_CHECKING:
    from pathlib import Path

    from runtime import Store, TurnRecord, UsageRecord


@attrs.define(eq=False)
class GatedStore(DelegatingStore):
    """A Store that can hold begin_turn, complete_turn or get_account until released."""

    inner: Store = attrs.field(factory=MemoryStore)
    hold_start: trio.Event | None = None
    hold_record: trio.Event | None = None
    hold_account: trio.Event | None = None
    start_entered: trio.Event = attrs.field(factory=trio.Event)
    account_entered: trio.Event = attrs.field(factory=trio.Event)

    async def get_account(self, account_id: str) -> Account:
        self.account_entered.set()
        if self.hold_account is not None:
            await self.hold_account.wait()
        return await self.inner.get_account(account_id)

    async def begin_turn(self, record: TurnRecord) -> None:
        self.start_entered.set()
        if self.hold_start is not None:
            await self.hold_start.wait()
        await self.inner.begin_turn(record)

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        if self.hold_record is not None:
            await self.hold_record.wait()
        return await self.inner.complete_turn(usage, record)


async def test_race_cancel_before_turn_task_runs_lands(tmp_path: Path) -> None:
    """race: a cancel accepted before the turn task first runs still stops the body."""
    model = FakeModel(steps=[[TextChunk("x"), "block", UsageChunk(1, 1)]])
    async with Runtime.open(data_dir=tmp_path, model=model) as rt:
        session = await rt.create_session()
        turn = rt._new_turn(
            prefix="msg",
            account_id="local",
            session_id=session.id,
            text="hi",
            body=AgentLoop(model=model, toolbox=ToolBox(workspace=session.workspace), context=()),
            on_finished=lambda t: None,
        )
        assert turn._cancel("session_deleted").value == "cancelling"
        async with trio.open_nursery() as nursery:
            await nursery.start(turn._run)
            with trio.fail_after(5):
                await turn.wait_finished()
    assert turn.state is TurnState.CANCELLED
    assert not model.blocked.is_set()  # the body never got to run


async def test_race_delete_while_send_awaits_the_store(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """race: DELETE during send's credit check: send fails, DELETE returns at once, the
    claimed response id (named by a concurrent 409) ends message.cancelled."""
    store = GatedStore(hold_start=trio.Event())
    async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
        session = await rt.create_session()
        errors: list[BaseException] = []

        async def send() -> None:
            try:
                await session.send("hi")
            except SessionClosed as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await store.start_entered.wait()
            with pytest.raises(SessionBusy) as busy:
                await session.send("again")
            turn = rt.get_turn(busy.value.response_id)  # the 409 names a real response
            start = trio.current_time()
            await rt.delete_session(session.id)
            assert trio.current_time() - start < 1
            store.hold_start.set()  # type: ignore[union-attr]
        assert len(errors) == 1
        terminal = await turn.wait_finished()
        assert isinstance(terminal, MessageCancelled)
        assert terminal.reason == "session_deleted"


async def test_race_refused_start_ends_its_turn(tmp_path: Path) -> None:
    """A start refused for credits ends the claimed turn with message.error; session idle."""
    inner = MemoryStore()
    inner.create_account("poor", credits=0.0)
    store = GatedStore(inner, hold_start=trio.Event())
    async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
        session = await rt.create_session(account_id="poor")
        refused: list[OutOfCredits] = []

        async def send() -> None:
            try:
                await session.send("hi")
            except OutOfCredits as exc:
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await store.start_entered.wait()
            rid = session.active_response_id
            assert rid is not None
            store.hold_start.set()  # type: ignore[union-attr]
        assert len(refused) == 1
        turn = rt.get_turn(rid)
        terminal = await turn.wait_finished()
        assert isinstance(terminal, MessageError)
        assert "out_of_credits" in terminal.error
        assert not session.busy
        assert session.history() == []


async def test_race_ledger_that_hangs_fails_the_turn(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A ledger write that never returns: after LEDGER_TIMEOUT the turn ends failed, unbilled."""
    from runtime._turn import LEDGER_TIMEOUT

    store = GatedStore(hold_record=trio.Event())
    async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
        session = await rt.create_session()
        turn = await session.send("hi")
        start = trio.current_time()
        terminal = await turn.wait_finished()
        assert isinstance(terminal, MessageError)
        assert terminal.error.startswith("store_error:")
        assert trio.current_time() - start == pytest.approx(LEDGER_TIMEOUT, abs=0.01)
    assert await store.inner.usage_records("local") == []


@attrs.define
class BadUsageModel:
    name: str = "fake"

    async def stream(self, request: object):  # type: ignore[no-untyped-def]
        yield TextChunk("x")
        yield UsageChunk(None, 1)  # type: ignore[arg-type]  # a buggy upstream


async def test_race_bad_usage_fails_only_that_turn(tmp_path: Path) -> None:
    """Non-numeric usage fails that turn (response.failed), never the runtime."""
    async with Runtime.open(data_dir=tmp_path, model=BadUsageModel()) as rt:
        turn = await rt.respond("hi")
        terminal = await turn.wait_finished()
        assert isinstance(terminal, ResponseFailed)
        session = await rt.create_session()
        assert types(await collect(await session.send("hi")))[-1] == "message.error"
        assert rt.statistics().running_turns == 0
        assert await rt.store.usage_records("local") == []


def test_usage_must_be_non_negative_ints() -> None:
    """Usage refuses None, floats and negative counts."""
    for bad in ((None, 1), (1.5, 1), (-1, 0)):
        with pytest.raises((TypeError, ValueError)):
            Usage(*bad)


async def test_race_session_start_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose workspace cannot be made is not left registered; shutdown is prompt."""

    def broken_makedirs(path: str, exist_ok: bool = False) -> None:
        raise OSError(28, "No space left on device")

    with trio.fail_after(5):
        async with Runtime.open(data_dir=tmp_path, model=FakeModel()) as rt:
            monkeypatch.setattr(os, "makedirs", broken_makedirs)
            with pytest.raises(OSError, match="No space"):
                await rt.create_session()
            assert rt.sessions() == []
            monkeypatch.undo()
            assert (await rt.create_session()).status == "ready"


async def test_race_create_session_during_shutdown(tmp_path: Path) -> None:
    """create_session racing shutdown raises ShuttingDown (503), not a 500."""
    release = trio.Event()
    store = GatedStore(hold_account=release)
    outcome: list[BaseException] = []
    async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:

        async def create() -> None:
            try:
                await rt.create_session()
            except ShuttingDown as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await store.account_entered.wait()
            nursery.start_soon(rt.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert len(outcome) == 1
    assert rt.sessions() == []


async def test_race_session_forgets_evicted_turns(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A session keeps compact history, not Turn objects: evicted turns are freed."""
    import gc
    import weakref

    # A MemoryStore: the autojump clock would jump while the SQLite thread works.
    async with Runtime.open(
        data_dir=tmp_path, model=FakeModel(), store=MemoryStore(), grace_seconds=5
    ) as rt:
        session = await rt.create_session(persistent=True)
        turn = await session.send("hi")
        await turn.wait_finished()
        ref = weakref.ref(turn)
        rid = turn.id
        del turn
        await trio.sleep(6)
        gc.collect()
        assert ref() is None
        [entry] = session.history()
        assert (entry.id, entry.status, entry.output_text) == (rid, "completed", "hello world")


async def test_tools_shell_does_not_inherit_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_shell's environment is an allow-list: the server's secrets are not in it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    args = json.dumps({"command": "env"})
    model = FakeModel(
        steps=[
            [ToolCallStart("c", "run_shell"), ToolCallDelta("c", args), UsageChunk(1, 1)],
            [TextChunk("ok"), UsageChunk(1, 1)],
        ]
    )
    with trio.fail_after(10):
        async with Runtime.open(data_dir=tmp_path, model=model) as rt:
            session = await rt.create_session()
            turn = await session.send("env")
            await turn.wait_finished()
    [call] = turn.tool_calls
    assert "sk-very-secret" not in call.output
    # In the sandbox the workspace is /opt/sandbox/workspace: no host path shows.
    seen_as = rt.sandbox.workspace_path or session.workspace.root
    assert f"WORKSPACE={seen_as}" in call.output
    if rt.sandbox.workspace_path is not None:
        assert str(tmp_path) not in call.output


async def test_tools_setsid_escapee_does_not_hold_the_call(tmp_path: Path) -> None:
    """A process that setsid-escapes the group cannot keep run_shell waiting for
    EOF, and is killed with the call (by its environment marker)."""
    from runtime._process import run_shell

    with trio.fail_after(10):
        start = trio.current_time()
        result = await run_shell("setsid sleep 30 & echo $! > pid; echo done", cwd=str(tmp_path))
        elapsed = trio.current_time() - start
    escaped = int((tmp_path / "pid").read_text())
    assert process_gone(escaped)
    assert result.output == b"done\n"
    assert not result.timed_out
    assert elapsed < 3


def test_turn_state_helper_reads_live_state(tmp_path: Path) -> None:
    """(helper) state_of reads the attribute each time."""

    @attrs.define
    class T:
        state: TurnState = TurnState.IN_PROGRESS

    t = T()
    t.state = TurnState.CANCELLED
    assert state_of(t) is TurnState.CANCELLED  # type: ignore[arg-type]


async def test_invalid_request_is_value_error() -> None:
    """InvalidRequest is a ValueError, so generic callers can catch it."""
    assert issubclass(InvalidRequest, ValueError)
    await trio.lowlevel.checkpoint()
    _ = Turn  # public type is importable

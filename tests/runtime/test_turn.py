"""Turns: cancel at every stage, the finalize interleavings, billing exactly once."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing

from runtime import (
    CancelOutcome,
    MemoryStore,
    MessageCancelled,
    MessageCompleted,
    MessageError,
    ModelChunk,
    ModelRequest,
    NotFound,
    OutOfCredits,
    Runtime,
    SessionBusy,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    Turn,
    TurnState,
    Usage,
    UsageChunk,
)

from ..fakes import FakeModel
from ..helpers import collect, group_gone, process_gone, state_of, types, wait_for_children

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

# FakeModel's default script: "hello world", 3 tokens in, 2 out; priced at
# 1 credit per input and 2 per output token in conftest: 7 credits.
COST = 7.0


async def assert_unbilled(store: MemoryStore, turn: Turn) -> None:
    assert await store.usage_records("local") == []
    assert (await store.get_account("local")).balance == 1000.0
    assert turn.usage is None


async def test_turn_completes_and_is_billed_once(rt: Runtime, store: MemoryStore) -> None:
    """A completed turn ends message.completed and writes one usage record and debit."""
    session = await rt.create_session()
    turn = await session.send("hi")
    events = await collect(turn)
    assert types(events) == [
        "message.created",
        "text.start",
        "text.delta",
        "text.delta",
        "text.stop",
        "message.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert {e.response_id for e in events} == {turn.id}
    assert isinstance(events[-1], MessageCompleted)
    assert events[-1].usage == Usage(3, 2)
    assert turn.state is TurnState.COMPLETED
    assert turn.output_text == "hello world"
    [record] = await store.usage_records("local")
    assert (record.response_id, record.session_id, record.model) == (turn.id, session.id, "fake")
    assert (record.input_tokens, record.output_tokens, record.credits) == (3, 2, COST)
    assert (await store.get_account("local")).balance == 1000.0 - COST
    # The ledger refuses a second write for the same response id.
    assert await store.complete_turn(record, turn.record()) is False
    assert (await store.get_account("local")).balance == 1000.0 - COST


async def test_turn_send_returns_at_once_with_created_event(rt: Runtime, model: FakeModel) -> None:
    """send() returns while the model is still blocked, with message.created at seq 0."""
    model.steps = [["block", TextChunk("x"), UsageChunk(1, 1)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    assert turn.id.startswith("msg_")
    assert len(turn.id) == 4 + 32
    assert turn.state is TurnState.IN_PROGRESS
    assert types(list(turn.buffer.snapshot())) == ["message.created"]
    assert session.busy
    assert session.active_response_id == turn.id
    model.gate.set()
    await turn.wait_finished()
    assert not session.busy
    assert session.active_response_id is None


async def test_turn_cancel_immediately_after_send(rt: Runtime, store: MemoryStore) -> None:
    """A cancel right after send (the body may have streamed a little) ends cancelled, unbilled."""
    session = await rt.create_session()
    turn = await session.send("hi")
    assert await turn.cancel() is CancelOutcome.CANCELLING
    events = await collect(turn)
    # trio may run the turn a step before the caller resumes: what was
    # appended by then is a prefix of the normal stream, then the terminal.
    normal = ["message.created", "text.start", "text.delta", "text.delta", "text.stop"]
    assert types(events)[:-1] == normal[: len(events) - 1]
    assert isinstance(events[-1], MessageCancelled)
    assert events[-1].reason == "client_cancel"
    await assert_unbilled(store, turn)


async def test_turn_cancel_before_first_token(
    rt: Runtime, model: FakeModel, store: MemoryStore
) -> None:
    """A cancel while the model has not produced a token: no text event, model stream closed."""
    model.steps = [["block", TextChunk("late"), UsageChunk(1, 1)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    await model.blocked.wait()
    assert await turn.cancel() is CancelOutcome.CANCELLING
    assert types(await collect(turn)) == ["message.created", "message.cancelled"]
    assert model.closed == 1
    assert turn.state is TurnState.CANCELLED
    assert not session.busy
    await assert_unbilled(store, turn)


async def test_turn_cancel_mid_stream_seals_buffer(
    rt: Runtime, model: FakeModel, store: MemoryStore
) -> None:
    """After a mid-stream cancel the next event is the terminal one; nothing more is appended."""
    model.steps = [[TextChunk("a "), TextChunk("b "), "block", TextChunk("c"), UsageChunk(1, 3)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    await model.blocked.wait()
    seen = len(turn.buffer)
    assert await turn.cancel() is CancelOutcome.CANCELLING
    model.gate.set()  # even if the model could go on, nothing reaches the buffer
    events = await collect(turn)
    assert len(events) == seen + 1
    assert types(events) == [
        "message.created",
        "text.start",
        "text.delta",
        "text.delta",
        "message.cancelled",
    ]
    assert turn.output_text == "a b "
    await assert_unbilled(store, turn)


async def test_turn_repeat_cancel_before_it_lands_is_still_cancelling(
    rt: Runtime, model: FakeModel, store: MemoryStore
) -> None:
    """Repeat cancels before the turn unwinds answer CANCELLING; after, ALREADY_COMPLETE."""
    model.steps = [[TextChunk("a"), "shielded-block", TextChunk("b"), UsageChunk(1, 2)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    await model.blocked.wait()
    assert await turn.cancel() is CancelOutcome.CANCELLING
    assert await turn.cancel() is CancelOutcome.CANCELLING
    assert turn.state is TurnState.CANCELLING
    model.gate.set()
    terminal = await turn.wait_finished()
    assert isinstance(terminal, MessageCancelled)
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    await assert_unbilled(store, turn)


async def test_turn_cancel_accepted_after_last_checkpoint_still_ends_cancelled(
    rt: Runtime, store: MemoryStore
) -> None:
    """race: cancel accepted after the body's last checkpoint -> FINISH -> CANCELLED, unbilled."""
    outcomes: list[CancelOutcome] = []

    @attrs.define
    class CancelsItself:
        name: str = "fake"

        async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
            yield TextChunk("x")
            # From here to the end of the body there is no checkpoint.
            [turn] = [t for t in rt._turns.values() if t.state.is_running]
            outcomes.append(turn._cancel("client_cancel"))
            yield UsageChunk(1, 1)

    rt.model = CancelsItself()
    session = await rt.create_session()
    turn = await session.send("hi")
    events = await collect(turn)
    assert outcomes == [CancelOutcome.CANCELLING]
    assert types(events)[-1] == "message.cancelled"
    assert turn.state is TurnState.CANCELLED
    await assert_unbilled(store, turn)


async def test_turn_cancel_during_finalizing_is_already_complete(
    rt: Runtime, store: MemoryStore
) -> None:
    """race: a cancel while finalizing answers ALREADY_COMPLETE and the turn completes, billed."""
    entered, release = trio.Event(), trio.Event()

    async def hook(turn: Turn) -> None:
        entered.set()
        await release.wait()

    rt._for_testing_finalizing = hook
    session = await rt.create_session()
    turn = await session.send("hi")
    await entered.wait()
    assert turn.state is TurnState.FINALIZING
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    assert turn.state is TurnState.FINALIZING
    release.set()
    assert isinstance(await turn.wait_finished(), MessageCompleted)
    assert state_of(turn) is TurnState.COMPLETED
    assert len(await store.usage_records("local")) == 1


async def test_turn_finalizing_survives_runtime_shutdown(tmp_path: object) -> None:
    """race: shutdown while finalizing: the turn still completes and is billed exactly once."""
    store = MemoryStore()
    entered = trio.Event()

    async def hook(turn: Turn) -> None:
        entered.set()
        await trio.sleep(0.01)

    async with Runtime.open(data_dir=str(tmp_path), model=FakeModel(), store=store) as rt:
        rt._for_testing_finalizing = hook
        session = await rt.create_session()
        turn = await session.send("hi")
        await entered.wait()
    assert turn.state is TurnState.COMPLETED
    assert len(await store.usage_records("local")) == 1


async def test_turn_cancel_after_completion(rt: Runtime, store: MemoryStore) -> None:
    """Cancel after the terminal event answers ALREADY_COMPLETE and changes nothing."""
    session = await rt.create_session()
    turn = await session.send("hi")
    await turn.wait_finished()
    before = turn.buffer.snapshot()
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    assert turn.buffer.snapshot() == before
    assert turn.state is TurnState.COMPLETED
    assert len(await store.usage_records("local")) == 1


async def test_turn_model_failure_ends_message_error_unbilled(
    rt: Runtime, model: FakeModel, store: MemoryStore
) -> None:
    """A model that raises ends message.error, unbilled; a cancel is then ALREADY_COMPLETE."""
    model.steps = [[TextChunk("a"), "raise"]]
    session = await rt.create_session()
    turn = await session.send("hi")
    events = await collect(turn)
    assert isinstance(events[-1], MessageError)
    assert events[-1].error == "internal_error (RuntimeError); see the server log"
    assert turn.state is TurnState.FAILED
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    await assert_unbilled(store, turn)
    # The session is usable again.
    model.steps = [[TextChunk("ok"), UsageChunk(1, 1)]]
    assert types(await collect(await session.send("again")))[-1] == "message.completed"


async def test_turn_evicted_after_grace(rt: Runtime, autojump_clock: trio.abc.Clock) -> None:
    """A finished turn is found until grace_seconds after its terminal event, then NotFound."""
    session = await rt.create_session(persistent=True)
    turn = await session.send("hi")
    await turn.wait_finished()
    start = trio.current_time()
    await trio.sleep(rt.grace_seconds - 1)
    assert rt.get_turn(turn.id) is turn
    assert await turn.cancel() is CancelOutcome.ALREADY_COMPLETE
    await trio.sleep(2)
    assert trio.current_time() - start == rt.grace_seconds + 1
    with pytest.raises(NotFound, match=turn.id):
        rt.get_turn(turn.id)
    assert rt.statistics().buffered_turns == 0


async def test_turn_unknown_id_is_not_found(rt: Runtime) -> None:
    """get_turn of an id never issued raises NotFound."""
    with pytest.raises(NotFound):
        rt.get_turn("msg_" + "0" * 32)


async def test_turn_second_send_is_busy(rt: Runtime, model: FakeModel) -> None:
    """A second send while a turn runs raises SessionBusy naming the running response id."""
    model.steps = [["block", UsageChunk(1, 1)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    with pytest.raises(SessionBusy, match=turn.id) as info:
        await session.send("again")
    assert info.value.response_id == turn.id
    assert info.value.status_hint == 409
    model.gate.set()
    await turn.wait_finished()


async def test_turn_concurrent_sends_start_one_turn(rt: Runtime, model: FakeModel) -> None:
    """Of many concurrent sends on one session exactly one starts a turn."""
    model.steps = [["block", UsageChunk(1, 1)]]
    session = await rt.create_session()
    started: list[Turn] = []
    busy: list[SessionBusy] = []

    async def send() -> None:
        try:
            started.append(await session.send("hi"))
        except SessionBusy as exc:
            busy.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(send)
    assert len(started) == 1
    assert len(busy) == 9
    assert {exc.response_id for exc in busy} == {started[0].id}
    model.gate.set()


async def test_turn_out_of_credits(rt: Runtime, store: MemoryStore) -> None:
    """A turn on an account with no credits raises OutOfCredits and leaves the session idle."""
    store.create_account("poor", credits=0.0)
    session = await rt.create_session(account_id="poor")
    with pytest.raises(OutOfCredits) as info:
        await session.send("hi")
    assert info.value.status_hint == 402
    assert not session.busy
    store.add_credits("poor", 10.0)
    assert types(await collect(await session.send("hi")))[-1] == "message.completed"
    assert (await store.get_account("poor")).balance == 10.0 - COST


async def test_turn_resume_from_every_sequence_number(rt: Runtime, model: FakeModel) -> None:
    """events(after=N) gives exactly the live stream's events after N, for every N."""
    model.steps = [[*(TextChunk(f"w{i} ") for i in range(20)), UsageChunk(1, 20)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    live = await collect(turn)
    for n in range(-1, len(live) + 1):
        assert await collect(turn, after=n) == live[n + 1 :]
    assert await collect(turn, after=None) == live


async def test_turn_resume_while_live(rt: Runtime, model: FakeModel) -> None:
    """Readers attached mid-turn at different cursors all end with the same contiguous tail."""
    model.steps = [[TextChunk("a"), TextChunk("b"), "block", TextChunk("c"), UsageChunk(1, 3)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    await model.blocked.wait()
    results: dict[int, list[str]] = {}

    async def read(after: int) -> None:
        results[after] = [f"{e.sequence_number}:{e.type}" async for e in turn.events(after)]

    async with trio.open_nursery() as nursery:
        for after in (-1, 0, 2, 3):
            nursery.start_soon(read, after)
        await trio.testing.wait_all_tasks_blocked()
        model.gate.set()
    full = results[-1]
    assert full[-1].endswith("message.completed")
    for after, got in results.items():
        assert got == full[after + 1 :]


async def test_turn_reader_cancel_does_not_affect_turn(rt: Runtime, model: FakeModel) -> None:
    """Cancelling a reader mid-stream ends only the reader; the turn completes."""
    model.steps = [[TextChunk("a"), "block", TextChunk("b"), UsageChunk(1, 2)]]
    session = await rt.create_session()
    turn = await session.send("hi")
    with trio.move_on_after(1):
        async for _ in turn.events():
            pass
    assert turn.state is TurnState.IN_PROGRESS
    model.gate.set()
    assert isinstance(await turn.wait_finished(), MessageCompleted)


async def test_turn_cancel_during_tool_call_kills_process_group(
    tmp_path: object, store: MemoryStore
) -> None:
    """Cancel during run_shell: message.cancelled, and the shell and its grandchild are gone."""
    pids: list[int] = []
    args = json.dumps({"command": "sleep 100 & sleep 100"})
    model = FakeModel(
        steps=[[ToolCallStart("c1", "run_shell"), ToolCallDelta("c1", args), UsageChunk(1, 1)]]
    )
    with trio.fail_after(10):
        async with Runtime.open(data_dir=str(tmp_path), model=model, store=store) as rt:
            rt._for_testing_on_process = pids.append
            session = await rt.create_session()
            turn = await session.send("run it")
            children = await wait_for_children(pids)
            [pid] = pids
            assert await turn.cancel() is CancelOutcome.CANCELLING
            terminal = await turn.wait_finished()
            # By the time the terminal event exists, every process is dead.
            assert process_gone(pid)
            assert all(process_gone(child) for child in children)
            assert group_gone(pid)
            assert isinstance(terminal, MessageCancelled)
            assert types(await collect(turn))[-3:] == [
                "tool_use.input_delta",
                "tool_use.executing",
                "message.cancelled",
            ]
            assert await store.usage_records("local") == []
            # The workspace survives a cancel.
            assert session.workspace.list() == []
            assert not session.busy

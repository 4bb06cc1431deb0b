"""The turn lifecycle table (``runtime/_state.py``), walked without trio."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from runtime import InvalidTransition
from runtime._state import (
    TRANSITIONS,
    CancelOutcome,
    TurnInput,
    TurnState,
    cancel_outcome,
    next_state,
)

TERMINAL = (TurnState.COMPLETED, TurnState.CANCELLED, TurnState.FAILED)
ALL_PAIRS = list(itertools.product(TurnState, TurnInput))
UNDEFINED_PAIRS = [pair for pair in ALL_PAIRS if pair not in TRANSITIONS]


def _pair_id(pair: tuple[TurnState, TurnInput]) -> str:
    return f"{pair[0].name}-{pair[1].name}"


def test_state_table_keys_and_values_are_members() -> None:
    """Every key and value of TRANSITIONS is a (TurnState, TurnInput) -> TurnState."""
    for (state, event), new in TRANSITIONS.items():
        assert isinstance(state, TurnState)
        assert isinstance(event, TurnInput)
        assert isinstance(new, TurnState)


@pytest.mark.parametrize("pair", list(TRANSITIONS), ids=_pair_id)
def test_state_next_state_follows_table(pair: tuple[TurnState, TurnInput]) -> None:
    """next_state returns exactly the table's entry for every defined pair."""
    assert next_state(*pair) is TRANSITIONS[pair]


@pytest.mark.parametrize("pair", UNDEFINED_PAIRS, ids=_pair_id)
def test_state_undefined_pair_raises(pair: tuple[TurnState, TurnInput]) -> None:
    """Every (state, input) pair missing from TRANSITIONS raises InvalidTransition."""
    state, event = pair
    with pytest.raises(InvalidTransition, match=rf"from {state!r} on {event!r}"):
        next_state(state, event)


def test_state_undefined_pairs_are_exactly_the_expected_ones() -> None:
    """The table leaves out exactly the pairs the lifecycle diagram does not draw."""
    s, i = TurnState, TurnInput
    expected_undefined = {
        (s.IN_PROGRESS, i.FINALIZED),
        (s.CANCELLING, i.FINALIZED),
        (s.FINALIZING, i.UNWOUND),
        (s.FINALIZING, i.FINISH),
        *((t, e) for t in TERMINAL for e in TurnInput if e is not i.CANCEL),
    }
    assert set(UNDEFINED_PAIRS) == expected_undefined
    assert len(TRANSITIONS) + len(UNDEFINED_PAIRS) == len(TurnState) * len(TurnInput)


def test_state_is_terminal_and_is_running() -> None:
    """Exactly COMPLETED, CANCELLED and FAILED are terminal; the rest are running."""
    for state in TurnState:
        assert state.is_terminal is (state in TERMINAL)
        assert state.is_running is not state.is_terminal


@pytest.mark.parametrize("state", TERMINAL, ids=lambda s: s.name)
def test_state_terminal_absorbs_cancel_and_rejects_rest(state: TurnState) -> None:
    """A terminal state stays put on CANCEL and rejects every other input."""
    assert next_state(state, TurnInput.CANCEL) is state
    assert cancel_outcome(next_state(state, TurnInput.CANCEL)) is CancelOutcome.ALREADY_COMPLETE
    for event in TurnInput:
        if event is TurnInput.CANCEL:
            continue
        with pytest.raises(InvalidTransition):
            next_state(state, event)


def test_state_terminal_states_have_no_way_out() -> None:
    """No defined transition leaves a terminal state."""
    for (state, _), new in TRANSITIONS.items():
        if state.is_terminal:
            assert new is state


def test_state_cancelling_always_ends_cancelled() -> None:
    """From CANCELLING, CANCEL stays CANCELLING and every other defined input ends CANCELLED."""
    defined = {e: new for (s, e), new in TRANSITIONS.items() if s is TurnState.CANCELLING}
    assert defined[TurnInput.CANCEL] is TurnState.CANCELLING
    others = {e: new for e, new in defined.items() if e is not TurnInput.CANCEL}
    assert set(others) == {TurnInput.UNWOUND, TurnInput.FINISH, TurnInput.FAIL}
    assert set(others.values()) == {TurnState.CANCELLED}


def test_state_finalizing_ignores_cancel() -> None:
    """A cancel during FINALIZING leaves it FINALIZING and answers ALREADY_COMPLETE."""
    new = next_state(TurnState.FINALIZING, TurnInput.CANCEL)
    assert new is TurnState.FINALIZING
    assert cancel_outcome(new) is CancelOutcome.ALREADY_COMPLETE
    assert next_state(TurnState.FINALIZING, TurnInput.FINALIZED) is TurnState.COMPLETED
    assert next_state(TurnState.FINALIZING, TurnInput.FAIL) is TurnState.FAILED


def test_state_in_progress_cancel_answers_cancelling() -> None:
    """IN_PROGRESS + CANCEL goes to CANCELLING, answered CANCELLING."""
    new = next_state(TurnState.IN_PROGRESS, TurnInput.CANCEL)
    assert new is TurnState.CANCELLING
    assert cancel_outcome(new) is CancelOutcome.CANCELLING


def test_state_repeated_cancel_answers_cancelling() -> None:
    """A second cancel while CANCELLING is still answered CANCELLING."""
    new = next_state(TurnState.CANCELLING, TurnInput.CANCEL)
    assert cancel_outcome(new) is CancelOutcome.CANCELLING


@pytest.mark.parametrize(
    "state", [s for s in TurnState if s is not TurnState.CANCELLING], ids=lambda s: s.name
)
def test_state_cancel_outcome_already_complete_otherwise(state: TurnState) -> None:
    """cancel_outcome answers ALREADY_COMPLETE for every state but CANCELLING."""
    assert cancel_outcome(state) is CancelOutcome.ALREADY_COMPLETE


def test_state_reprs_name_the_member() -> None:
    """TurnState and CancelOutcome reprs read as their qualified names."""
    assert repr(TurnState.CANCELLING) == "TurnState.CANCELLING"
    assert repr(CancelOutcome.ALREADY_COMPLETE) == "CancelOutcome.ALREADY_COMPLETE"


def _check_walk(inputs: list[TurnInput] | tuple[TurnInput, ...]) -> None:
    """Apply ``inputs`` from IN_PROGRESS (skipping rejected ones) and check the promises."""
    state = TurnState.IN_PROGRESS
    visited = [state]
    first_cancel_from: TurnState | None = None
    for event in inputs:
        if (state, event) not in TRANSITIONS:
            # An undefined input is rejected and changes nothing.
            with pytest.raises(InvalidTransition):
                next_state(state, event)
            continue
        if event is TurnInput.CANCEL and first_cancel_from is None:
            first_cancel_from = state
        state = next_state(state, event)
        visited.append(state)

    if first_cancel_from is TurnState.IN_PROGRESS and state.is_terminal:
        assert state is TurnState.CANCELLED
    if state is TurnState.COMPLETED:
        assert TurnState.FINALIZING in visited
        assert first_cancel_from is not TurnState.IN_PROGRESS
        assert TurnState.CANCELLING not in visited
    # Once terminal, a turn never leaves its terminal state.
    for before, after in itertools.pairwise(visited):
        if before.is_terminal:
            assert after is before


@settings(max_examples=500, database=None, deadline=None)
@given(st.lists(st.sampled_from(TurnInput), max_size=12))
def test_state_random_inputs_keep_cancel_promises(inputs: list[TurnInput]) -> None:
    """Random inputs: an early cancel ends CANCELLED; COMPLETED only via FINALIZING, uncancelled."""
    _check_walk(inputs)


def test_state_all_short_input_sequences_keep_cancel_promises() -> None:
    """Every input sequence of length <= 5 keeps the same promises (exhaustive)."""
    for length in range(6):
        for inputs in itertools.product(TurnInput, repeat=length):
            _check_walk(inputs)

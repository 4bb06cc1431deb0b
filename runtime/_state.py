"""The turn lifecycle: a transition table and one synchronous function.

Theory of operation
-------------------
A turn's fate is decided here and nowhere else. Every input that can change
it is a :class:`TurnInput`; :func:`next_state` maps (state, input) to the new
state through :data:`TRANSITIONS`, and raises :class:`InvalidTransition` for a
pair the table does not list. The function is synchronous, and trio runs one
task at a time, so a transition is atomic: no other task can observe or act on
a half-made decision.

::

                 CANCEL                     UNWOUND | FINISH | FAIL
    IN_PROGRESS ────────> CANCELLING ───────────────────────────────> CANCELLED
        │  │                 │ CANCEL (again: still CANCELLING)
        │  │ FAIL
        │  └──────────────────────────────────────────────────────> FAILED
        │ FINISH                         FINALIZED
        └──────────> FINALIZING ──────────────────────> COMPLETED
                        │ CANCEL (ignored: ALREADY_COMPLETE)
                        │ FAIL (the ledger write failed)
                        └─────────────────────────────> FAILED

The promises that follow from the table:

* A cancel accepted before ``FINALIZING`` (the answer was ``CANCELLING``)
  always ends ``CANCELLED``: from ``CANCELLING`` every input leads there, even
  a body that finished or failed before it reached a checkpoint.
* A cancel during or after ``FINALIZING`` changes nothing and is answered
  ``ALREADY_COMPLETE``; a turn that entered ``FINALIZING`` is charged exactly
  once by its single writer, the turn task.
* Terminal states absorb ``CANCEL`` and reject everything else.

The table is data so that tests can walk it without trio
(``tests/runtime/test_state.py``).
"""

from __future__ import annotations

import enum
from typing import Final

from ._errors import InvalidTransition


class TurnState(enum.Enum):
    """Where a turn is in its lifecycle."""

    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    def __repr__(self) -> str:
        return f"TurnState.{self.name}"

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, CANCELLED and FAILED."""
        return self in _TERMINAL

    @property
    def is_running(self) -> bool:
        """True until the turn reaches a terminal state."""
        return self not in _TERMINAL


class TurnInput(enum.Enum):
    """Everything that can change a turn's state."""

    #: A caller asked to cancel (``turn.cancel()``, session DELETE, shutdown).
    CANCEL = "cancel"
    #: The turn's body left its cancel scope because of the cancel.
    UNWOUND = "unwound"
    #: The body finished its work; the turn is about to be charged.
    FINISH = "finish"
    #: The usage record and debit are written.
    FINALIZED = "finalized"
    #: The body or the ledger raised.
    FAIL = "fail"


class CancelOutcome(enum.Enum):
    """The answer to a cancel request (HTTP 202 or 200)."""

    CANCELLING = "cancelling"
    ALREADY_COMPLETE = "already_complete"

    def __repr__(self) -> str:
        return f"CancelOutcome.{self.name}"


S = TurnState
I = TurnInput  # noqa: E741  (the table reads better with one-letter names)

_TERMINAL: Final = frozenset({S.COMPLETED, S.CANCELLED, S.FAILED})

#: (state, input) -> new state. Pairs missing here are bugs.
TRANSITIONS: Final[dict[tuple[TurnState, TurnInput], TurnState]] = {
    (S.IN_PROGRESS, I.CANCEL): S.CANCELLING,
    (S.IN_PROGRESS, I.FINISH): S.FINALIZING,
    (S.IN_PROGRESS, I.FAIL): S.FAILED,
    # An outer cancel (the runtime's or session's nursery) reached the body
    # without a cancel request: treat it as the cancel and its unwinding.
    (S.IN_PROGRESS, I.UNWOUND): S.CANCELLED,
    (S.CANCELLING, I.CANCEL): S.CANCELLING,
    (S.CANCELLING, I.UNWOUND): S.CANCELLED,
    (S.CANCELLING, I.FINISH): S.CANCELLED,
    (S.CANCELLING, I.FAIL): S.CANCELLED,
    (S.FINALIZING, I.CANCEL): S.FINALIZING,
    (S.FINALIZING, I.FINALIZED): S.COMPLETED,
    (S.FINALIZING, I.FAIL): S.FAILED,
    (S.COMPLETED, I.CANCEL): S.COMPLETED,
    (S.CANCELLED, I.CANCEL): S.CANCELLED,
    (S.FAILED, I.CANCEL): S.FAILED,
}

del S, I


def next_state(state: TurnState, event: TurnInput) -> TurnState:
    """Return the state that ``event`` leads to from ``state``.

    Raises:
      InvalidTransition: if the table has no such transition.
    """
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(f"no transition from {state!r} on {event!r}") from None


def cancel_outcome(new_state: TurnState) -> CancelOutcome:
    """The answer to a cancel request that left the turn in ``new_state``."""
    if new_state is TurnState.CANCELLING:
        return CancelOutcome.CANCELLING
    return CancelOutcome.ALREADY_COMPLETE

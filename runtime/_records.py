"""What the store keeps: accounts, turns, usage records, sessions, keys.

Plain frozen attrs values, shared by every :class:`~runtime.Store`
implementation and the runtime. A :class:`TurnRecord` is a turn as it is
remembered once its buffer is gone: a session's history item, the answer of
``GET …/responses/{rid}`` after eviction or restart, and what rate-limit
windows count.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from ._events import ResponseSnapshot, Usage  # noqa: TC001 (cattrs resolves these at runtime)

#: Rate-limit buckets: session messages and stateless responses.
BUCKETS: Final = ("session_turn", "response")
#: Rate-limit windows and their lengths in seconds.
WINDOWS: Final = {"hour": 3600.0, "day": 86400.0}
#: The cancel reason of turns that were running when the process died.
INTERRUPTED: Final = "interrupted"


class CreditMode(enum.Enum):
    """How an account's balance limits new turns."""

    #: Debits are recorded and the balance may go negative; nothing is refused.
    SOFT = "soft"
    #: A new turn is refused with :class:`OutOfCredits` once the balance is
    #: at or below the account's ``min_balance``.
    HARD = "hard"


def _positive_or_none(_: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer or None, not {value!r}")


@attrs.frozen(kw_only=True)
class WindowLimit:
    """The most turns and tokens one bucket of an account may use in one window.

    A turn counts when it starts (a cancelled turn counts); its tokens count
    when it completes. ``None`` means unlimited.
    """

    bucket: str = attrs.field(validator=attrs.validators.in_(BUCKETS))
    window: str = attrs.field(validator=attrs.validators.in_(tuple(WINDOWS)))
    max_turns: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_tokens: int | None = attrs.field(default=None, validator=_positive_or_none)


@attrs.frozen
class Account:
    """An account's credit state and rate limits."""

    id: str
    balance: float
    mode: CreditMode = CreditMode.HARD
    #: Hard mode refuses a new turn unless ``balance > min_balance`` (the
    #: per-turn minimum).
    min_balance: float = 0.0
    limits: tuple[WindowLimit, ...] = ()

    def limit(self, bucket: str, window: str) -> WindowLimit | None:
        for limit in self.limits:
            if limit.bucket == bucket and limit.window == window:
                return limit
        return None


@attrs.frozen
class ToolCallRecord:
    """A tool call a turn made, with its result."""

    id: str
    name: str
    arguments: str
    output: str
    is_error: bool


@attrs.frozen(kw_only=True)
class TurnRecord:
    """A turn as the store and its session remember it (no event buffer).

    ``status`` is ``in_progress`` (running, or interrupted by a crash until
    the next start-up), ``completed``, ``cancelled`` or ``failed``.
    """

    id: str
    account_id: str
    #: None for a stateless response.
    session_id: str | None
    model: str
    status: str
    input: str
    created_at: float
    output_text: str = ""
    tool_calls: tuple[ToolCallRecord, ...] = ()
    usage: Usage | None = None
    cancel_reason: str | None = None
    error: str | None = None
    finished_at: float | None = None
    #: A stateless turn's final response object (None while it runs).
    response: ResponseSnapshot | None = None

    @property
    def bucket(self) -> str:
        """The rate-limit bucket the turn counts in."""
        return "response" if self.session_id is None else "session_turn"


@attrs.frozen(kw_only=True)
class UsageRecord:
    """The ledger row of one completed turn."""

    response_id: str
    account_id: str
    session_id: str | None
    model: str
    input_tokens: int
    output_tokens: int
    credits: float
    created_at: float
    #: True when the token counts are estimates (the upstream sent none).
    estimated: bool = False

    @property
    def bucket(self) -> str:
        return "response" if self.session_id is None else "session_turn"

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@attrs.frozen(kw_only=True)
class SessionRecord:
    """A persistent session as the store keeps it across restarts."""

    id: str
    account_id: str
    ttl: float
    metadata: dict[str, object]
    model: str
    created_at: float
    last_activity: float


@attrs.frozen(kw_only=True)
class IdempotencyRecord:
    """An Idempotency-Key bound (per account) to a request and its turn."""

    account_id: str
    key: str
    #: Digest of the request's session and body (see :func:`fingerprint`).
    fingerprint: str
    response_id: str
    created_at: float


@attrs.frozen
class UsageWindow:
    """Turns and tokens of one bucket over one window, with its limits."""

    name: str
    duration_seconds: float
    turns: int
    tokens: int
    max_turns: int | None = None
    max_tokens: int | None = None
    enabled: bool = False


@attrs.frozen
class Recovered:
    """What a store hands the runtime at start-up."""

    #: Persistent sessions still within their ttl, each with its history
    #: (oldest turn first).
    sessions: tuple[tuple[SessionRecord, tuple[TurnRecord, ...]], ...]
    #: How many turns were found running and recorded as interrupted.
    interrupted: int

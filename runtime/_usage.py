"""The usage report of an account: credit state, turn/token windows, records.

Rate limits themselves (refusing turns past a window's maximum) come with
the durable store; here the windows report what the ledger shows: completed
turns and their tokens in the last hour and day, per bucket (``session_turn``
for session messages, ``response`` for stateless responses).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from ._store import Account, Store, UsageRecord

WINDOWS: Final = (("hour", 3600.0), ("day", 86400.0))
BUCKETS: Final = ("session_turn", "response")


@attrs.frozen
class UsageWindow:
    """Turns and tokens of one bucket over one window."""

    name: str
    duration_seconds: float
    turns: int
    tokens: int
    max_turns: int | None = None
    max_tokens: int | None = None
    enabled: bool = False


@attrs.frozen
class UsageReport:
    """What ``GET /v1/usage`` shows."""

    account: Account
    buckets: dict[str, tuple[UsageWindow, ...]]
    records: tuple[UsageRecord, ...]


async def usage_report(store: Store, account_id: str, *, limit: int = 100) -> UsageReport:
    """Build the report of ``account_id`` from the store's ledger."""
    account = await store.get_account(account_id)
    records = await store.usage_records(account_id, limit=10_000)
    now = time.time()
    buckets: dict[str, tuple[UsageWindow, ...]] = {}
    for bucket in BUCKETS:
        mine = [r for r in records if (r.session_id is None) == (bucket == "response")]
        windows = []
        for name, duration in WINDOWS:
            recent = [r for r in mine if now - r.created_at <= duration]
            tokens = sum(r.input_tokens + r.output_tokens for r in recent)
            windows.append(UsageWindow(name, duration, len(recent), tokens))
        buckets[bucket] = tuple(windows)
    return UsageReport(account, buckets, tuple(records[:limit]))

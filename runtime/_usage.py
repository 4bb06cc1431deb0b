"""The usage report of an account: credit state, turn/token windows, records.

Windows count, per bucket (``session_turn`` for session messages, ``response``
for stateless responses), the turns started in the last hour and day (a
cancelled turn counts) and the tokens of the turns completed in them, next to
the account's limits. The store enforces the limits when it admits a turn
(:meth:`Store.begin_turn`); this only reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ._records import UsageWindow

if TYPE_CHECKING:
    from ._records import Account, UsageRecord
    from ._store import Store

__all__ = ["UsageReport", "UsageWindow", "usage_report"]


@attrs.frozen
class UsageReport:
    """What ``GET /v1/usage`` shows."""

    account: Account
    buckets: dict[str, tuple[UsageWindow, ...]]
    records: tuple[UsageRecord, ...]


async def usage_report(store: Store, account_id: str, *, limit: int = 100) -> UsageReport:
    """Build the report of ``account_id`` from the store."""
    account = await store.get_account(account_id)
    buckets = await store.usage_windows(account_id)
    records = await store.usage_records(account_id, limit=limit)
    return UsageReport(account, buckets, tuple(records))

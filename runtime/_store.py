"""The ``Store`` interface, what stores share, and :class:`MemoryStore`.

The ledger's one promise: a completed turn's usage record, its credit debit
and its final turn record are written together, exactly once, keyed by
response id. Cancelled, failed and interrupted turns are never billed. The turn
task is the only caller of :meth:`Store.complete_turn` (from its finalizing
step) and :meth:`Store.end_turn`.

Admission (:meth:`Store.begin_turn`) checks credits and rate-limit windows and
records the turn as running, in one step, so concurrent starts cannot both
pass a limit that has room for one.

:class:`MemoryStore` is for tests and throwaway use; :class:`~runtime.SQLiteStore`
is the default of ``Runtime.open`` and ``agent-runtime serve``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import trio

from ._errors import InvalidRequest, NotFound, OutOfCredits, RateLimited, Unauthorized
from ._events import ResponseSnapshot
from ._records import (
    BUCKETS,
    INTERRUPTED,
    WINDOWS,
    Account,
    CreditMode,
    IdempotencyRecord,
    Recovered,
    SessionRecord,
    TurnRecord,
    UsageRecord,
    UsageWindow,
    WindowLimit,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._events import Usage

#: How long turn records of non-persistent sessions and stateless responses
#: are kept (for rate-limit windows and re-attaching idempotent retries).
TURN_RETENTION: Final = 86400.0
#: How long idempotency-key bindings are kept (the runtime honours 24 h).
KEY_RETENTION: Final = 86400.0
#: Expired rows are purged at most this often.
PURGE_EVERY: Final = 60.0


def hash_key(api_key: str) -> bytes:
    """The digest an API key is stored and looked up by."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()


def lookup_key(key_hashes: dict[bytes, str], api_key: str) -> str:
    """The account of ``api_key`` in ``key_hashes``; :class:`Unauthorized` if none.

    Keys are compared only through their SHA-256 digests (a dict lookup), so
    the time a comparison takes depends on the digest of the presented key,
    never on the bytes of a stored key: a timing attack learns a prefix of a
    digest, which does not help to find a key.
    """
    account_id = key_hashes.get(hash_key(api_key))
    if account_id is None:
        raise Unauthorized("missing or unknown API key; send 'Authorization: Bearer KEY'")
    return account_id


#: The account that ``Runtime.create_session`` and ``respond`` use by default.
DEFAULT_ACCOUNT: Final = "local"


@attrs.frozen
class Pricing:
    """Credits per million input and output tokens of one model."""

    input_per_million: float
    output_per_million: float

    def __attrs_post_init__(self) -> None:
        if self.input_per_million < 0 or self.output_per_million < 0:
            raise ValueError(f"prices must be >= 0: {self!r}")

    def cost(self, usage: Usage) -> float:
        return (
            usage.input_tokens * self.input_per_million
            + usage.output_tokens * self.output_per_million
        ) / 1_000_000


#: Default prices. The demo model is priced too, so billing is visible.
DEFAULT_PRICES: Final = {"demo": Pricing(1.0, 2.0)}


def finite(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number; else :class:`InvalidRequest`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, not {value!r}")
    return float(value)


def check_credits(account: Account) -> None:
    """Raise :class:`OutOfCredits` if ``account`` may not start a turn."""
    if account.mode is CreditMode.HARD and account.balance <= account.min_balance:
        raise OutOfCredits(
            f"account {account.id} has {account.balance:g} credits left (the per-turn "
            f"minimum is more than {account.min_balance:g}); add credits to start new turns"
        )


def refuse(limit: WindowLimit, what: str, used: int, maximum: int, retry_at: float) -> RateLimited:
    """The error for a full window; ``retry_at`` is wall-clock time."""
    retry_after = max(1.0, math.ceil(retry_at - time.time()))
    return RateLimited(
        f"rate limit: {used} {what} of at most {maximum} in the last {limit.window} "
        f"for {limit.bucket}; retry in {retry_after:g} s",
        retry_after=retry_after,
    )


def tokens_free_at(used: Sequence[tuple[float, int]], maximum: int) -> float:
    """When (the creation time of the record whose leaving makes room) enough
    of ``used`` — (created_at, tokens), oldest first — has left the window for
    the total to drop below ``maximum``."""
    total = sum(tokens for _, tokens in used)
    for created_at, tokens in used:
        total -= tokens
        if total < maximum:
            return created_at
    return used[-1][0] if used else time.time()


def window_report(
    account: Account, use: Iterable[tuple[str, str, int, int]]
) -> dict[str, tuple[UsageWindow, ...]]:
    """Per bucket, its windows: ``use`` yields (bucket, window, turns, tokens)."""
    by_slot = {(bucket, window): (turns, tokens) for bucket, window, turns, tokens in use}
    report: dict[str, tuple[UsageWindow, ...]] = {}
    for bucket in BUCKETS:
        windows = []
        for name, duration in WINDOWS.items():
            turns, tokens = by_slot.get((bucket, name), (0, 0))
            limit = account.limit(bucket, name)
            windows.append(
                UsageWindow(
                    name,
                    duration,
                    turns,
                    tokens,
                    max_turns=None if limit is None else limit.max_turns,
                    max_tokens=None if limit is None else limit.max_tokens,
                    enabled=limit is not None,
                )
            )
        report[bucket] = tuple(windows)
    return report


class Store(Protocol):
    """What the runtime needs of persistent state.

    Every method but :meth:`end_turn` is async so that implementations can do
    IO (in a worker thread for SQLite); none may block the event loop. Errors
    of the storage itself surface as :class:`~runtime.StoreError`.
    """

    async def authenticate(self, api_key: str) -> str:
        """Return the id of the account that owns ``api_key``.

        Raises :class:`Unauthorized` for an unknown key. Keys are kept only as
        hashes.
        """
        ...

    async def get_account(self, account_id: str) -> Account:
        """Return the account. Raises :class:`NotFound`."""
        ...

    async def begin_turn(self, record: TurnRecord) -> None:
        """Admit a new turn and record it as running, in one step.

        Raises:
          NotFound: unknown account.
          OutOfCredits: hard credit mode and the balance is at the minimum.
          RateLimited: a window of the turn's bucket is full.
        """
        ...

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        """The ledger transaction: write the usage record, debit its credits and
        store the turn's final record, all or nothing.

        Returns:
          True if written; False if a usage record with this response id
          exists (nothing is written or debited twice).
        """
        ...

    def end_turn(self, record: TurnRecord) -> None:
        """Queue the final record of a cancelled or failed turn (no charge).

        Synchronous and non-blocking: it runs right after a terminal event,
        on the path a cancel's latency is measured on. A crash before the
        write lands leaves the turn running in the store, and the next
        start-up records it as interrupted.
        """

    async def get_turn(self, response_id: str) -> TurnRecord | None:
        """The turn's record, if the store has it."""
        ...

    async def usage_records(self, account_id: str, *, limit: int = 100) -> list[UsageRecord]:
        """The account's most recent usage records, newest first."""
        ...

    async def usage_windows(self, account_id: str) -> dict[str, tuple[UsageWindow, ...]]:
        """Turns and tokens per bucket and window, with the account's limits."""
        ...

    async def save_session(self, record: SessionRecord) -> None:
        """Store a persistent session (it and its turns survive a restart)."""
        ...

    async def delete_session(self, session_id: str) -> None:
        """Forget a persistent session (its turn records stay for the windows)."""
        ...

    async def recover(self) -> Recovered:
        """At start-up: record running turns as cancelled (``interrupted``),
        drop expired sessions and old turn records, and return the persistent
        sessions with their histories."""
        ...

    async def get_idempotency_key(self, account_id: str, key: str) -> IdempotencyRecord | None:
        """The binding of ``key``, if the store still has it (the caller checks
        its age; stores drop bindings older than a day when they purge)."""
        ...

    async def put_idempotency_key(self, record: IdempotencyRecord) -> None:
        """Bind a key (the first binding of a key wins; a repeat is ignored)."""
        ...


def interrupted(record: TurnRecord, now: float) -> TurnRecord:
    """``record`` (running when the process died) as cancelled, unbilled.

    What it streamed before the crash is not kept (it was only ever in
    memory): the record says what was asked and how it ended.
    """
    response = None
    if record.session_id is None:
        response = ResponseSnapshot(
            id=record.id,
            status="cancelled",
            model=record.model,
            created_at=record.created_at,
            cancel_reason=INTERRUPTED,
        )
    return attrs.evolve(
        record,
        status="cancelled",
        cancel_reason=INTERRUPTED,
        finished_at=now,
        usage=None,
        response=response,
    )


def without_output(record: TurnRecord) -> TurnRecord:
    """``record`` with its output (text, tool calls, response items) dropped:
    the smallest record that still says how the turn ended."""
    response = record.response
    if response is not None:
        response = attrs.evolve(response, output=())
    note = "its output could not be stored"
    return attrs.evolve(
        record,
        output_text="",
        tool_calls=(),
        response=response,
        error=f"{record.error} ({note})" if record.error else None,
    )


@final
@attrs.define(eq=False)
class MemoryStore:
    """A :class:`Store` in memory: nothing survives the process, but one
    instance given to successive ``Runtime.open`` calls behaves like a store
    across restarts (persistent sessions come back, running turns become
    interrupted).

    Args:
      default_credits: balance of the :data:`DEFAULT_ACCOUNT`, created at once.
      default_mode: its credit mode.
    """

    default_credits: float = 1000.0
    default_mode: CreditMode = CreditMode.HARD
    _accounts: dict[str, Account] = attrs.field(factory=dict, init=False)
    _records: dict[str, UsageRecord] = attrs.field(factory=dict, init=False)
    _turns: dict[str, TurnRecord] = attrs.field(factory=dict, init=False)
    _sessions: dict[str, SessionRecord] = attrs.field(factory=dict, init=False)
    _keys: dict[tuple[str, str], IdempotencyRecord] = attrs.field(factory=dict, init=False)
    #: sha256(key) -> account id. The keys themselves are never stored.
    _key_hashes: dict[bytes, str] = attrs.field(factory=dict, init=False)
    _purged_at: float = attrs.field(factory=time.time, init=False)
    _turns_purged_at: float = attrs.field(factory=time.time, init=False)

    def __attrs_post_init__(self) -> None:
        self.create_account(DEFAULT_ACCOUNT, credits=self.default_credits, mode=self.default_mode)

    # -- administration (synchronous: nothing to wait for) ---------------------

    def create_account(
        self,
        account_id: str,
        *,
        credits: float = 0.0,
        mode: CreditMode = CreditMode.HARD,
        min_balance: float = 0.0,
        limits: tuple[WindowLimit, ...] = (),
    ) -> Account:
        """Create (or replace) an account."""
        if not account_id:
            raise InvalidRequest("account id must not be empty")
        account = Account(
            account_id,
            finite("credits", credits),
            mode,
            finite("min_balance", min_balance),
            tuple(limits),
        )
        self._accounts[account_id] = account
        return account

    def set_account(
        self,
        account_id: str,
        *,
        mode: CreditMode | None = None,
        min_balance: float | None = None,
        limits: tuple[WindowLimit, ...] | None = None,
    ) -> Account:
        """Change an account's credit ``mode``, ``min_balance`` or ``limits``."""
        account = self._account(account_id)
        account = attrs.evolve(
            account,
            mode=account.mode if mode is None else mode,
            min_balance=(
                account.min_balance if min_balance is None else finite("min_balance", min_balance)
            ),
            limits=account.limits if limits is None else tuple(limits),
        )
        self._accounts[account_id] = account
        return account

    def add_credits(self, account_id: str, amount: float) -> Account:
        """Add ``amount`` (may be negative) to the account's balance."""
        account = self._account(account_id)
        account = attrs.evolve(account, balance=account.balance + finite("amount", amount))
        self._accounts[account_id] = account
        return account

    def _account(self, account_id: str) -> Account:
        try:
            return self._accounts[account_id]
        except KeyError:
            raise NotFound(f"unknown account {account_id!r}") from None

    def add_api_key(self, account_id: str, api_key: str) -> None:
        """Let ``api_key`` authenticate as ``account_id`` (stored as a hash)."""
        self._account(account_id)
        if not api_key:
            raise InvalidRequest("an API key must not be empty")
        self._key_hashes[hash_key(api_key)] = account_id

    def ensure_account_for_key(self, api_key: str, *, credits: float = 1000.0) -> str:
        """The account of ``api_key``, created (with ``credits``) if the key is new."""
        digest = hash_key(api_key)
        account_id = self._key_hashes.get(digest)
        if account_id is None:
            account_id = new_account_id()
            self.create_account(account_id, credits=credits)
            self._key_hashes[digest] = account_id
        return account_id

    # -- the Store interface ---------------------------------------------

    async def authenticate(self, api_key: str) -> str:
        await trio.lowlevel.checkpoint()
        return lookup_key(self._key_hashes, api_key)

    async def get_account(self, account_id: str) -> Account:
        await trio.lowlevel.checkpoint()
        return self._account(account_id)

    async def begin_turn(self, record: TurnRecord) -> None:
        await trio.lowlevel.checkpoint()
        account = self._account(record.account_id)
        check_credits(account)
        now = time.time()
        for name, duration in WINDOWS.items():
            limit = account.limit(record.bucket, name)
            if limit is None:
                continue
            since = now - duration
            starts = sorted(
                t.created_at
                for t in self._turns.values()
                if t.account_id == account.id and t.bucket == record.bucket and t.created_at > since
            )
            if limit.max_turns is not None and len(starts) >= limit.max_turns:
                # One more fits once the oldest len-max+1 starts have left the window.
                retry_at = starts[len(starts) - limit.max_turns] + duration
                raise refuse(limit, "turns", len(starts), limit.max_turns, retry_at)
            used = sorted(
                (u.created_at, u.tokens)
                for u in self._records.values()
                if u.account_id == account.id and u.bucket == record.bucket and u.created_at > since
            )
            tokens = sum(n for _, n in used)
            if limit.max_tokens is not None and used and tokens >= limit.max_tokens:
                raise refuse(
                    limit,
                    "tokens",
                    tokens,
                    limit.max_tokens,
                    tokens_free_at(used, limit.max_tokens) + duration,
                )
        self._turns[record.id] = record
        if now - self._turns_purged_at > PURGE_EVERY:
            self._turns_purged_at = now
            for rid, turn in list(self._turns.items()):
                if turn.created_at < now - TURN_RETENTION and turn.session_id not in self._sessions:
                    del self._turns[rid]

    async def complete_turn(self, usage: UsageRecord, record: TurnRecord) -> bool:
        await trio.lowlevel.checkpoint()
        if usage.response_id in self._records:
            return False
        self.add_credits(usage.account_id, -usage.credits)
        self._records[usage.response_id] = usage
        self._finish(record)
        return True

    def end_turn(self, record: TurnRecord) -> None:
        self._finish(record)

    def _finish(self, record: TurnRecord) -> None:
        self._turns[record.id] = record
        session = self._sessions.get(record.session_id or "")
        if session is not None and record.finished_at is not None:
            self._sessions[session.id] = attrs.evolve(session, last_activity=record.finished_at)

    async def get_turn(self, response_id: str) -> TurnRecord | None:
        await trio.lowlevel.checkpoint()
        return self._turns.get(response_id)

    async def usage_records(self, account_id: str, *, limit: int = 100) -> list[UsageRecord]:
        await trio.lowlevel.checkpoint()
        mine = [r for r in self._records.values() if r.account_id == account_id]
        return sorted(mine, key=lambda r: r.created_at, reverse=True)[:limit]

    async def usage_windows(self, account_id: str) -> dict[str, tuple[UsageWindow, ...]]:
        await trio.lowlevel.checkpoint()
        account = self._account(account_id)
        now = time.time()

        def use() -> Iterable[tuple[str, str, int, int]]:
            for bucket in BUCKETS:
                for name, duration in WINDOWS.items():
                    since = now - duration
                    turns = sum(
                        1
                        for t in self._turns.values()
                        if t.account_id == account_id
                        and t.bucket == bucket
                        and t.created_at > since
                    )
                    tokens = sum(
                        u.tokens
                        for u in self._records.values()
                        if u.account_id == account_id
                        and u.bucket == bucket
                        and u.created_at > since
                    )
                    yield bucket, name, turns, tokens

        return window_report(account, use())

    async def save_session(self, record: SessionRecord) -> None:
        await trio.lowlevel.checkpoint()
        self._sessions[record.id] = record

    async def delete_session(self, session_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self._sessions.pop(session_id, None)

    async def recover(self) -> Recovered:
        await trio.lowlevel.checkpoint()
        now = time.time()
        running = [t for t in self._turns.values() if t.status == "in_progress"]
        for turn in running:
            self._turns[turn.id] = interrupted(turn, now)
        for sid, session in list(self._sessions.items()):
            if session.created_at + session.ttl <= now:
                del self._sessions[sid]
        for rid, turn in list(self._turns.items()):
            if turn.created_at < now - TURN_RETENTION and turn.session_id not in self._sessions:
                del self._turns[rid]
        histories: dict[str, list[TurnRecord]] = {sid: [] for sid in self._sessions}
        for turn in sorted(self._turns.values(), key=lambda t: t.created_at):
            if turn.session_id in histories:
                histories[turn.session_id].append(turn)
        return Recovered(
            tuple((s, tuple(histories[s.id])) for s in self._sessions.values()), len(running)
        )

    async def get_idempotency_key(self, account_id: str, key: str) -> IdempotencyRecord | None:
        await trio.lowlevel.checkpoint()
        return self._keys.get((account_id, key))

    async def put_idempotency_key(self, record: IdempotencyRecord) -> None:
        await trio.lowlevel.checkpoint()
        now = time.time()
        slot = (record.account_id, record.key)
        existing = self._keys.get(slot)
        if existing is None or existing.created_at < now - KEY_RETENTION:
            self._keys[slot] = record
        if now - self._purged_at > PURGE_EVERY:
            self._purged_at = now
            for slot in [s for s, r in self._keys.items() if r.created_at < now - KEY_RETENTION]:
                del self._keys[slot]


def new_account_id() -> str:
    """A new account's id: random, so that it tells nothing about its key."""
    return "acct_" + secrets.token_hex(12)

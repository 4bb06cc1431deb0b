"""Accounts and the usage ledger: the ``Store`` interface and its in-memory form.

The ledger's one promise: a completed turn's usage record and its credit debit
happen together, exactly once, keyed by response id. Cancelled and failed
turns write nothing. The turn task is the only caller of
:meth:`Store.record_usage`, from its finalizing step.

:class:`MemoryStore` is for tests and throwaway use; a SQLite store behind the
same interface is the server's default (a later piece of work).
"""

from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import trio

from ._errors import InvalidRequest, NotFound, OutOfCredits, Unauthorized

if TYPE_CHECKING:
    from ._events import Usage


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


class CreditMode(enum.Enum):
    """How an account's balance limits new turns."""

    #: Debits are recorded and the balance may go negative; nothing is refused.
    SOFT = "soft"
    #: A new turn is refused with :class:`OutOfCredits` once the balance is
    #: at or below the account's ``min_balance``.
    HARD = "hard"


@attrs.frozen
class Account:
    """An account's credit state."""

    id: str
    balance: float
    mode: CreditMode = CreditMode.HARD
    #: Hard mode refuses a new turn unless ``balance > min_balance``.
    min_balance: float = 0.0


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


class Store(Protocol):
    """What the runtime needs of persistent state.

    Every method is async so that implementations can do IO (in worker threads
    for SQLite); none may block the event loop.
    """

    async def get_account(self, account_id: str) -> Account:
        """Return the account. Raises :class:`NotFound`."""
        ...

    async def check_can_start(self, account_id: str) -> None:
        """Raise :class:`OutOfCredits` if the account may not start a turn."""
        ...

    async def record_usage(self, record: UsageRecord) -> bool:
        """Write the usage record and debit its credits in one step.

        Returns:
          True if written; False if a record with this response id exists
          (nothing is written or debited twice).
        """
        ...

    async def usage_records(self, account_id: str, *, limit: int = 100) -> list[UsageRecord]:
        """The account's most recent usage records, newest first."""
        ...

    async def authenticate(self, api_key: str) -> str:
        """Return the id of the account that owns ``api_key``.

        Raises :class:`Unauthorized` for an unknown key. Keys are kept only as
        hashes.
        """
        ...


@final
@attrs.define(eq=False)
class MemoryStore:
    """A :class:`Store` in memory: nothing survives the process.

    Args:
      default_credits: balance of the :data:`DEFAULT_ACCOUNT`, created at once.
      default_mode: its credit mode.
    """

    default_credits: float = 1000.0
    default_mode: CreditMode = CreditMode.HARD
    _accounts: dict[str, Account] = attrs.field(factory=dict, init=False)
    _records: dict[str, UsageRecord] = attrs.field(factory=dict, init=False)
    #: sha256(key) -> account id. The keys themselves are never stored.
    _key_hashes: dict[bytes, str] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.create_account(DEFAULT_ACCOUNT, credits=self.default_credits, mode=self.default_mode)

    def create_account(
        self,
        account_id: str,
        *,
        credits: float = 0.0,
        mode: CreditMode = CreditMode.HARD,
        min_balance: float = 0.0,
    ) -> Account:
        """Create (or replace) an account."""
        if not account_id:
            raise InvalidRequest("account id must not be empty")
        account = Account(account_id, float(credits), mode, min_balance)
        self._accounts[account_id] = account
        return account

    def add_credits(self, account_id: str, amount: float) -> Account:
        """Add ``amount`` (may be negative) to the account's balance."""
        account = self._account(account_id)
        account = attrs.evolve(account, balance=account.balance + amount)
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
            account_id = "acct_" + digest.hex()[:24]
            if account_id not in self._accounts:
                self.create_account(account_id, credits=credits)
            self._key_hashes[digest] = account_id
        return account_id

    @property
    def has_api_keys(self) -> bool:
        return bool(self._key_hashes)

    async def authenticate(self, api_key: str) -> str:
        await trio.lowlevel.checkpoint()
        return lookup_key(self._key_hashes, api_key)

    async def get_account(self, account_id: str) -> Account:
        await trio.lowlevel.checkpoint()
        return self._account(account_id)

    async def check_can_start(self, account_id: str) -> None:
        await trio.lowlevel.checkpoint()
        account = self._account(account_id)
        if account.mode is CreditMode.HARD and account.balance <= account.min_balance:
            raise OutOfCredits(
                f"account {account_id} has {account.balance:g} credits left; "
                f"add credits to start new turns"
            )

    async def record_usage(self, record: UsageRecord) -> bool:
        await trio.lowlevel.checkpoint()
        if record.response_id in self._records:
            return False
        self.add_credits(record.account_id, -record.credits)
        self._records[record.response_id] = record
        return True

    async def usage_records(self, account_id: str, *, limit: int = 100) -> list[UsageRecord]:
        await trio.lowlevel.checkpoint()
        mine = [r for r in self._records.values() if r.account_id == account_id]
        return sorted(mine, key=lambda r: r.created_at, reverse=True)[:limit]

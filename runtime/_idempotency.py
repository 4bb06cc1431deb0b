"""Idempotency keys: one turn per (account, key), whatever the retries.

Theory of operation
-------------------
A key is bound, per account, to the fingerprint of the request that first
used it (the session and the body) and, once that request's turn started, to
the turn's response id, for :data:`KEY_TTL` seconds. :meth:`IdempotencyKeys.run`
claims the key synchronously before its first checkpoint, so of several
concurrent requests with one key exactly one starts a turn; the others wait
for its outcome and attach to the same turn. A request whose start failed
(busy session, no credits, bad input) releases the key: nothing was started,
so a retry may start it. A cancelled turn keeps its key.

Bindings are written through to the store once the turn has started, so a
retry after a restart still finds its turn (and gets its final state, the
turn being gone from memory). The in-memory map serializes concurrent
requests and answers hot retries without a store round trip; a miss asks the
store while holding the claim.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from ._errors import IdempotencyConflict, InvalidRequest
from ._records import IdempotencyRecord

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._store import Store
    from ._turn import Turn

logger = logging.getLogger("runtime")

#: How long a key stays bound to its response id.
KEY_TTL: Final = 24 * 3600.0
MAX_KEY_LENGTH: Final = 255
#: Expired bindings are dropped at most this often (amortized in ``run``).
PURGE_EVERY: Final = 60.0


def fingerprint(*parts: str | bytes) -> str:
    """A digest of the parts of a request that a retry must repeat exactly."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@attrs.define(eq=False)
class _Binding:
    fingerprint: str
    created_at: float
    response_id: str | None = None
    #: Set once the first request has either started its turn or failed.
    settled: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen
class Replayed:
    """A key whose turn is no longer buffered: only its response id is left."""

    response_id: str


@final
@attrs.define(eq=False)
class IdempotencyKeys:
    """The bindings of every account's idempotency keys (in memory, written
    through to ``store``)."""

    store: Store
    ttl: float = KEY_TTL
    _bindings: dict[tuple[str, str], _Binding] = attrs.field(factory=dict, init=False)
    _purged_at: float = attrs.field(factory=time.time, init=False)

    async def run(
        self,
        account_id: str,
        key: str,
        request_fingerprint: str,
        start: Callable[[], Awaitable[Turn]],
        lookup: Callable[[str], Turn | None],
    ) -> Turn | Replayed:
        """Start a turn with ``start`` unless ``key`` already names one.

        Returns:
          The new turn; or, for a repeat of the same request, the turn the key
          is bound to (``lookup(response_id)``), or :class:`Replayed` if that
          turn is no longer buffered.

        Raises:
          IdempotencyConflict: the key was used with another session or body.
          InvalidRequest: the key is empty or too long.
          Whatever ``start`` raises (the key is then released).
        """
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters")
        now = time.time()
        if now - self._purged_at > PURGE_EVERY:
            self.purge()
        slot = (account_id, key)
        binding = self._bindings.get(slot)
        if binding is not None and now - binding.created_at > self.ttl:
            del self._bindings[slot]
            binding = None
        if binding is None:
            binding = _Binding(request_fingerprint, now)
            self._bindings[slot] = binding
            try:
                stored = await self.store.get_idempotency_key(account_id, key)
                if stored is not None and now - stored.created_at <= self.ttl:
                    binding.fingerprint = stored.fingerprint
                    binding.created_at = stored.created_at
                    binding.response_id = stored.response_id
                    binding.settled.set()
                    return self._attach(binding, key, request_fingerprint, lookup)
                turn = await start()
            except BaseException:
                if binding.response_id is None:
                    del self._bindings[slot]
                binding.settled.set()
                raise
            binding.response_id = turn.id
            binding.settled.set()
            record = IdempotencyRecord(
                account_id=account_id,
                key=key,
                fingerprint=request_fingerprint,
                response_id=turn.id,
                created_at=now,
            )
            try:
                # Shielded: the turn runs (and will be billed) whether or not
                # this request's client is still there, so its key must be
                # stored even if the request is cancelled now; the write is short.
                with trio.CancelScope(shield=True):
                    await self.store.put_idempotency_key(record)
            except Exception:
                # The turn runs and this process remembers the key; only a
                # retry after a restart would miss it. Failing the request
                # now would hide a running turn from its client.
                logger.exception("idempotency key of %s was not stored", turn.id)
            return turn
        # Wait even on a differing body: the binding's fingerprint is final
        # only once settled (after a restart it comes from the store).
        await binding.settled.wait()
        if binding.response_id is None:
            # The first request failed and released the key: this one may try.
            return await self.run(account_id, key, request_fingerprint, start, lookup)
        return self._attach(binding, key, request_fingerprint, lookup)

    @staticmethod
    def _attach(
        binding: _Binding,
        key: str,
        request_fingerprint: str,
        lookup: Callable[[str], Turn | None],
    ) -> Turn | Replayed:
        if binding.fingerprint != request_fingerprint:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was used with another session or body; "
                f"use a new key for a new request"
            )
        assert binding.response_id is not None
        bound = lookup(binding.response_id)
        return bound if bound is not None else Replayed(binding.response_id)

    def purge(self) -> None:
        """Forget bindings older than the ttl."""
        now = time.time()
        self._purged_at = now
        for slot in [s for s, b in self._bindings.items() if now - b.created_at > self.ttl]:
            del self._bindings[slot]

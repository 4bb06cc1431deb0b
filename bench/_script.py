"""What the benchmark scripts in ``benchmarks/`` share."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")


async def cancelled_on_sigterm(
    run: Callable[[], Awaitable[T]], log: Callable[[str], None]
) -> T | None:
    """``await run()``, or None if SIGTERM arrived first: then ``run`` is
    cancelled, so whatever it started (servers, client processes) is stopped
    by its own cleanup."""
    result = None
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    log("SIGTERM: stopping")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            result = await run()
            nursery.cancel_scope.cancel()
    return result

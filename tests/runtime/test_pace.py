"""runtime._pace: paced sleeps that share one trio timer per millisecond."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from runtime import _pace as pace

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


@pytest.fixture
def timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every trio timer the pacer arms (its calls of ``trio.sleep_until``)."""
    armed: list[float] = []
    real = trio.sleep_until

    async def counting(deadline: float) -> None:
        armed.append(deadline)
        await real(deadline)

    monkeypatch.setattr(trio, "sleep_until", counting)  # as _pace sees it
    return armed


async def test_sleepers_wake_on_time_within_the_resolution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 sleepers with deadlines spread over 50 ms each wake no earlier than
    their deadline and at most RESOLUTION after it."""
    base = trio.current_time()
    woke: dict[int, tuple[float, float]] = {}

    async def sleeper(k: int) -> None:
        deadline = base + 0.01 + k * 0.00025
        await pace.sleep_until(deadline)
        woke[k] = (deadline, trio.current_time())

    async with trio.open_nursery() as nursery:
        for k in range(200):
            nursery.start_soon(sleeper, k)
    assert len(woke) == 200
    for deadline, at in woke.values():
        assert deadline - 1e-9 <= at <= deadline + pace.RESOLUTION + 1e-9


async def test_one_timer_per_slot(
    autojump_clock: trio.testing.MockClock, timers: list[float]
) -> None:
    """100 sleepers due within one slot arm one trio timer, not 100; sleepers
    in 3 distinct slots arm 3."""
    base = math.ceil(trio.current_time() / pace.RESOLUTION) * pace.RESOLUTION + 1.0
    async with trio.open_nursery() as nursery:
        for k in range(100):
            nursery.start_soon(pace.sleep_until, base + 0.0001 + k * 0.000001)
    assert len(timers) == 1
    timers.clear()
    async with trio.open_nursery() as nursery:
        for slot in range(3):
            for _ in range(10):
                nursery.start_soon(pace.sleep_until, base + 1.0005 + slot * 0.01)
    assert len(timers) == 3


async def test_cancel_of_the_timer_holder_hands_over(
    autojump_clock: trio.testing.MockClock, timers: list[float]
) -> None:
    """The first sleeper of a slot holds its timer; cancelling it halfway
    ends it alone (Cancelled): the others wake early, one of them arms a new
    timer, and all of them wake at their deadline, not before."""
    deadline = trio.current_time() + 1.0
    woke: list[float] = []
    first = trio.CancelScope()

    async def holder() -> None:
        with first:
            await pace.sleep_until(deadline)
        woke.append(-1.0)  # must not count as a wake

    async def other() -> None:
        await pace.sleep_until(deadline)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        assert len(timers) == 1
        for _ in range(5):
            nursery.start_soon(other)
        await trio.testing.wait_all_tasks_blocked()
        assert len(timers) == 1  # the others only park on the slot
        await trio.sleep(0.5)
        first.cancel()
    assert first.cancelled_caught
    assert len(timers) == 2
    assert woke.count(-1.0) == 1
    others = [at for at in woke if at >= 0]
    assert len(others) == 5
    assert all(deadline - 1e-9 <= at <= deadline + pace.RESOLUTION for at in others)


async def test_cancelled_follower_leaves_the_slot_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling a sleeper that only parks on the slot ends that sleeper
    alone; the others wake on time."""
    deadline = trio.current_time() + 1.0
    woke: list[float] = []

    async def sleeper(scope: trio.CancelScope) -> None:
        with scope:
            await pace.sleep_until(deadline)
            woke.append(trio.current_time())

    scopes = [trio.CancelScope() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for scope in scopes:
            nursery.start_soon(sleeper, scope)
        await trio.testing.wait_all_tasks_blocked()
        scopes[2].cancel()
    assert scopes[2].cancelled_caught
    assert len(woke) == 2
    assert all(deadline - 1e-9 <= at <= deadline + pace.RESOLUTION for at in woke)


@pytest.mark.parametrize(
    "call",
    [lambda: pace.sleep_until(trio.current_time() - 5.0), lambda: pace.sleep(0)],
    ids=["past", "zero"],
)
async def test_a_due_sleep_is_a_checkpoint(
    autojump_clock: trio.testing.MockClock, call: Callable[[], Awaitable[None]]
) -> None:
    """A deadline already past returns at once, but is still a checkpoint."""
    start = trio.current_time()
    await call()
    assert trio.current_time() - start <= pace.RESOLUTION
    with trio.CancelScope() as scope:
        scope.cancel()
        await call()
    assert scope.cancelled_caught


async def test_infinite_and_invalid_deadlines(autojump_clock: trio.testing.MockClock) -> None:
    with trio.move_on_after(100) as scope:
        await pace.sleep_until(math.inf)
    assert scope.cancelled_caught
    with pytest.raises(ValueError, match="NaN"):
        await pace.sleep_until(math.nan)
    with pytest.raises(ValueError, match=">= 0"):
        await pace.sleep(-1)

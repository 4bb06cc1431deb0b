"""Small helpers shared by the runtime tests."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import psutil
import trio

if TYPE_CHECKING:
    from runtime import Event, Turn, TurnState


async def collect(turn: Turn, after: int | None = None) -> list[Event]:
    """Every event of ``turn`` after ``after``, up to and including its terminal."""
    return [event async for event in turn.events(after)]


def state_of(turn: Turn) -> TurnState:
    """``turn.state``, read through a call so type checkers do not carry an
    earlier narrowing across an await."""
    return turn.state


def types(events: list[Event]) -> list[str]:
    return [event.type for event in events]


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def group_gone(pgid: int) -> bool:
    """True if no live process is left in process group ``pgid``."""
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and not process_gone(proc.pid):
                return False
    return True


async def wait_for_children(pids: list[int]) -> list[int]:
    """Once a shell's pid is in ``pids``, wait until it has forked; return the
    pids of its descendants. Real processes send no event: this polls (use it
    under ``trio.fail_after`` with the real clock)."""
    while True:
        await trio.sleep(0.01)
        if pids:
            children = [p.pid for p in psutil.Process(pids[0]).children(recursive=True)]
            if children:
                return children

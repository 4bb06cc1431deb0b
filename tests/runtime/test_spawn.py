"""Sessions and turns start in the context of ``Runtime.open``'s caller, not in
that of whoever called ``create_session`` / ``send`` / ``respond`` (an HTTP
request must not be kept alive by the tasks it started)."""

from __future__ import annotations

import contextvars
import gc
import weakref
from typing import TYPE_CHECKING, Final

import attrs
import pytest
import trio

from runtime import ModelChunk, ModelRequest, Runtime, TextChunk, UsageChunk
from runtime._spawn import start_in

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator
    from pathlib import Path

    from runtime import MemoryStore

VAR: Final[contextvars.ContextVar[object]] = contextvars.ContextVar("VAR", default=None)


@attrs.define
class SeeingModel:
    """A model that records what VAR holds in the task that streams it."""

    name: str = "fake"
    seen: list[object] = attrs.field(factory=list)

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        self.seen.append(VAR.get())
        await trio.lowlevel.checkpoint()
        yield TextChunk("ok")
        yield UsageChunk(1, 1)


class Request:
    """Stands for what a web framework keeps in a context variable."""


async def test_spawn_tasks_do_not_inherit_the_callers_context(
    tmp_path: Path, store: MemoryStore
) -> None:
    """A value set by the caller of send/respond is not seen by the turn, one set
    before Runtime.open is, and the caller's object is not kept alive by them."""
    model = SeeingModel()
    VAR.set("open")
    async with Runtime.open(data_dir=tmp_path, model=model, store=store) as rt:
        refs: list[weakref.ref[Request]] = []

        async def handle() -> None:
            request = Request()
            refs.append(weakref.ref(request))
            VAR.set(request)
            session = await rt.create_session()
            await (await session.send("hi")).wait_finished()
            await (await rt.respond("hi")).wait_finished()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle)
        gc.collect()
        [ref] = refs
        assert ref() is None
        assert model.seen == ["open", "open"]


async def test_start_in_reports_errors_before_started(tmp_path: Path) -> None:
    """An error before task_status.started() is raised to the caller, not the nursery;
    a task that returns without starting is an error too."""

    async def fails(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("no space")

    async def returns(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError, match="no space"):
            await start_in(contextvars.copy_context(), nursery, fails)
        with pytest.raises(RuntimeError, match="without starting"):
            await start_in(contextvars.copy_context(), nursery, returns)

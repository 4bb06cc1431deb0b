"""Starting a task whose context is not its spawner's.

trio copies the spawner's ``contextvars`` into every new task. A session or
turn started while serving an HTTP request would then keep that request alive
(Quart's request context, hypercorn's stream, the ASGI channels) for as long
as the task lives: measured, half of an idle session's memory. So sessions and
turns start in a copy of the context the runtime was opened in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

import attrs
import trio

if TYPE_CHECKING:
    import contextvars
    from collections.abc import Awaitable, Callable


@final
@attrs.define(eq=False)
class _Status:
    """The ``task_status`` of :func:`start_in`: records whether the task started."""

    done: trio.Event = attrs.field(factory=trio.Event)
    started_ok: bool = False
    error: BaseException | None = None

    def started(self, value: object = None) -> None:
        if self.done.is_set():
            raise RuntimeError("called 'started' twice on the same task status")
        self.started_ok = True
        self.done.set()


async def start_in(
    context: contextvars.Context,
    nursery: trio.Nursery,
    async_fn: Callable[..., Awaitable[Any]],
    *,
    name: str | None = None,
) -> None:
    """Like ``await nursery.start(async_fn)``, but the task runs in a copy of
    ``context`` rather than of the caller's.

    As with ``nursery.start``, an exception raised before the task calls
    ``task_status.started()`` is raised here (and not in the nursery); one
    raised after goes to the nursery.

    Cancellation: the wait for ``started()`` is shielded, so use this only for
    tasks that start at once (no waiting before ``started()``).
    """
    status = _Status()

    async def run() -> None:
        try:
            await async_fn(task_status=status)
        except BaseException as exc:
            if status.started_ok:
                raise
            status.error = exc
            status.done.set()
            if not isinstance(exc, Exception):
                raise  # Cancelled and the like belong to this task's unwinding
        else:
            if not status.started_ok:
                status.error = RuntimeError(f"{async_fn!r} returned without starting")
                status.done.set()

    label: object = name or async_fn
    context.copy().run(lambda: nursery.start_soon(run, name=label))
    with trio.CancelScope(shield=True):
        await status.done.wait()
    if status.error is not None:
        if isinstance(status.error, Exception):
            raise status.error
        raise RuntimeError(f"{async_fn!r} was cancelled before it started") from status.error

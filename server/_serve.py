"""``agent-runtime serve``: the runtime and the HTTP server, nested.

The runtime's nursery encloses the server's (hypercorn ``trio.serve``), so the
runtime outlives every request. SIGTERM or SIGINT first drains the runtime
(new requests get 503, every running turn ends ``*.cancelled`` with reason
``shutdown`` and unbilled, tool processes are killed, so open streams end with
their terminal event), then stops hypercorn, then closes the runtime.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ._app import FILE_LIMIT, create_app

if TYPE_CHECKING:
    from collections.abc import Callable

    from runtime import Runtime

#: Listen backlog: the default of 100 resets connections under bursts
#: (STACK-NOTES 5).
BACKLOG: Final = 4096
#: How long hypercorn waits for in-flight requests after the drain.
GRACEFUL_TIMEOUT: Final = 3.0


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.backlog = BACKLOG
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.accesslog = None
    # The logger itself, not "-": hypercorn would give it a handler of its
    # own; this way its lines go through the process's handlers (serve's
    # redacting stderr handler) once.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(
    rt: Runtime,
    *,
    host: str,
    port: int,
    on_ready: Callable[[list[str]], object] | None = None,
    file_limit: int = FILE_LIMIT,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``rt`` over HTTP until SIGTERM/SIGINT, then drain and return.

    Args:
      on_ready: called with the bound URLs once the server listens.
      file_limit: the largest file upload, in bytes.

    Cancellation: cancelling this stops the server at once (no drain).
    """
    app = create_app(rt, file_limit=file_limit)
    stop = trio.Event()
    stopped = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    if stop.is_set():  # a second signal: stop now
                        _force_exit("second signal")
                    print(
                        f"agent-runtime: {signal.Signals(signum).name}: draining", file=sys.stderr
                    )
                    await rt.shutdown()
                    stop.set()

            async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                config = hypercorn_config(host, port)
                await hypercorn_serve(
                    app,
                    config,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
                stopped.set()

            nursery.start_soon(on_signal)
            binds = await nursery.start(run_server)
            task_status.started(binds)
            if on_ready is not None:
                on_ready(binds)
            await stop.wait()
            # Let hypercorn finish in-flight requests (its graceful timeout)…
            with trio.move_on_after(GRACEFUL_TIMEOUT + 1):
                await stopped.wait()
            if not stopped.is_set():
                # …but a client that stopped reading blocks hypercorn's shielded
                # socket write forever (STACK-NOTES 4), and no cancel reaches it.
                # The drain is done (turns cancelled, processes killed, unbilled):
                # exit rather than hang.
                _force_exit("a client stopped reading; exiting without it")
            nursery.cancel_scope.cancel(reason="server stopped")


def _force_exit(why: str) -> None:
    print(f"agent-runtime: {why}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)

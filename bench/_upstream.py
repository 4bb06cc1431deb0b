"""The ``upstream`` scenario: a fake OpenAI-compatible upstream behind the runtime.

The fake (:mod:`bench.fake_upstream`) streams one text chunk every
``1 / tokens_per_second`` seconds, forever, and records for each request when
every chunk was written and when the client went away. A turn is found among
its requests by the ``[bench TAG]`` the client put in the turn's input (it is
the last user message the runtime sends upstream).

Two harnesses put the runtime in front of it:

* :func:`open_upstream_runtime`: in-process (the ``--embedded`` target), a
  :class:`~runtime.Runtime` on the default SQLite store with an
  :class:`~runtime.OpenAIModel` pointed at the fake;
* :func:`serve_with_fake_upstream`: an ``agent-runtime serve`` subprocess
  (``--model openai:fake``) pointed at the fake, for the HTTP target.

Clocks: the fake stamps with ``trio.current_time()``, samples carry
``time.perf_counter()`` times. trio's default clock is ``perf_counter()`` plus
a constant, so ``clock_offset = trio.current_time() - time.perf_counter()``,
taken in the process running the fake, converts one to the other; and
``perf_counter`` is CLOCK_MONOTONIC on Linux, shared by every process of the
machine, so times measured in a client process compare directly.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import psutil
import trio

from runtime import OpenAIModel, Runtime

from .fake_upstream import FakeUpstream, Stream, open_fake_upstream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Sequence

    from ._samples import TurnSample

#: The upstream model name the runtime is configured with.
UPSTREAM_MODEL: Final = "fake"
#: ``[bench TAG]`` in a turn's input; TAG has no spaces and no ``]``.
TAG_RE: Final = re.compile(r"\[bench ([^\]\s]+)\]")
#: How long ``agent-runtime serve`` may take to print "serving on URL".
STARTUP_TIMEOUT: Final = 30.0
#: How long the server may drain after SIGTERM before it is SIGKILLed.
TERM_GRACE: Final = 5.0
#: How long :func:`wait_upstream_closed` waits, in all.
CLOSE_TIMEOUT: Final = 5.0
#: Lines of the server's output kept for error messages.
OUTPUT_LINES: Final = 200
_READY_RE: Final = re.compile(r"serving on (http://\S+)")


def current_clock_offset() -> float:
    """``trio.current_time() - time.perf_counter()`` here and now (see the module doc)."""
    return trio.current_time() - time.perf_counter()


def endless_stream(tokens_per_second: float | None) -> Stream:
    """The fake's answer: a text chunk at ``tokens_per_second`` forever
    (``None`` or 0: as fast as the socket takes them)."""
    return Stream.endless(
        text_chunk="tok ", delay=1.0 / tokens_per_second if tokens_per_second else 0.0
    )


# -- requests <-> turns ---------------------------------------------------------


def bench_tag(text: str) -> str | None:
    """The TAG of the last ``[bench TAG]`` in ``text``, if any."""
    found = TAG_RE.findall(text)
    return str(found[-1]) if found else None


def request_tag(request: dict[str, Any]) -> str | None:
    """The ``[bench TAG]`` of a recorded request's last user message, if any."""
    body = request.get("json")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                content = " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
            return bench_tag(content) if isinstance(content, str) else None
    return None


def requests_by_tag(up: FakeUpstream) -> dict[str, list[int]]:
    """Tag -> indices (into ``up.requests``) of the requests that carry it, in order.

    A turn normally makes one request; more if the runtime retried before any
    output (the last one is the one that streamed).
    """
    index: dict[str, list[int]] = {}
    for i, request in enumerate(up.requests):
        tag = request_tag(request)
        if tag is not None:
            index.setdefault(tag, []).append(i)
    return index


def find_request(up: FakeUpstream, tag: str) -> int | None:
    """The index of the last request carrying ``tag`` (searched from the newest)."""
    for i in range(len(up.requests) - 1, -1, -1):
        if request_tag(up.requests[i]) == tag:
            return i
    return None


async def wait_upstream_closed(up: FakeUpstream, samples: Iterable[TurnSample]) -> None:
    """Wait (at most :data:`CLOSE_TIMEOUT` seconds in all) until the fake has
    seen the connection of every cancelled sample's request close.

    Call before :func:`upstream_metrics` when the level may end before the
    fake's watcher has run: the runtime closes the connection before it
    appends the terminal event, but the fake notices on its next turn of the
    event loop. What is still open at the deadline becomes an ``error`` there.
    """
    index = requests_by_tag(up)
    with trio.move_on_after(CLOSE_TIMEOUT):
        for sample in samples:
            if sample.tag is not None and sample.t_cancel is not None and sample.tag in index:
                await up.wait_disconnected(index[sample.tag][-1])
    await trio.lowlevel.checkpoint()


def upstream_metrics(
    up: FakeUpstream, samples: Sequence[TurnSample], clock_offset: float
) -> list[TurnSample]:
    """``samples`` with ``upstream_closed_ms`` and ``upstream_tokens_after_ack`` filled.

    ``upstream_closed_ms``: the fake saw the connection close, minus
    ``t_cancel``. ``upstream_tokens_after_ack``: chunks the fake wrote after
    ``t_ack``. ``clock_offset`` is :func:`current_clock_offset` of the process
    running the fake. Samples without a tag or a cancel are returned as they
    are; a cancelled turn whose request is missing, or whose connection the
    fake never saw close, gets an ``error`` (unless it has one already).
    """
    index = requests_by_tag(up)
    out: list[TurnSample] = []
    for sample in samples:
        if sample.tag is None or sample.t_cancel is None:
            out.append(sample)
            continue
        found = index.get(sample.tag)
        if not found:
            missing = f"no upstream request carried [bench {sample.tag}]"
            out.append(attrs.evolve(sample, error=sample.error or missing))
            continue
        i = found[-1]
        closed_at = up.disconnected_at.get(i)
        times = up.chunk_times.get(i, [])
        after_ack: int | None = None
        if sample.t_ack is not None:
            after_ack = len(times) - bisect.bisect_right(times, sample.t_ack + clock_offset)
        closed_ms: float | None = None
        error = sample.error
        if closed_at is not None:
            closed_ms = (closed_at - clock_offset - sample.t_cancel) * 1e3
        elif error is None:
            error = f"the upstream never saw the connection of request {i} close"
        out.append(
            attrs.evolve(
                sample,
                upstream_closed_ms=closed_ms,
                upstream_tokens_after_ack=after_ack,
                error=error,
            )
        )
    return out


# -- harnesses --------------------------------------------------------------------


@asynccontextmanager
async def open_upstream_runtime(
    tokens_per_second: float | None, *, data_dir: str | os.PathLike[str]
) -> AsyncIterator[tuple[Runtime, FakeUpstream]]:
    """A runtime (default SQLite store in ``data_dir``) whose model is an
    :class:`~runtime.OpenAIModel` on an in-process fake upstream streaming
    endlessly at ``tokens_per_second``. Yields ``(rt, up)``."""
    async with open_fake_upstream([endless_stream(tokens_per_second)]) as up:
        model = OpenAIModel(base_url=up.base_url, model=UPSTREAM_MODEL, api_key="sk-bench-fake")
        async with model, Runtime.open(data_dir=data_dir, model=model) as rt:
            yield rt, up


@asynccontextmanager
async def serve_with_fake_upstream(
    tokens_per_second: float | None, *, data_dir: str | os.PathLike[str]
) -> AsyncIterator[tuple[str, str, FakeUpstream]]:
    """An in-process fake upstream and an ``agent-runtime serve`` subprocess
    using it (``--model openai:fake``, the SQLite store in ``data_dir``, a
    fresh API key). Yields ``(base_url, api_key, up)`` once the server has
    printed "serving on URL".

    On exit the server gets SIGTERM (it drains: running turns end cancelled),
    then SIGKILL after :data:`TERM_GRACE` seconds; any process it left behind
    (a tool's process group) is killed too, and the server is reaped.

    Raises:
      RuntimeError: the server exited or stayed silent for
        :data:`STARTUP_TIMEOUT` seconds before it was ready (with its output).
    """
    api_key = f"pk_bench_{secrets.token_hex(12)}"
    failed: RuntimeError | None = None
    try:
        async with open_fake_upstream([endless_stream(tokens_per_second)]) as up:
            command = [
                sys.executable,
                "-c",
                "from server._cli import main; raise SystemExit(main())",
                "serve",
                "--port",
                "0",
                "--data-dir",
                os.fspath(data_dir),
                "--api-key",
                api_key,
                "--model",
                f"openai:{UPSTREAM_MODEL}",
                "--openai-base-url",
                up.base_url,
            ]
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_server_env(),
            )
            assert process.stdout is not None
            output: deque[str] = deque(maxlen=OUTPUT_LINES)
            try:
                try:
                    url = await _wait_ready(process.stdout, output)
                except RuntimeError as exc:
                    failed = exc
                    raise
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, process.stdout, output)
                    try:
                        yield url, api_key, up
                    finally:
                        with trio.CancelScope(shield=True):
                            await _stop_server(process)
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await _stop_server(process)
                    await process.stdout.aclose()
    except BaseExceptionGroup:
        if failed is not None:  # the fake's nursery wrapped our own start-up error
            raise failed from None
        raise


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)  # never send a real key to the fake
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").exists():  # a source checkout: make it importable
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


async def _wait_ready(stdout: trio.abc.ReceiveStream, output: deque[str]) -> str:
    """Read the server's output until it prints "serving on URL"; return the URL.

    Raises:
      RuntimeError: it exited, or said nothing of the kind for
        :data:`STARTUP_TIMEOUT` seconds (the message has its output).
    """
    pending = b""
    with trio.move_on_after(STARTUP_TIMEOUT):
        while chunk := await stdout.receive_some():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                output.append(line)
                if match := _READY_RE.search(line):
                    return match.group(1)
        output.append(pending.decode(errors="replace"))
        raise RuntimeError("agent-runtime serve exited before it was ready:\n" + "\n".join(output))
    raise RuntimeError(
        f"agent-runtime serve was not ready after {STARTUP_TIMEOUT:g} s:\n" + "\n".join(output)
    )


async def _drain(stdout: trio.abc.ReceiveStream, output: deque[str]) -> None:
    """Keep reading the server's output (a full pipe would block it), its
    last lines in ``output``."""
    pending = b""
    while chunk := await stdout.receive_some():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        output.extend(raw.decode(errors="replace") for raw in lines)


async def _stop_server(process: trio.Process) -> None:
    """SIGTERM, SIGKILL after :data:`TERM_GRACE`; reap; kill what it left (shield this)."""
    if process.returncode is not None:
        await trio.lowlevel.checkpoint()
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(TERM_GRACE):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    for child in descendants:
        with contextlib.suppress(psutil.Error, OSError):
            if child.is_running():  # also checks the pid was not reused
                if os.getpgid(child.pid) == child.pid:  # a tool's group leader
                    os.killpg(child.pid, signal.SIGKILL)
                child.kill()

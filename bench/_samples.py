"""What a cancel benchmark measures: options, per-turn samples, results.

Every target (``--embedded``, ``--url``) and scenario produces the same
:class:`TurnSample` per turn; times are milliseconds (floats) measured with
``time.perf_counter`` in the process that observed them, ``None`` where a
metric does not apply (no headers in-process, no process group outside the
``tool`` scenario) or could not be observed (a remote server's processes).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import urllib.parse
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import attrs
import cattrs

#: Scenarios of ``bench cancel``.
SCENARIOS: Final = ("stream", "tool", "upstream", "delete")
#: Latency metrics of a sample, in the order tables show them.
METRICS: Final = (
    "headers_ms",
    "first_event_ms",
    "ack_ms",
    "stop_ms",
    "group_gone_ms",
    "upstream_closed_ms",
)
#: The JSON document's ``schema`` value; bump when its shape changes.
SCHEMA: Final = "agent-runtime.bench.cancel/1"


@attrs.frozen
class CancelAt:
    """When the client cancels a turn: after ``events`` events (counted from
    the first), or at a uniform random time in ``[low, high]`` seconds after
    the first event."""

    events: int | None = None
    low: float = 0.0
    high: float = 0.0

    def __str__(self) -> str:
        if self.events is not None:
            return f"{self.events}e"
        return f"{self.low:g}" if self.low == self.high else f"{self.low:g}-{self.high:g}"


_CANCEL_AT_RE: Final = re.compile(
    r"^(?:(?P<events>\d+)e|(?P<low>\d+(?:\.\d*)?)(?:-(?P<high>\d+(?:\.\d*)?))?)$"
)


def parse_cancel_at(text: str) -> CancelAt:
    """``20e`` (after 20 events), ``0.1`` (seconds) or ``0.05-0.2`` (uniform range)."""
    match = _CANCEL_AT_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"--cancel-at must look like 20e (after 20 events), 0.1 or 0.05-0.2 (seconds), "
            f"not {text!r}"
        )
    if match["events"] is not None:
        events = int(match["events"])
        if events < 1:
            raise ValueError("--cancel-at: cancel after at least 1 event")
        return CancelAt(events=events)
    low = float(match["low"])
    high = float(match["high"]) if match["high"] is not None else low
    if high < low:
        raise ValueError(f"--cancel-at: the range {text!r} is empty")
    return CancelAt(low=low, high=high)


def parse_levels(text: str) -> tuple[int, ...]:
    """``1,20,100`` -> (1, 20, 100): concurrency levels, each >= 1."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--concurrency must look like 1,20,100, not {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency levels must be >= 1: {text!r}")
    return levels


@attrs.frozen(kw_only=True)
class CancelOptions:
    """The options of one ``bench cancel`` run (echoed in its JSON)."""

    target: str  # "embedded" | "http"
    scenario: str = "stream"
    concurrency: tuple[int, ...] = (1, 20, 100)
    #: Turns per concurrency level.
    turns: int = 50
    #: Demo model pace (words per second); for ``upstream``, the fake's pace.
    tokens_per_second: float = 50.0
    cancel_at: CancelAt = attrs.field(factory=lambda: CancelAt(events=20))
    stateless: bool = False
    seed: int = 0
    url: str | None = None
    #: Not echoed into JSON (see :func:`to_json`).
    api_key: str | None = attrs.field(default=None, repr=False)
    #: Client processes for the HTTP load generator (0: one per 50 streams, >= 1).
    processes: int = 0


@attrs.frozen(kw_only=True)
class TurnSample:
    """One cancelled turn, as the client saw it."""

    scenario: str
    concurrency: int
    #: The turn's response id (None if the turn never started).
    response_id: str | None = None
    #: Request sent -> response headers (HTTP only).
    headers_ms: float | None = None
    #: Request sent -> first event read.
    first_event_ms: float | None = None
    #: Cancel sent -> its answer (202, or ``turn.cancel()`` returning).
    ack_ms: float | None = None
    #: Cancel sent -> terminal event read.
    stop_ms: float | None = None
    #: Cancel sent -> the tool's whole process group gone (``tool``, local only).
    group_gone_ms: float | None = None
    #: Cancel sent -> the upstream saw its connection closed (``upstream``).
    upstream_closed_ms: float | None = None
    #: Tokens the upstream produced after the cancel was acknowledged (``upstream``).
    upstream_tokens_after_ack: int | None = None
    #: Deltas read after the cancel was acknowledged.
    deltas_after_ack: int = 0
    #: The terminal event's type (None if none was read).
    terminal: str | None = None
    #: Whether the ledger billed this turn (must be False for a cancelled one).
    billed: bool | None = None
    #: ``delete``: the workspace was gone when DELETE returned.
    workspace_gone: bool | None = None
    #: What went wrong, if anything (the sample then counts as an error).
    error: str | None = None
    #: The unique tag the client put in the turn's input (``[bench TAG]``), so
    #: observers elsewhere (the fake upstream) can find the turn.
    tag: str | None = None
    #: ``time.perf_counter()`` when the cancel was sent and acknowledged:
    #: CLOCK_MONOTONIC, comparable across processes of this machine.
    t_cancel: float | None = None
    t_ack: float | None = None

    @property
    def ok(self) -> bool:
        """Cancelled as promised: no error, a ``*.cancelled`` terminal, not billed."""
        return (
            self.error is None
            and self.terminal is not None
            and self.terminal.endswith(".cancelled")
            and not self.billed
            and self.workspace_gone is not False
        )


@attrs.frozen(kw_only=True)
class LevelResult:
    """Every sample of one concurrency level, and what the client cost."""

    concurrency: int
    samples: tuple[TurnSample, ...]
    wall_seconds: float
    #: Client CPU time / wall time, per client process, in percent of one core.
    client_cpu_percent: tuple[float, ...] = ()
    #: Human-readable warnings (e.g. the client was the bottleneck).
    warnings: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class CancelResult:
    """A whole ``bench cancel`` run: what :func:`to_json` writes."""

    options: CancelOptions
    levels: tuple[LevelResult, ...]
    machine: dict[str, Any]
    started_at: float


converter: Final = cattrs.Converter()
converter.register_unstructure_hook(CancelAt, lambda c: str(c))
converter.register_structure_hook(CancelAt, lambda v, _: parse_cancel_at(v))


def machine_info() -> dict[str, Any]:
    """Cores, Python, package versions and git commit: where a result came from."""
    versions: dict[str, str | None] = {}
    for name in ("agent-runtime", "trio", "hypercorn", "quart-trio", "httpx", "h11"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "versions": versions,
        "git_commit": commit,
    }


def redact_url(url: str | None) -> str | None:
    """``url`` without a password (``http://user:***@host``)."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))

"""Percentiles and summaries of latency samples, in pure Python.

:func:`percentile` is numpy's default (``method="linear"``, Hyndman & Fan
type 7): the value at the virtual index ``(n - 1) * q / 100`` of the sorted
values, interpolated linearly between the two closest ranks. ``q=0`` is the
minimum, ``q=100`` the maximum, ``q=50`` the median. The interpolation is
computed the way numpy computes it (from the nearer end), so results match
``numpy.percentile`` to the last bit on ordinary inputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


def _check_q(q: float) -> float:
    if not 0.0 <= q <= 100.0:  # also refuses nan
        raise ValueError(f"percentile: q must be in [0, 100], not {q!r}")
    return q / 100.0


def _sorted_finite(values: Iterable[float]) -> list[float]:
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not all(math.isfinite(v) for v in ordered):
        raise ValueError("percentile: values must be finite (no nan or inf)")
    return ordered


def _percentile_sorted(ordered: Sequence[float], fraction: float) -> float:
    """``ordered`` sorted, non-empty; ``fraction`` in [0, 1]."""
    last = len(ordered) - 1
    index = last * fraction
    if index >= last:
        return ordered[last]
    low = math.floor(index)
    weight = index - low
    a, b = ordered[low], ordered[low + 1]
    if weight >= 0.5:  # numpy's _lerp: from the nearer end, exact at both ends
        return b - (b - a) * (1.0 - weight)
    return a + (b - a) * weight


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``, in any order.

    Linear interpolation between the closest ranks, as ``numpy.percentile``'s
    default. Raises :class:`ValueError` on no values, a non-finite value, or
    ``q`` outside [0, 100].
    """
    fraction = _check_q(q)
    return _percentile_sorted(_sorted_finite(values), fraction)


@attrs.frozen
class Summary:
    """Count, percentiles, maximum and mean of a set of values (their unit)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float


def summarize(values: Iterable[float]) -> Summary | None:
    """The :class:`Summary` of ``values``, or ``None`` when there are none.

    Raises :class:`ValueError` on a non-finite value.
    """
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return None
    ordered = _sorted_finite(ordered)
    return Summary(
        count=len(ordered),
        p50=_percentile_sorted(ordered, 0.50),
        p90=_percentile_sorted(ordered, 0.90),
        p99=_percentile_sorted(ordered, 0.99),
        max=ordered[-1],
        mean=math.fsum(ordered) / len(ordered),
    )


def p50_p99_max(values: Sequence[float]) -> dict[str, float | None]:
    """``{"p50", "p99", "max"}`` of ``values`` rounded to 3 decimals (None
    each when there are none): the shape the load and floor documents use."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
    }

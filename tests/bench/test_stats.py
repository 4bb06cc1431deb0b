"""Percentile maths of ``bench cancel`` on known inputs (numpy's default 'linear')."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bench._stats import Summary, percentile, summarize

ONE_TO_100 = [float(i) for i in range(1, 101)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        # virtual index (n - 1) * q / 100 = 0.99 * q into 1..100
        (0, 1.0),
        (1, 1.99),
        (25, 25.75),
        (50, 50.5),
        (90, 90.1),
        (99, 99.01),
        (99.9, 99.901),
        (100, 100.0),
    ],
)
def test_one_to_100(q: float, expected: float) -> None:
    assert percentile(ONE_TO_100, q) == pytest.approx(expected, rel=1e-12)


def test_singleton_is_every_percentile() -> None:
    for q in (0, 1, 50, 99, 100):
        assert percentile([7.5], q) == 7.5


def test_two_values_interpolate_linearly() -> None:
    # index q/100 between 10 and 20
    assert percentile([10.0, 20.0], 0) == 10.0
    assert percentile([10.0, 20.0], 25) == 12.5
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert percentile([10.0, 20.0], 100) == 20.0


def test_unsorted_input_and_duplicates() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 3.0]  # sorted: 1 2 3 3 4 5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 50) == 3.0  # index 2.5 between 3 and 3
    assert percentile(values, 90) == pytest.approx(4.5)  # index 4.5 between 4 and 5
    assert percentile(values, 10) == pytest.approx(1.5)  # index 0.5 between 1 and 2
    assert values == [5.0, 1.0, 4.0, 2.0, 3.0, 3.0]  # not sorted in place


def test_hand_computed_latencies() -> None:
    # n = 11, index for p90 = 9.0 (exact rank), p99 = 9.9 (between ranks 9 and 10)
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 11.0]
    assert percentile(values, 90) == pytest.approx(1.0)
    assert percentile(values, 99) == pytest.approx(1.0 + 0.9 * 10.0)
    assert percentile(values, 50) == pytest.approx(0.6)


def test_integers_are_accepted() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5


@pytest.mark.parametrize("q", [-0.1, 100.1, math.nan])
def test_q_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0, 2.0], q)


def test_empty_and_non_finite_are_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="finite"):
        percentile([1.0, math.nan], 50)
    with pytest.raises(ValueError, match="finite"):
        percentile([1.0, math.inf], 50)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=40,
    ),
    q=st.floats(min_value=0, max_value=100),
)
def test_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(
        float(np.percentile(values, q)), rel=1e-12, abs=1e-9
    )


def test_summarize_known_inputs() -> None:
    s = summarize(range(1, 101))
    assert s is not None
    assert (s.count, s.p50, s.max, s.mean) == (100, 50.5, 100.0, 50.5)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert summarize([3.0]) == Summary(count=1, p50=3.0, p90=3.0, p99=3.0, max=3.0, mean=3.0)


def test_summarize_nothing_is_none() -> None:
    assert summarize([]) is None
    assert summarize(iter(())) is None


def test_summarize_refuses_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, math.nan])

"""Percentiles from counts by whole seconds (jobs.learning.percentiles) are percentile_cont's:
linear interpolation between the two nearest ranks, checked against the runs laid out one by one."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from jobs.learning import QUANTILES, percentiles
from tests.fleet_history import percentile


@pytest.mark.parametrize("seed", range(20))
def test_percentiles_from_counts_are_those_of_the_runs_themselves(seed: int) -> None:
    draw = random.Random(seed)
    runs = [draw.choice((1, 5, 60, 61, 3600)) + draw.randrange(0, 30) for _ in range(draw.randrange(1, 400))]
    counts = sorted(Counter(runs).items())
    total, values, longest = percentiles(counts)
    assert total == len(runs) and longest == max(runs)
    assert values == pytest.approx(tuple(percentile(runs, q) for q in QUANTILES))


def test_no_runs_and_one_run() -> None:
    assert percentiles([]) == (0, (), None)
    assert percentiles([(42, 1)]) == (1, (42, 42, 42), 42)

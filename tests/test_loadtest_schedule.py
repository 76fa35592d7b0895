"""The open-loop schedule: --rate is the mean and --duration the length, whatever the profile.

The rush profile used to treat --rate as its base and run at twice it, so a
rush run lasted half the --duration it was given.
"""

from __future__ import annotations

import itertools

import pytest

from onecard.clients.loadtest import RUSH_SWING, _profile_times

RATE, SECONDS = 1_000.0, 6.0
N = int(RATE * SECONDS)


@pytest.mark.parametrize("profile", ["steady", "rush"])
def test_a_run_lasts_its_duration_at_its_mean_rate(profile: str) -> None:
    times = _profile_times(N, RATE, profile)
    assert len(times) == N
    assert times[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(times))
    # the last request is due one gap before the end: at the lowest rate, 2 / RATE for rush
    assert SECONDS - 2.5 / RATE < times[-1] < SECONDS
    assert (N - 1) / times[-1] == pytest.approx(RATE, rel=0.01)


def test_the_rush_peak_is_a_multiple_of_the_mean_in_the_middle() -> None:
    times = _profile_times(N, RATE, "rush")

    def rate_around(t: float) -> float:
        window = [x for x in times if t - 0.05 <= x < t + 0.05]
        return len(window) / 0.1

    assert rate_around(SECONDS / 2) == pytest.approx(RATE * (1 + RUSH_SWING), rel=0.03)
    assert rate_around(0.05) == pytest.approx(RATE * (1 - RUSH_SWING), rel=0.03)
    assert rate_around(SECONDS - 0.05) == pytest.approx(RATE * (1 - RUSH_SWING), rel=0.03)
    first_half = sum(1 for x in times if x < SECONDS / 2)
    assert first_half == pytest.approx(N / 2, abs=1)


def test_closed_loop_has_no_schedule() -> None:
    assert _profile_times(3, 0, "rush") == [0.0, 0.0, 0.0]

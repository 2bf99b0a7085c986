"""Pure tests of the retry schedule: exponential backoff with jitter, and what a failure does."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from controlplane.domain.leases import MAX_LEASE_EXPIRIES, retry_delay, state_after_failure
from controlplane.domain.runs import FileState

SECOND = timedelta(seconds=1)


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self._value = value

    def random(self) -> float:
        return self._value


@pytest.mark.parametrize(
    ("attempt", "expected_base"),
    [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 32), (7, 60), (20, 60)],
)
def test_base_doubles_per_attempt_and_is_capped(attempt: int, expected_base: int) -> None:
    low = retry_delay(attempt, SECOND, 60 * SECOND, FixedRandom(0.0))
    high = retry_delay(attempt, SECOND, 60 * SECOND, FixedRandom(0.999999))
    assert low == expected_base * SECOND / 2
    assert expected_base * SECOND * 0.99 < high < expected_base * SECOND


def test_jitter_stays_in_the_upper_half_of_the_base() -> None:
    rng = random.Random(1234)
    delays = [retry_delay(3, 10 * SECOND, timedelta(hours=1), rng) for _ in range(2000)]
    assert all(20 * SECOND <= d < 40 * SECOND for d in delays)
    # It is actually jittered (spreads retries), not a constant.
    assert len(set(delays)) > 1000
    assert min(delays) < 21 * SECOND
    assert max(delays) > 39 * SECOND


def test_without_an_rng_uses_module_random_within_bounds() -> None:
    for _ in range(200):
        delay = retry_delay(2, SECOND, timedelta(hours=1))
        assert SECOND <= delay < 2 * SECOND


def test_attempt_zero_or_negative_is_treated_as_the_first() -> None:
    assert retry_delay(0, SECOND, 60 * SECOND, FixedRandom(0.0)) == SECOND / 2
    assert retry_delay(-3, SECOND, 60 * SECOND, FixedRandom(0.0)) == SECOND / 2


def test_maximum_smaller_than_initial_caps_the_first_delay() -> None:
    delay = retry_delay(1, 30 * SECOND, 10 * SECOND, FixedRandom(0.0))
    assert delay == 5 * SECOND


@pytest.mark.parametrize("attempt", [40, 43, 60, 99, 100])
def test_high_attempts_are_capped_not_overflowing(attempt: int) -> None:
    """max_attempts may be up to 100: the delay for attempt 99 must be the cap, not an error."""
    delay = retry_delay(attempt, 30 * SECOND, timedelta(hours=1), FixedRandom(0.0))
    assert delay == timedelta(minutes=30)
    delay = retry_delay(attempt, timedelta(days=1), timedelta(days=7), FixedRandom(0.5))
    assert delay == timedelta(days=7) * 0.75


def test_delays_never_decrease_with_attempts() -> None:
    previous = timedelta(0)
    for attempt in range(1, 30):
        delay = retry_delay(attempt, SECOND, timedelta(hours=1), FixedRandom(0.0))
        assert delay >= previous
        previous = delay


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "retryable", "expected"),
    [
        (1, 5, True, FileState.FAILED),
        (4, 5, True, FileState.FAILED),
        (5, 5, True, FileState.QUARANTINED),
        (6, 5, True, FileState.QUARANTINED),
        (1, 1, True, FileState.QUARANTINED),
        (1, 5, False, FileState.QUARANTINED),
        (4, 5, False, FileState.QUARANTINED),
        (1, 100, True, FileState.FAILED),
        (99, 100, True, FileState.FAILED),
        (100, 100, True, FileState.QUARANTINED),
    ],
)
def test_state_after_failure(attempt: int, max_attempts: int, retryable: bool, expected: FileState) -> None:
    assert state_after_failure(attempt, max_attempts, retryable) is expected


def test_lease_expiry_limit_is_three() -> None:
    assert MAX_LEASE_EXPIRIES == 3

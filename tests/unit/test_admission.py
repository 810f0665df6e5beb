"""The edge's admission limit (`api.admission`): it shrinks while admitted requests are slow, grows back while they
are fast and the limit is what holds them back, and stays within [floor, max_in_flight]."""

from __future__ import annotations

import pytest

from darkroom import clock
from darkroom.api.admission import WINDOW_SECONDS, InFlight


@pytest.fixture
def now(monkeypatch) -> list[float]:
    t = [1000.0]
    monkeypatch.setattr(clock, "monotonic", lambda: t[0])
    return t


def run_windows(limiter: InFlight, now: list[float], windows: int, seconds: float, concurrent: int) -> int:
    """`concurrent` requests at a time, each taking `seconds`, for `windows` windows; returns how many were refused."""
    refused = 0
    for _ in range(windows):
        slots = []
        for _ in range(concurrent):
            if limiter.full():
                refused += 1
            else:
                slots.append(limiter.enter())
        now[0] += max(seconds, WINDOW_SECONDS)
        for slot in slots:
            slot.started = now[0] - seconds
            slot.leave()
    return refused


def test_slow_requests_shrink_the_limit_to_the_floor_and_the_rest_are_refused(now):
    limiter = InFlight(ceiling=64, target_seconds=0.1, floor=16)
    assert limiter.admitted == 64
    refused = run_windows(limiter, now, 40, seconds=0.5, concurrent=200)
    assert limiter.admitted == 16 and refused > 0
    assert limiter.count == 0


def test_fast_requests_that_meet_the_limit_grow_it_back_to_the_ceiling(now):
    limiter = InFlight(ceiling=40, target_seconds=0.1, floor=16)
    run_windows(limiter, now, 40, seconds=0.5, concurrent=100)
    assert limiter.admitted == 16
    run_windows(limiter, now, 30, seconds=0.01, concurrent=100)
    assert limiter.admitted == 40


def test_fast_requests_under_the_limit_leave_it_where_it_is(now):
    limiter = InFlight(ceiling=64, target_seconds=0.1, floor=16)
    run_windows(limiter, now, 40, seconds=0.5, concurrent=200)
    run_windows(limiter, now, 10, seconds=0.01, concurrent=4)  # no demand beyond the limit: no reason to grow
    assert limiter.admitted == 16


def test_a_slot_left_twice_counts_once_and_a_small_ceiling_is_its_own_floor(now):
    limiter = InFlight(ceiling=3)
    assert limiter.floor == 3
    slot = limiter.enter()
    slot.leave()
    slot.leave()
    assert limiter.count == 0

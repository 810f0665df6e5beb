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


def run_windows(
    limiter: InFlight, now: list[float], windows: int, seconds: float, concurrent: int, slow_share: float = 1.0
) -> int:
    """`concurrent` requests at a time for `windows` windows, `slow_share` of them taking `seconds` and the rest 1 ms;
    returns how many were refused. A window is judged when the first request after its end leaves: here a 1 ms
    probe, so each window is judged on its own requests."""
    refused = 0
    for _ in range(windows):
        start = now[0]
        slots = []
        for _ in range(concurrent):
            if limiter.full():
                refused += 1
            else:
                slots.append(limiter.enter())
        now[0] = start + WINDOW_SECONDS / 2
        slow = round(len(slots) * slow_share)
        for i, slot in enumerate(slots):
            slot.started = now[0] - (seconds if i < slow else 0.001)
            slot.leave()
        now[0] = start + WINDOW_SECONDS
        probe = limiter.enter()
        probe.started = now[0] - 0.001
        probe.leave()
    return refused


def test_it_starts_at_the_floor_and_fast_requests_that_meet_it_grow_it_quickly_to_the_ceiling(now):
    """A burst against a new process is not admitted whole; demand that the process handles fast opens it up, by a
    quarter a window while well under the target (from 16 to 400 in under 16 windows, 4 s), not one at a time."""
    limiter = InFlight(ceiling=400, target_seconds=0.1, floor=16)
    assert limiter.admitted == 16
    refused = run_windows(limiter, now, 1, seconds=0.01, concurrent=500)
    assert refused == 500 - 16 and limiter.admitted == 20
    run_windows(limiter, now, 15, seconds=0.01, concurrent=500)
    assert limiter.admitted == 400


def test_by_default_it_starts_at_16_and_slow_requests_take_it_down_to_4(now):
    """Sixteen clients meet a new process without a refusal; a process that cannot serve them within the target
    goes on with fewer (on a slow two-core machine, 4 kept the p99 of 200 clients under 100 ms where 16 did not)."""
    limiter = InFlight(ceiling=64, target_seconds=0.1)
    assert limiter.admitted == 16
    run_windows(limiter, now, 10, seconds=0.4, concurrent=100)
    assert limiter.admitted == 4


def test_requests_near_the_target_grow_a_reached_limit_by_one(now):
    limiter = InFlight(ceiling=64, target_seconds=0.1, floor=16)
    run_windows(limiter, now, 4, seconds=0.07, concurrent=100)
    assert limiter.admitted == 20


def test_slow_requests_shrink_the_limit_in_proportion_down_to_the_floor(now):
    limiter = InFlight(ceiling=400, target_seconds=0.1, floor=4)
    run_windows(limiter, now, 30, seconds=0.01, concurrent=500)
    assert limiter.admitted == 400
    run_windows(limiter, now, 1, seconds=0.4, concurrent=500)  # 4x the target: by half, the most one window takes
    assert limiter.admitted == 200
    run_windows(limiter, now, 1, seconds=0.125, concurrent=500)  # 1.25x: to 0.8
    assert limiter.admitted == 160
    run_windows(limiter, now, 1, seconds=0.105, concurrent=500)  # a little over: by a tenth, the least
    assert limiter.admitted == 144
    refused = run_windows(limiter, now, 20, seconds=0.5, concurrent=500)
    assert limiter.admitted == 4 and refused > 0
    assert limiter.count == 0


def test_the_tail_counts_not_the_median(now):
    """A fifth of the admitted requests slow is enough to shrink the limit, though the median request is fast."""
    limiter = InFlight(ceiling=64, target_seconds=0.1, floor=4)
    run_windows(limiter, now, 8, seconds=0.01, concurrent=100)
    reached = limiter.admitted
    run_windows(limiter, now, 1, seconds=0.3, concurrent=100, slow_share=0.2)
    assert limiter.admitted == reached // 2


def test_fast_requests_under_the_limit_leave_it_where_it_is(now):
    limiter = InFlight(ceiling=64, target_seconds=0.1, floor=16)
    run_windows(limiter, now, 10, seconds=0.01, concurrent=4)  # no demand beyond the limit: no reason to grow
    assert limiter.admitted == 16


def test_a_slot_left_twice_counts_once_and_a_small_ceiling_is_its_own_floor(now):
    limiter = InFlight(ceiling=3)
    assert limiter.floor == 3 and limiter.admitted == 3
    slot = limiter.enter()
    slot.leave()
    slot.leave()
    assert limiter.count == 0


def test_a_queue_full_refusal_is_repeated_for_its_tenant_and_route_until_it_expires(now):
    from darkroom.api.admission import QueueFullMemo

    memo = QueueFullMemo(seconds=1.0)
    assert memo.refusal("a", "/v1/jobs") is None
    memo.note("a", "/v1/jobs", "tenant 'a' has 2 queued jobs", retry_after=5)
    found = memo.refusal("a", "/v1/jobs")
    assert found is not None and found.retry_after == 5 and "tenant 'a'" in found.message
    assert memo.refusal("b", "/v1/jobs") is None  # another tenant's share is not full
    assert memo.refusal("a", "/sdapi/v1/txt2img") is None  # a route that was not refused asks the store
    now[0] += 0.99
    assert memo.refusal("a", "/v1/jobs") is not None
    now[0] += 0.02
    assert memo.refusal("a", "/v1/jobs") is None  # a second at most: then the store is asked again
    memo.note(None, "/v1/jobs", "the queue holds 10 jobs", retry_after=1)
    assert memo.refusal("b", "/v1/jobs") is not None  # the whole queue: every tenant
    now[0] += 0.5
    memo.note(None, "/v1/jobs", "the queue holds 10 jobs", retry_after=0)
    assert memo.refusal("b", "/v1/jobs") is None  # never past the refusal's own Retry-After

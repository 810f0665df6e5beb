"""Waiting for a job from a request handler, woken by the process's change feed (`darkroom.jobs.notify`).

A waiting client costs no statements while its job runs: the handler subscribes to the job's events, reads the job
once (after subscribing, so a job that finished in between is seen), and then sleeps until the feed delivers an event.
Each read is `JobStore.outcome`: the job, and the images of a succeeded one, in one transaction, so the handler can
answer with the pictures without reading again.
It wakes every `TICK_SECONDS` anyway, to notice a client that hung up and to let SSE send its keep-alive.

A synchronous wait also re-reads its job every `RECHECK_SECONDS`: the feed gives up an event id that stays missing
for seconds (a rolled-back insert on PostgreSQL), and should a slow commit be given up that way, the waiter finds out
within half a minute instead of at its timeout. It is one statement per half minute of waiting, whatever the steps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from darkroom.jobs.notify import TERMINAL_EVENTS, ChangeFeed
from darkroom.jobs.store import JobRecord, JobStatus, JobStore
from darkroom.schemas import JobEvent
from darkroom.service import Services

TICK_SECONDS = 1.5
RECHECK_SECONDS = 30.0
_PAGE = 500  # `JobStore.events_since`'s page


async def feed_for(svc: Services) -> ChangeFeed:
    """The process's feed, started off the event loop (its start reads the newest event id)."""
    if svc.feed is None:
        svc.feed = ChangeFeed(svc.store.url, svc.store.engine, check_seconds=svc.settings.feed_check_seconds)
    if not svc.feed.running:
        await run_in_threadpool(svc.feed.start)
    return svc.feed


async def wait_for_job(
    svc: Services,
    job: JobRecord,
    seconds: float,
    request: Request | None = None,
    read: Callable[[str], JobStatus] | None = None,
) -> JobStatus:
    """The job once it is terminal (with its images when it succeeded), or as it stands after `seconds` or when the
    client hangs up (without position or ETA: read them if you show them). `read` replaces `JobStore.outcome` for
    each read, in the same request thread: a caller that wants more with the outcome (the picture itself) gets it
    without another hop to a thread."""
    read = read or svc.store.outcome
    if job.state.terminal:
        return await run_in_threadpool(read, job.id)
    if request is not None and (slot := getattr(request.state, "in_flight", None)) is not None:
        slot.leave()  # waiting on the feed costs nothing: it must not hold an admission slot (api.admission)
    deadline = time.monotonic() + seconds
    feed = await feed_for(svc)
    with feed.subscribe(job.id, types=TERMINAL_EVENTS) as inbox:
        status = await run_in_threadpool(read, job.id)
        read_at = time.monotonic()
        while not status.job.state.terminal:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            events = await inbox.next(min(TICK_SECONDS, remaining))
            if request is not None and await request.is_disconnected():
                break
            if events or time.monotonic() - read_at >= RECHECK_SECONDS:
                status = await run_in_threadpool(read, job.id)
                read_at = time.monotonic()
    return status


async def job_events(svc: Services, job_id: str, after: int) -> AsyncGenerator[JobEvent | None, None]:
    """A job's events after `after` until its terminal event: first those already stored, then as the feed delivers
    them. None every `TICK_SECONDS` without one (disconnect checks, keep-alives). Use with `contextlib.aclosing`."""
    store: JobStore = svc.store
    feed = await feed_for(svc)
    with feed.subscribe(job_id) as inbox:
        while True:
            stored = await run_in_threadpool(store.events_since, job_id, after)
            for event in stored:
                after = event.id
                yield event
                if event.type in TERMINAL_EVENTS:
                    return
            if len(stored) < _PAGE:
                break
        while True:
            fresh = sorted((e for e in await inbox.next(TICK_SECONDS) if e.id > after), key=lambda e: e.id)
            if not fresh:
                yield None
            for event in fresh:
                after = event.id
                yield event
                if event.type in TERMINAL_EVENTS:
                    return

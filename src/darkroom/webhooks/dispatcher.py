"""The webhook dispatcher: a background thread in each API process that turns job events into signed deliveries.

Each pass (every `poll_seconds` while there is work; when a pass finds nothing, the wait doubles up to
`IDLE_MAX_SECONDS`, and `wake()` ends it at once):
1. *scan*: read `job_events` after a shared cursor; for every event whose job has a `webhook_url` and wants that event
   type, insert a delivery row (once per job and event, whichever process gets there first);
2. *deliver*: claim due deliveries with a lease, check each URL against the SSRF guard, POST the signed payload, and
   record the attempt: delivered on 2xx; otherwise retried with exponential backoff and jitter (or the receiver's
   Retry-After, if longer) until `max_attempts`, then failed. A refused URL is never called and never retried.

One bad row never stops the dispatcher: a delivery row the database refuses is isolated as `failed` with its reason
(see `DeliveryStore.enqueue`), an event whose job cannot be turned into a payload is logged and passed over, and an
attempt whose result cannot be recorded leaves its row to the lease's expiry while the others go on.

The dispatcher runs only where webhooks are configured (`webhooks.secret`): without a secret nothing could be signed,
and submit refuses `webhook_url`.

The cursor only moves past events older than a few seconds: ids are assigned before commit, so on PostgreSQL an
event can become visible after a higher id; re-reading the recent tail costs little since deliveries are unique.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from darkroom import __version__, clock
from darkroom.config import Settings
from darkroom.jobs.store import JobStore
from darkroom.kv import SettingsKV
from darkroom.observability import metrics
from darkroom.schemas import JobEvent
from darkroom.webhooks import guard, signing
from darkroom.webhooks.deliveries import (
    DELIVERED,
    FAILED,
    PENDING,
    REFUSED,
    Delivery,
    DeliveryStore,
    Outcome,
    wanted_events,
)

log = logging.getLogger("darkroom.webhooks")

CURSOR_KEY = "webhooks.cursor"
SETTLE_SECONDS = 5.0
BATCH = 16
IDLE_MAX_SECONDS = 5.0


class WebhookDispatcher:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        *,
        resolve: guard.Resolver = guard.system_resolver,
        dispatcher_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.config = settings.webhooks
        self.jobs = store
        self.deliveries = DeliveryStore(store.engine)
        self.kv = SettingsKV(store.engine)
        self.allow = guard.AllowList.parse(self.config.allow_hosts)
        self.resolve = resolve
        self.id = dispatcher_id or clock.new_id("whd-dispatcher")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=self.config.timeout_seconds, follow_redirects=False, trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> WebhookDispatcher:
        self._thread = threading.Thread(target=self._loop, name="webhook-dispatcher", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Run a pass now (a job just ended, say) instead of at the end of the idle wait."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _loop(self) -> None:
        delay = self.config.poll_seconds
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            busy = False
            try:
                busy = self.run_once(count_scanned=True) > 0
            except Exception:  # the database went away for a moment: try again next pass
                log.exception("webhook dispatcher pass failed")
            delay = self.next_delay(delay, busy)

    def next_delay(self, delay: float, busy: bool) -> float:
        """`poll_seconds` while there is work; doubling up to `IDLE_MAX_SECONDS` while there is none."""
        if busy:
            return self.config.poll_seconds
        return min(max(delay * 2, self.config.poll_seconds), max(IDLE_MAX_SECONDS, self.config.poll_seconds))

    def run_once(self, *, count_scanned: bool = False) -> int:
        """One scan and one delivery round; returns how many attempts were made (plus, with `count_scanned`, how
        many new events the scan read: the loop's measure of whether it is busy)."""
        scanned = self.scan()
        attempts = self.deliver_due()
        return attempts + (scanned if count_scanned else 0)

    # --- scan -----------------------------------------------------------------------------------------------------

    def scan(self) -> int:
        """Queue the deliveries new events owe; returns how many rows were added."""
        cursor = int(self.kv.get(CURSOR_KEY, 0))
        events = self.deliveries.events_after(cursor)
        if not events:
            return 0
        added = self.deliveries.enqueue(self._owed(events))
        settled = _settled_cursor(events, cursor, clock.utcnow() - dt.timedelta(seconds=SETTLE_SECONDS))
        if settled > cursor:
            self.kv.set(CURSOR_KEY, settled)
        return added

    def _owed(self, events: list[JobEvent]) -> list[dict[str, Any]]:
        job_ids = {e.job_id for e in events}
        hooked = self.deliveries.jobs_with_webhooks(job_ids)
        known = self.deliveries.known(set(hooked))
        rows = []
        for event in events:
            job = hooked.get(event.job_id)
            if job is None or (event.job_id, event.id) in known:
                continue
            try:
                row = self._row(event, job)
            except Exception:  # a job row no API would write today (hand-edited, older version): pass it over
                log.exception("webhook for job %s event %s skipped: its job row cannot be read", event.job_id, event.id)
                continue
            if row is not None:
                rows.append(row)
        return rows

    def _row(self, event: JobEvent, job: Any) -> dict[str, Any] | None:
        request = job["request"]
        if event.type not in wanted_events(request.get("webhook_events") or ["completed"]):
            return None
        delivery_id = clock.new_id("whd")
        return {
            "id": delivery_id,
            "job_id": event.job_id,
            "event_id": event.id,
            "event": event.type,
            "url": str(request["webhook_url"]),
            "payload": self._payload(delivery_id, event, job),
        }

    def _payload(self, delivery_id: str, event: JobEvent, job: Any) -> dict[str, Any]:
        """The body receivers get. `id` is stable across retries: receivers use it to ignore duplicates."""
        base = (self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}").rstrip("/")
        images = []
        if event.type == "succeeded":
            images = [
                {"id": i.id, "index": i.index, "seed": i.seed, "url": f"{base}/v1/images/{i.id}"}
                for i in self.jobs.images_for(event.job_id)
            ]
        return {
            "id": delivery_id,
            "type": f"job.{event.type}",
            "event": event.type,
            "event_id": event.id,
            "created_at": event.created_at.isoformat(),
            "job_id": event.job_id,
            "request_id": job["request_id"],
            "data": event.data,
            "job": {
                "id": event.job_id,
                "state": job["state"],
                "progress": {"step": job["progress_step"], "total": job["progress_total"]},
                "error": job["error"],
                "images": images,
                "url": f"{base}/v1/jobs/{event.job_id}",
            },
        }

    # --- deliver --------------------------------------------------------------------------------------------------

    def deliver_due(self) -> int:
        lease = self.config.timeout_seconds + 30
        due = self.deliveries.claim_due(self.id, lease, BATCH)
        if due:
            list(self._pool.map(self._attempt, due))
        return len(due)

    def _attempt(self, delivery: Delivery) -> None:
        try:
            outcome = self.send(delivery)
        except Exception as exc:  # never lose the row to a bug in one attempt: it is retried like a failure
            log.exception("webhook %s: attempt crashed", delivery.id)
            outcome = self._retry_or_fail(delivery, Outcome(state=PENDING, error=f"{type(exc).__name__}: {exc}"))
        try:
            recorded = self.deliveries.record(delivery, self.id, outcome)
        except Exception:  # the row stays leased; the lease expires and it is tried again, the others go on
            log.exception("webhook %s: the attempt's result could not be recorded", delivery.id)
            return
        if not recorded:
            log.warning("webhook %s: lease lost while sending; the other dispatcher records it", delivery.id)
            return
        metrics.webhook_attempt(outcome.state)

    def send(self, delivery: Delivery) -> Outcome:
        secret = self.config.secret.get_secret_value() if self.config.secret else ""
        if not secret:
            return Outcome(state=FAILED, error="webhooks.secret is not configured (DARKROOM_WEBHOOKS__SECRET)")
        try:
            target = guard.check(delivery.url, self.allow, self.resolve)
        except guard.WebhookRefused as exc:
            log.warning("webhook %s to %r refused: %s", delivery.id, delivery.url, exc)
            return Outcome(state=REFUSED, error=f"refused: {exc}")
        body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
        started = time.perf_counter()
        try:
            response = self._post(target, body, delivery, secret)
        except httpx.HTTPError as exc:
            # The exception's text may carry the vetted address; the user sees the host they chose and the kind.
            log.info("webhook %s to %s (%s): %s", delivery.id, target.host, target.address, exc)
            error = f"{type(exc).__name__}: could not reach {target.host}"
            return self._retry_or_fail(delivery, Outcome(state=PENDING, error=error), started=started)
        if response.is_redirect:  # following it would skip the guard; the receiver's URL is what must change
            error = f"HTTP {response.status_code}: the receiver redirects; redirects are not followed"
            return Outcome(FAILED, response.status_code, error, _ms(started))
        result = Outcome(state=PENDING, status=response.status_code)
        if response.is_success:
            return Outcome(DELIVERED, response.status_code, None, _ms(started))
        error = f"HTTP {response.status_code}: {response.text[:200]}"
        return self._retry_or_fail(
            delivery, result, started=started, error=error, retry_after=_retry_after(response.headers)
        )

    def _post(self, target: guard.Target, body: bytes, delivery: Delivery, secret: str) -> httpx.Response:
        """POST to the vetted address, not to whatever the name resolves to by now (see guard)."""
        url = httpx.URL(target.url)
        timestamp = int(time.time())
        headers = {
            "Host": url.netloc.decode("ascii"),
            "Content-Type": "application/json",
            "User-Agent": f"darkroom-webhooks/{__version__}",
            signing.SIGNATURE_HEADER: signing.sign(secret, body, timestamp),
            signing.TIMESTAMP_HEADER: str(timestamp),
            signing.EVENT_HEADER: delivery.event,
            signing.DELIVERY_HEADER: delivery.id,
        }
        if request_id := delivery.payload.get("request_id"):
            headers["X-Request-ID"] = request_id
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        return self._http.post(url.copy_with(host=target.address), content=body, headers=headers, extensions=extensions)

    def _retry_or_fail(
        self,
        delivery: Delivery,
        outcome: Outcome,
        *,
        started: float | None = None,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> Outcome:
        attempt = delivery.attempts + 1
        duration = _ms(started) if started is not None else 0.0
        message = error or outcome.error
        if attempt >= self.config.max_attempts:
            return Outcome(FAILED, outcome.status, message, duration, outcome.address)
        delay = max(self.backoff(attempt), min(retry_after or 0.0, self.config.max_backoff_seconds))
        retry_at = clock.utcnow() + dt.timedelta(seconds=delay)
        return Outcome(PENDING, outcome.status, message, duration, outcome.address, retry_at)

    def backoff(self, attempt: int) -> float:
        """base · 2^(attempt-1), capped, with jitter in [½, 1] so receivers coming back are not hit all at once."""
        raw = min(self.config.max_backoff_seconds, self.config.backoff_seconds * 2 ** (attempt - 1))
        return raw * (0.5 + random.random() / 2)


def _settled_cursor(events: list[JobEvent], cursor: int, settled_before: dt.datetime) -> int:
    for event in events:
        if event.created_at > settled_before:
            break
        cursor = event.id
    return cursor


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def start_for(settings: Settings, store: JobStore) -> WebhookDispatcher | None:
    """What the app's lifespan calls: a running dispatcher, or None when disabled or without a secret (then nothing
    could be signed, and no job can ask for a webhook)."""
    if not settings.webhooks.enabled or not settings.webhooks.secret:
        return None
    return WebhookDispatcher(settings, store).start()

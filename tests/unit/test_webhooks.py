"""Webhooks: signatures, the SSRF guard, and the dispatcher delivering to real HTTP receivers on loopback.

Jobs are driven through the store (claim → progress → complete), which writes exactly the events a worker does,
so these tests need no engine and stay fast.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from fastapi.testclient import TestClient

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.client import WebhookVerificationError, verify_webhook
from darkroom.config import Settings, WebhookSettings
from darkroom.schemas import GenerationRequest
from darkroom.service import Services
from darkroom.webhooks import guard, signing
from darkroom.webhooks.deliveries import DeliveryStore
from darkroom.webhooks.dispatcher import WebhookDispatcher
from tests.support.receiver import Answer, Receiver

SECRET = "whsec-test"


def make_settings(tmp_path, models_dir, **webhooks) -> Settings:
    options = {
        "secret": SECRET,
        "allow_hosts": ["127.0.0.1"],
        "backoff_seconds": 0.05,
        "poll_seconds": 0.05,
        "timeout_seconds": 5,
        "enabled": False,
        **webhooks,
    }
    return Settings(data_dir=tmp_path / "data", models_dir=models_dir, webhooks=WebhookSettings(**options))


@pytest.fixture
def services(tmp_path, models_dir):
    svc = Services.open(make_settings(tmp_path, models_dir))
    yield svc
    svc.close()


def run_job(svc: Services, url: str, events: list[str] | None = None) -> str:
    """A job with a webhook that starts, reports progress and succeeds: the events a worker writes."""
    fields = {"webhook_url": url} | ({"webhook_events": events} if events else {})
    request = GenerationRequest(prompt="p", width=64, height=64, steps=2, seed=1, model="tiny-diffusers", **fields)
    job, _ = svc.store.create(request, request_id="req-123")
    assert svc.store.claim("w1", 30).id == job.id
    svc.store.progress(job.id, "w1", 1, 2, 30)
    svc.store.progress(job.id, "w1", 2, 2, 30)
    assert svc.store.complete(job.id, "w1", [], {"seeds": [1]})
    return job.id


def until(predicate, timeout: float = 20, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def drive(dispatcher: WebhookDispatcher, store: DeliveryStore, job_id: str, states: set[str]) -> list:
    """Run dispatcher passes until every delivery of the job is in one of `states`."""

    def settled() -> list:
        dispatcher.run_once()
        rows = store.for_job(job_id)
        return rows if rows and all(r.state in states for r in rows) else []

    return until(settled, what=f"deliveries {states}")


# --- signing ----------------------------------------------------------------------------------------------------------


def test_signature_round_trip_and_what_breaks_it():
    body = b'{"id":"whd_1"}'
    header = signing.sign(SECRET, body, timestamp=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert signing.verify(body, header, SECRET, now=1_000_100) == 1_000_000
    with pytest.raises(WebhookVerificationError):
        signing.verify(body + b" ", header, SECRET, now=1_000_100)  # tampered body
    with pytest.raises(WebhookVerificationError):
        signing.verify(body, header, "other-secret", now=1_000_100)
    with pytest.raises(WebhookVerificationError):
        signing.verify(body, header, SECRET, now=1_000_000 + 301)  # replayed later
    with pytest.raises(WebhookVerificationError):
        signing.verify(body, "garbage", SECRET)
    rotated = f"{header},v1={'0' * 64}"
    assert signing.verify(body, rotated, SECRET, now=1_000_000)  # one matching v1 is enough


def test_sdk_helper_takes_the_headers_and_returns_the_payload():
    body = b'{"event":"succeeded"}'
    headers = {"x-darkroom-signature": signing.sign(SECRET, body)}
    assert verify_webhook(body, headers, SECRET) == {"event": "succeeded"}
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, {}, SECRET)


# --- SSRF guard -----------------------------------------------------------------------------------------------------


def resolver(mapping: dict[str, list[str]]) -> guard.Resolver:
    return lambda host, port: mapping[host]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.10", "172.16.5.5", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1",
     "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1"],
)  # fmt: skip
def test_non_public_addresses_are_refused(address):
    with pytest.raises(guard.WebhookRefused):
        guard.check("http://hook.example/x", guard.AllowList.parse([]), resolver({"hook.example": [address]}))


def test_public_addresses_pass_and_the_request_is_pinned_to_the_vetted_one():
    names = resolver({"hook.example": ["93.184.216.34"]})
    target = guard.check("https://hook.example:8443/x", guard.AllowList.parse([]), names)
    assert (target.address, target.host, target.port, target.scheme) == ("93.184.216.34", "hook.example", 8443, "https")


def test_one_private_answer_among_public_ones_is_enough_to_refuse():
    with pytest.raises(guard.WebhookRefused):
        names = resolver({"h.example": ["93.184.216.34", "10.0.0.1"]})
        guard.check("http://h.example/", guard.AllowList.parse([]), names)


def test_allow_list_by_cidr_and_by_host_name():
    allow = guard.AllowList.parse(["10.0.0.0/8", "Hooks.Internal", "127.0.0.1"])
    names = resolver({"a.example": ["10.9.9.9"], "hooks.internal": ["192.168.1.1"], "b.example": ["192.168.1.1"]})
    assert guard.check("http://a.example/", allow, names).address == "10.9.9.9"
    assert guard.check("http://hooks.internal/", allow, names).address == "192.168.1.1"
    assert guard.check("http://127.0.0.1:9/", allow).address == "127.0.0.1"
    with pytest.raises(guard.WebhookRefused):
        guard.check("http://b.example/", allow, names)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost", "http://x:99999/"])
def test_malformed_or_non_http_urls_are_refused(url):
    with pytest.raises(guard.WebhookRefused):
        guard.check(url, guard.AllowList.parse(["0.0.0.0/0"]), resolver({"x": ["93.184.216.34"]}))


# --- delivery -------------------------------------------------------------------------------------------------------


def test_signed_delivery_verifies_and_a_500_is_retried(services):
    with Receiver(script=[Answer(500, b"boom"), Answer(200)]) as hook:
        job_id = run_job(services, f"{hook.url}/hooks/darkroom")
        dispatcher = WebhookDispatcher(services.settings, services.store)
        try:
            rows = drive(dispatcher, DeliveryStore(services.store.engine), job_id, {"delivered"})
        finally:
            dispatcher.stop()
        first, second = hook.wait_for(2)
    assert [r.event for r in rows] == ["succeeded"]  # default filter: completed
    delivery = rows[0]
    assert delivery.attempts == 2 and [a["status"] for a in delivery.log] == [500, 200]
    assert delivery.log[0]["error"].startswith("HTTP 500") and delivery.log[1]["error"] is None
    assert first.body == second.body, "a retry sends the same payload"
    assert first.path == "/hooks/darkroom" and first.headers["Host"] == f"127.0.0.1:{hook.port}"
    payload = verify_webhook(second.body, second.headers, SECRET)
    assert payload["id"] == delivery.id == second.headers["X-Darkroom-Delivery"]
    assert payload["type"] == "job.succeeded" and payload["job_id"] == job_id
    assert payload["job"]["state"] == "succeeded" and payload["request_id"] == "req-123"
    assert second.headers["X-Darkroom-Event"] == "succeeded" and second.headers["X-Request-ID"] == "req-123"
    assert second.headers["X-Darkroom-Timestamp"] == second.headers["X-Darkroom-Signature"].split(",")[0][2:]


def test_a_disallowed_address_is_never_called(services):
    with Receiver(host="127.0.0.2") as hook:  # loopback too, but only 127.0.0.1 is allow-listed
        job_id = run_job(services, f"{hook.url}/x", events=["started", "completed"])
        dispatcher = WebhookDispatcher(services.settings, services.store)
        try:
            rows = drive(dispatcher, DeliveryStore(services.store.engine), job_id, {"refused"})
            time.sleep(0.2)
            dispatcher.run_once()
        finally:
            dispatcher.stop()
        assert hook.received == []
    assert {r.event for r in rows} == {"started", "succeeded"}
    assert all(r.attempts == 1 and "non-public" in r.last_error for r in rows)


def test_the_event_filter_chooses_what_is_sent(services):
    with Receiver() as hook:
        job_id = run_job(services, hook.url, events=["started", "progress"])
        dispatcher = WebhookDispatcher(services.settings, services.store)
        try:
            rows = drive(dispatcher, DeliveryStore(services.store.engine), job_id, {"delivered"})
        finally:
            dispatcher.stop()
        received = hook.wait_for(3)
    assert [r.event for r in rows] == ["started", "progress", "progress"]
    assert sorted(r.json()["data"].get("step", 0) for r in received) == [0, 1, 2]


def test_attempts_run_out_then_failed(tmp_path, models_dir):
    svc = Services.open(make_settings(tmp_path, models_dir, max_attempts=3))
    try:
        with Receiver(script=[Answer(503)]) as hook:
            job_id = run_job(svc, hook.url)
            dispatcher = WebhookDispatcher(svc.settings, svc.store)
            try:
                rows = drive(dispatcher, DeliveryStore(svc.store.engine), job_id, {"failed"})
            finally:
                dispatcher.stop()
            assert len(hook.received) == 3
        assert rows[0].attempts == 3 and rows[0].last_status == 503
    finally:
        svc.close()


def test_the_receivers_retry_after_is_honoured(services):
    with Receiver(script=[Answer(429, headers={"Retry-After": "30"}), Answer(200)]) as hook:
        job_id = run_job(services, hook.url)
        dispatcher = WebhookDispatcher(services.settings, services.store)
        try:
            dispatcher.scan()
            before = clock.utcnow()
            dispatcher.deliver_due()
            [row] = DeliveryStore(services.store.engine).for_job(job_id)
            assert row.state == "pending" and row.next_attempt_at >= before + dt.timedelta(seconds=29)
            assert dispatcher.deliver_due() == 0  # not due yet
        finally:
            dispatcher.stop()
        assert len(hook.received) == 1


def test_without_a_secret_nothing_is_sent(tmp_path, models_dir):
    svc = Services.open(make_settings(tmp_path, models_dir, secret=None))
    try:
        with Receiver() as hook:
            job_id = run_job(svc, hook.url)
            dispatcher = WebhookDispatcher(svc.settings, svc.store)
            try:
                rows = drive(dispatcher, DeliveryStore(svc.store.engine), job_id, {"failed"})
            finally:
                dispatcher.stop()
            assert hook.received == []
        assert "secret" in rows[0].last_error
    finally:
        svc.close()


def test_two_dispatchers_deliver_each_event_once(services):
    with Receiver() as hook:
        job_id = run_job(services, hook.url, events=["started", "completed"])
        a = WebhookDispatcher(services.settings, services.store)
        b = WebhookDispatcher(services.settings, services.store)
        try:
            for _ in range(3):
                b.scan()
                a.run_once()
                b.run_once()
            rows = DeliveryStore(services.store.engine).for_job(job_id)
        finally:
            a.stop()
            b.stop()
        assert len(hook.received) == 2
    assert sorted(r.event for r in rows) == ["started", "succeeded"] and all(r.attempts == 1 for r in rows)


def test_the_app_runs_the_dispatcher_and_shows_the_log(tmp_path, models_dir):
    svc = Services.open(make_settings(tmp_path, models_dir, enabled=True))
    try:
        with Receiver() as hook, TestClient(create_app(svc)) as api:
            job_id = run_job(svc, hook.url)
            hook.wait_for(1)
            log = until(lambda: [d for d in api.get(f"/v1/jobs/{job_id}/webhooks").json() if d["state"] == "delivered"])
            assert log[0]["event"] == "succeeded" and log[0]["attempts"] == 1 and log[0]["log"][0]["status"] == 200
            assert "payload" not in log[0]
            assert api.get("/v1/jobs/job_nope/webhooks").status_code == 404
    finally:
        svc.close()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"webhook_url": "ftp://example.com/x"}, "webhook_url"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"webhook_events": ["exploded"]}, "webhook_events.0"),
    ],
)
def test_webhook_fields_are_validated_at_submit(services, patch, field):
    with TestClient(create_app(services)) as api:
        response = api.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 64, **patch})
    assert response.status_code == 422 and response.json()["error"]["field"] == field


# --- SSRF corpus ----------------------------------------------------------------------------------------------------

# Addresses a name may resolve to that lead somewhere internal: IPv4 ranges, and IPv6 forms that embed an IPv4
# address (IPv4-compatible, mapped, SIIT, NAT64, 6to4, Teredo) or are not global themselves.
NON_PUBLIC_ANSWERS = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "0.1.2.3", "255.255.255.255", "240.0.0.1", "198.18.0.1", "192.0.0.8", "192.0.2.1", "224.0.0.251",
    "::", "::1", "::127.0.0.1", "::10.0.0.1", "::169.254.169.254", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "::ffff:0:7f00:1", "::ffff:0:a00:1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1",
    "64:ff9b:1::a00:1", "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:a00:1::", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "fec0::1", "fc00::1", "fd12:3456::1", "fe80::1", "fe80::1%1", "ff02::1", "100::1", "2001:db8::1",
]  # fmt: skip
PUBLIC_ANSWERS = ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::5db8:d822", "2002:5db8:d822::1"]

# URLs refused on their face, before any name is resolved: numeric IPv4 spellings resolvers accept, userinfo tricks,
# control characters, whitespace and other schemes.
MALFORMED_URLS = [
    "http://2130706433/", "http://0177.0.0.1/", "http://0x7f.0.0.1/", "http://0x7f000001/", "http://127.1/",
    "http://017700000001/", "http://0/", "http://169.254.43518/", "http://hooks.example.com@127.0.0.1/",
    "http://user:pass@hooks.example.com/", "http://hooks.example.com:80@10.0.0.1/", "http://@127.0.0.1/",
    "http://hooks.example.com\x00.evil/", "http://hooks.example.com/\x00", "http://hooks.example.com/\r\nHost: x",
    "http://hooks.example.com/a b", " http://hooks.example.com/", "http://hooks.example.com\\@127.0.0.1/",
    "http:\\\\127.0.0.1/", "http:///x", "http://", "http://:80/", "http://hooks.example.com:0/",
    "http://hooks.example.com:99999/", "http://hooks.example.com:-1/", "http://①②⑦.0.0.1/", "http://exa mple.com/",
    "http://-bad-.example/", "http://[::1/", "gopher://hooks.example.com/", "file:///etc/passwd", "ftp://x.example/",
    "javascript:alert(1)", "//hooks.example.com/", "http://" + "a" * 2000 + ".example/",
]  # fmt: skip


def test_ssrf_corpus_non_public_answers_are_refused_without_showing_them():
    for address in NON_PUBLIC_ANSWERS:
        names = resolver({"hook.example": [address]})
        with pytest.raises(guard.WebhookRefused) as exc:
            guard.check("http://hook.example/x", guard.AllowList.parse([]), names)
        assert address not in str(exc.value) and "hook.example" in str(exc.value), address
    for address in PUBLIC_ANSWERS:
        assert guard.check("https://hook.example/x", guard.AllowList.parse([]), resolver({"hook.example": [address]}))


def test_ssrf_corpus_ip_literals_in_urls_are_refused():
    for address in NON_PUBLIC_ANSWERS:
        literal = f"[{address}]" if ":" in address else address
        if "%" in literal:
            continue  # a zone id is not valid in a URL: the malformed corpus covers it
        with pytest.raises(guard.WebhookRefused):
            guard.check(f"http://{literal}:8080/x", guard.AllowList.parse([]))  # the real resolver: no network


def test_ssrf_corpus_malformed_urls_are_refused_before_any_lookup():
    def no_lookup(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} should not be looked up")

    for url in MALFORMED_URLS:
        with pytest.raises(guard.WebhookRefused):
            guard.check(url, guard.AllowList.parse(["0.0.0.0/0", "::/0"]), no_lookup)


def test_ssrf_corpus_is_refused_at_submit_naming_the_field(services):
    with TestClient(create_app(services)) as api:
        for url in [u for u in MALFORMED_URLS if "\\" not in u or u.startswith("http")]:
            response = api.post("/v1/jobs", json={"prompt": "p", "width": 64, "height": 64, "webhook_url": url})
            assert response.status_code == 422, url
            assert response.json()["error"]["field"] == "webhook_url", url
        assert services.store.list() == []


def test_redirects_are_not_followed_so_they_cannot_reach_a_private_address(services):
    with Receiver(host="127.0.0.2") as internal:  # not allow-listed: where a redirect would lead
        moved = Answer(302, headers={"Location": f"{internal.url}/admin"})
        with Receiver(script=[moved]) as hook:
            job_id = run_job(services, hook.url)
            dispatcher = WebhookDispatcher(services.settings, services.store)
            try:
                [row] = drive(dispatcher, DeliveryStore(services.store.engine), job_id, {"failed"})
            finally:
                dispatcher.stop()
            assert len(hook.received) == 1
        assert internal.received == []
    assert row.attempts == 1 and row.last_status == 302 and "redirects are not followed" in row.last_error


def test_the_delivery_log_shows_the_users_host_never_the_servers_dns_answers(tmp_path, models_dir):
    svc = Services.open(make_settings(tmp_path, models_dir, max_attempts=1))
    try:
        names = resolver({"private.example": ["10.20.30.40"], "closed.example": ["127.0.0.1"]})
        refused = run_job(svc, "http://private.example/hook")
        with Receiver() as gone:
            port = gone.port  # a port nothing listens on once the receiver is closed
        unreachable = run_job(svc, f"http://closed.example:{port}/hook")
        allow = make_settings(tmp_path, models_dir, allow_hosts=["closed.example"]).webhooks
        dispatcher = WebhookDispatcher(svc.settings.model_copy(update={"webhooks": allow}), svc.store, resolve=names)
        store = DeliveryStore(svc.store.engine)
        try:
            [first] = drive(dispatcher, store, refused, {"refused"})
            [second] = drive(dispatcher, store, unreachable, {"failed"})
        finally:
            dispatcher.stop()
        shown = repr([first.public(), second.public()])
        assert "private.example" in first.last_error and "closed.example" in second.last_error
        assert "10.20.30.40" not in shown and "127.0.0.1" not in shown and "address'" not in shown
    finally:
        svc.close()


# --- one bad row never stops the dispatcher ---------------------------------------------------------------------------


def test_a_poison_webhook_row_on_postgresql_is_isolated_and_others_still_deliver(tmp_path, models_dir, pg_url):
    """A NUL in a URL (accepted before strict validation; here written past it) made PostgreSQL refuse the delivery
    row, the scan failed on every pass with its cursor stuck, and no webhook went out for anyone again."""
    settings = make_settings(tmp_path, models_dir).model_copy(update={"database_url": pg_url})
    svc = Services.open(settings)
    try:
        with Receiver() as hook:
            request = GenerationRequest(prompt="p", width=64, height=64, steps=2, seed=1, model="tiny-diffusers")
            poison = request.model_copy(update={"webhook_url": f"{hook.url}/\x00poison"})
            bad, _ = svc.store.create(poison, request_id="req-bad")
            svc.store.cancel(bad.id)
            good = run_job(svc, f"{hook.url}/good")
            dispatcher = WebhookDispatcher(svc.settings, svc.store)
            store = DeliveryStore(svc.store.engine)
            try:
                [delivered] = drive(dispatcher, store, good, {"delivered"})
                [isolated] = drive(dispatcher, store, bad.id, {"failed"})
            finally:
                dispatcher.stop()
            assert [r.path for r in hook.received] == ["/good"]
        assert delivered.attempts == 1
        assert isolated.attempts == 0 and "database refused" in isolated.last_error and "\\x00" in isolated.url
    finally:
        svc.close()


def test_a_receiver_answer_with_nul_is_recorded_printably(tmp_path, models_dir, pg_url):
    settings = make_settings(tmp_path, models_dir, max_attempts=1).model_copy(update={"database_url": pg_url})
    svc = Services.open(settings)
    try:
        with Receiver(script=[Answer(500, b"boom\x00boom")]) as hook:
            job_id = run_job(svc, hook.url)
            dispatcher = WebhookDispatcher(svc.settings, svc.store)
            try:
                [row] = drive(dispatcher, DeliveryStore(svc.store.engine), job_id, {"failed"})
            finally:
                dispatcher.stop()
        assert row.last_error == "HTTP 500: boom\\x00boom"
    finally:
        svc.close()


# --- when the dispatcher runs ----------------------------------------------------------------------------------------


def test_no_dispatcher_runs_without_a_secret(tmp_path, models_dir):
    from darkroom.webhooks.dispatcher import start_for

    settings = make_settings(tmp_path, models_dir, secret=None, enabled=True)
    assert start_for(settings, None) is None  # type: ignore[arg-type]


def test_an_idle_dispatcher_backs_off_and_work_resets_the_wait(services):
    dispatcher = WebhookDispatcher(services.settings, services.store)
    try:
        delays, delay = [], services.settings.webhooks.poll_seconds
        for _ in range(10):
            delay = dispatcher.next_delay(delay, busy=False)
            delays.append(delay)
        assert delays[:3] == [0.1, 0.2, 0.4] and delays[-1] == 5.0 and delays == sorted(delays)
        assert dispatcher.next_delay(5.0, busy=True) == 0.05
    finally:
        dispatcher.stop()


def test_wake_runs_a_pass_at_once_instead_of_after_the_idle_wait(tmp_path, models_dir):
    svc = Services.open(make_settings(tmp_path, models_dir, poll_seconds=60))
    try:
        with Receiver() as hook:
            dispatcher = WebhookDispatcher(svc.settings, svc.store).start()
            try:
                run_job(svc, hook.url)
                dispatcher.wake()
                hook.wait_for(1, timeout=10)  # far less than the 60 s the loop would otherwise wait
            finally:
                dispatcher.stop()
    finally:
        svc.close()


def test_the_apps_dispatcher_is_woken_by_the_change_feed_not_its_poll(tmp_path, models_dir):
    """With a 60 s pass interval, only the feed's notice of the job's end can explain a delivery within seconds."""
    svc = Services.open(make_settings(tmp_path, models_dir, enabled=True, poll_seconds=60))
    try:
        with Receiver() as hook, TestClient(create_app(svc)):
            run_job(svc, hook.url)
            hook.wait_for(1, timeout=10)
    finally:
        svc.close()

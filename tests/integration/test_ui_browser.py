"""The web UI in a real headless Chromium (Debian's `chromium`, driven by Playwright), against one live server on
the tiny model: sign in, generate and watch progress and previews arrive, cancel a queued job, approve a held image
as an operator, and check that a user sees neither the review page nor another tenant's images, and that a form post
without its CSRF token is refused. Every page visited passes axe-core (vendored) with no serious or critical
violation, and every test leaves a screenshot in test-artefacts/ui/ (docs/ui/ too with DARKROOM_UPDATE_SCREENSHOTS=1,
which is how docs/ui.md's pictures are made)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import ServerSettings, Settings
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from tests.conftest import require_service
from tests.support.live import LiveServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / "test-artefacts" / "ui"
DOC_SHOTS = ROOT / "docs" / "ui"
AXE = ROOT / "src" / "darkroom" / "web" / "static" / "vendor" / "axe.min.js"
TIMEOUT_MS = 20_000

try:
    from playwright import sync_api
except ImportError:  # the browser fixture reports it: a skip here, a failure in CI
    sync_api = None  # type: ignore[assignment]


class Site:
    def __init__(self, url: str, svc: Services, tokens: dict[str, str], key_ids: dict[str, str]) -> None:
        self.url, self.svc, self.tokens, self.key_ids = url, svc, tokens, key_ids


@pytest.fixture(scope="module")
def site(tmp_path_factory, models_dir) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("ui-browser")
    settings = Settings(
        data_dir=tmp / "data",
        models_dir=models_dir,
        heartbeat_seconds=0.05,
        batch_window_seconds=0,
        preview_every_seconds=0,  # a preview with every step: the test sees them arrive
        server=ServerSettings(auth_cache_seconds=0),  # a policy change is seen by the next job at once
    )
    svc = Services.open(settings)
    tokens, key_ids = {}, {}
    for name, role, tenant in (
        ("user", Role.user, "acme"),
        ("other", Role.user, "globex"),
        ("operator", Role.operator, "acme"),
    ):
        key, tokens[name] = svc.keys.create(Principal.cli(), name=name, role=role, tenant=tenant)
        key_ids[name] = key.id
    with LiveServer(create_app(svc, workers=0)) as server:
        yield Site(server.url, svc, tokens, key_ids)
    svc.close()


@pytest.fixture(scope="module")
def browser(site):
    if sync_api is None:
        require_service("playwright is not installed (it is in the test extra: pip install -e '.[test]')")
    executable = shutil.which("chromium")
    if executable is None:
        require_service("chromium not found (`make test` installs it with scripts/test-services.sh)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(base_url=site.url, viewport={"width": 1100, "height": 760})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def start_worker(site: Site) -> None:
    """One in-process worker thread, started by the first test that needs jobs to run (the ones before it rely on
    jobs staying queued)."""
    if not site.svc.workers:
        site.svc.start_workers(1)


def sign_in(page, who: str, site: Site) -> None:
    page.goto("/")
    page.fill("#api_key", site.tokens[who])
    page.click("form[action='/ui/login'] button[type=submit]")
    page.wait_for_url("**/ui/generate")


def check_accessibility(page) -> None:
    """axe-core, loaded from the server like any script the page is allowed (the CSP admits only 'self')."""
    page.add_script_tag(url="/ui/static/vendor/axe.min.js")
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    assert result["passes"], "axe-core checked nothing"
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{page.url}: " + "; ".join(bad)


def shot(page, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"))
    if os.environ.get("DARKROOM_UPDATE_SCREENSHOTS") == "1":
        DOC_SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOC_SHOTS / f"{name}.png"))


def wait_for_job(site: Site, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not site.svc.store.require(job_id).state.terminal:
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.05)


def test_sign_in_page_and_swagger_work_offline(page, site):
    page.goto("/")
    check_accessibility(page)
    shot(page, "sign-in")
    page.emulate_media(color_scheme="dark")  # the dark theme's colours pass the contrast checks too
    check_accessibility(page)
    shot(page, "sign-in-dark")
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .info .title")  # rendered by the vendored bundle: no network needed
    # /redoc is left to the unit test (its vendored bundle answers): parsing its 1 MB here costs 3-15 s a run.


def paint_a_mask_by_keyboard(page) -> None:
    """The mask painter without a pointer: Tab focus, an arrow moves the brush, + grows it, Space paints."""
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(source, "PNG")
    page.click("text=Source image (img2img) and mask (inpainting)")
    page.set_input_files("#init_image", files=[{"name": "s.png", "mimeType": "image/png", "buffer": source.getvalue()}])
    page.wait_for_selector("#mask-canvas", state="visible")
    page.focus("#brush")
    page.keyboard.press("Shift+Tab")  # the canvas is in the tab order, just before the brush slider
    assert page.evaluate("document.activeElement.id") == "mask-canvas"
    for key in ("ArrowRight", "+", "Space"):
        page.keyboard.press(key)
    assert page.input_value("#brush") == "36"
    assert page.text_content("#painter-status") == "Brush at 40, 32 of 64 by 64, size 36; mask painted"
    check_accessibility(page)
    page.evaluate("document.getElementById('generate-form').dispatchEvent(new Event('submit'))")  # fills mask_image
    mask = Image.open(io.BytesIO(base64.b64decode(page.input_value("#mask_image").split(",", 1)[1]))).convert("L")
    assert mask.getpixel((40, 32)) == 255 and mask.getpixel((5, 5)) == 0  # painted at the brush, nowhere else


def test_a_post_without_its_csrf_token_is_refused(page, site):
    sign_in(page, "user", site)
    before = site.svc.store.counts()
    paint_a_mask_by_keyboard(page)  # the post below carries a source image and a mask: refused all the same
    page.fill("#prompt", "never queued")
    page.evaluate("document.querySelector('#generate-form input[name=csrf_token]').remove()")
    with page.expect_response(lambda r: r.url.endswith("/ui/generate") and r.request.method == "POST") as answer:
        page.click("#submit")
    assert answer.value.status == 403
    page.wait_for_selector("text=CSRF token")
    assert site.svc.store.counts() == before
    shot(page, "csrf-refused")


def test_cancel_a_queued_job(page, site):
    assert not site.svc.workers, "this test needs its job to stay queued"
    sign_in(page, "user", site)
    page.fill("#prompt", "a job to cancel")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "1")
    page.click("#submit")
    page.wait_for_url("**/ui/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.goto("/ui/queue")
    row = page.locator(f"#job-{job_id}")
    row.wait_for()
    check_accessibility(page)
    shot(page, "queue")
    row.get_by_role("button", name="Cancel").click()
    page.wait_for_url("**/ui/queue")
    page.locator(f"#job-{job_id}").wait_for(state="detached")
    assert site.svc.store.require(job_id).state is JobState.cancelled


def test_generate_from_the_form_and_watch_progress(page, site):
    start_worker(site)
    sign_in(page, "user", site)
    check_accessibility(page)
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#negative_prompt", "blurry")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "6")
    page.fill("#seed", "42")
    shot(page, "generate")
    page.click("#submit")
    page.wait_for_url("**/ui/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#job-state-value:text('succeeded')")
    image = page.locator("#result img").first
    image.wait_for()
    # Shown is not yet loaded. The check reads a property, not a string of JavaScript: wait_for_function
    # evaluates its string with eval, which the UI's Content-Security-Policy (script-src 'self') forbids.
    sync_api.expect(image).to_have_js_property("complete", True)
    assert page.evaluate("document.querySelector('#result img').naturalWidth") == 64
    # The progress bar and the live preview were fed by the event stream (the page itself was rendered while
    # the job was queued or running, with no preview).
    assert page.evaluate("document.getElementById('progress').value") == 6
    assert page.get_attribute("#preview-image", "src").startswith("data:image/jpeg;base64,")
    assert "a lighthouse at dusk" in page.inner_text("table.params")
    check_accessibility(page)
    shot(page, "job")
    page.click("text=Reuse these settings")
    assert page.input_value("#seed") == "42" and page.input_value("#prompt") == "a lighthouse at dusk"
    page.goto("/ui/gallery?q=lighthouse")
    page.locator("ul.images img").first.wait_for()
    check_accessibility(page)
    shot(page, "gallery")
    page.locator("ul.images a").first.click()
    page.wait_for_selector("#verify-badge")
    check_accessibility(page)
    shot(page, "image")
    assert site.svc.store.require(job_id).state is JobState.succeeded


def test_operator_approves_a_held_image(page, site):
    start_worker(site)
    svc = site.svc
    svc.tenants.put("acme", TenantPolicy(require_review=True), Principal.cli())
    try:
        body = GenerationRequest(prompt="held for a look", width=64, height=64, steps=1, seed=3, model="tiny-diffusers")
        job, _ = svc.store.create(body, tenant="acme", key_id=site.key_ids["user"])
        wait_for_job(site, job.id)
    finally:
        svc.tenants.put("acme", TenantPolicy(), Principal.cli())
    image_id = svc.store.images_for(job.id)[0].id
    assert svc.store.get_image(image_id).review_state == "pending"
    sign_in(page, "operator", site)
    page.click("nav[aria-label=Main] >> text=Review")
    card = page.locator(f"#review-{image_id}")
    card.wait_for()
    picture = card.locator("img")  # the card can show before its image loads
    sync_api.expect(picture).to_have_js_property("complete", True)
    sync_api.expect(picture).to_have_js_property("naturalWidth", 64)
    assert page.evaluate(f"document.querySelector('#review-{image_id} img').naturalWidth") == 64
    check_accessibility(page)
    shot(page, "review")
    card.locator("input[name=note]").fill("checked: fine")
    card.get_by_role("button", name="Approve").click()
    page.wait_for_url("**/ui/review")
    card.wait_for(state="detached")
    assert svc.store.get_image(image_id).review_state == "approved"
    assert any(r.target == image_id for r in svc.audit.list(action="review.approve"))


def test_a_user_sees_neither_review_nor_another_tenants_images(page, site):
    start_worker(site)
    svc = site.svc
    body = GenerationRequest(
        prompt="acme's private harbour", width=64, height=64, steps=1, seed=5, model="tiny-diffusers"
    )
    job, _ = svc.store.create(body, tenant="acme", key_id=site.key_ids["user"])
    wait_for_job(site, job.id)
    image_id = svc.store.images_for(job.id)[0].id
    sign_in(page, "other", site)
    assert page.locator("nav[aria-label=Main] >> text=Review").count() == 0
    response = page.goto("/ui/review")
    assert response.status == 403
    check_accessibility(page)
    shot(page, "review-forbidden")
    page.goto("/ui/gallery")
    assert "harbour" not in page.content()
    for path in (f"/ui/images/{image_id}", f"/ui/gallery/{image_id}", f"/ui/jobs/{job.id}"):
        assert page.goto(path).status == 404, path

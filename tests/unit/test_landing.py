"""`/` is a page that renders offline: every asset it loads is served by darkroom, and every link on it answers."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.service import Services


class Refs(HTMLParser):
    """Every URL the page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.loads: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "href" and tag == "a" and value:
                self.links.append(value)
            elif name in ("src", "href", "srcset") and value:
                self.loads.append(value)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("landing")
    (tmp / "models").mkdir()
    services = Services.open(Settings(data_dir=tmp / "data", models_dir=tmp / "models", create_default_model=False))
    with TestClient(create_app(services, workers=0)) as client:
        yield client
    services.close()


def test_root_is_a_self_contained_page(api):
    """Signed out, `/` is the UI's sign-in page: everything it loads comes from this server, and answers."""
    r = api.get("/", follow_redirects=False)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    refs = Refs()
    refs.feed(r.text)
    assert refs.loads and all(ref.startswith("/ui/static/") for ref in refs.loads), refs.loads
    for ref in refs.loads:
        assert api.get(ref).status_code == 200, ref
    assert "@import" not in r.text and "url(" not in r.text
    assert not re.search(r"https?://", r.text)


def test_every_link_on_the_page_answers(api):
    refs = Refs()
    refs.feed(api.get("/").text)
    assert {"/openapi.json", "/docs", "/healthz", "/readyz"} <= set(refs.links)
    for link in refs.links:
        if link.startswith("#"):  # the skip link to the page's own main region
            assert link == "#main" and 'id="main"' in api.get("/").text
            continue
        assert link.startswith("/"), link
        expected = {200, 503} if link == "/readyz" else {200}  # not ready: this folder holds no model
        assert api.get(link).status_code in expected, link


def test_root_is_not_in_the_schema(api):
    assert "/" not in api.get("/openapi.json").json()["paths"]

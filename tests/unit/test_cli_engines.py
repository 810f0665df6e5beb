"""`darkroom engines list | test NAME` (cli_engines.py) against the configured engine: an OpenAI-compatible remote
served on loopback (tests/support/openai_images.py), settings from the environment as every command reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from darkroom.cli import app
from tests.support.openai_images import OpenAIImagesServer

KEY = "sk-cli-engines"


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    with OpenAIImagesServer(KEY) as server:
        monkeypatch.setenv("DARKROOM_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("DARKROOM_ENGINE", "openai")
        monkeypatch.setenv("DARKROOM_REMOTE__URL", server.url)
        monkeypatch.setenv("DARKROOM_REMOTE__API_KEY_ENV", "DARKROOM_TEST_CLI_KEY")
        monkeypatch.setenv("DARKROOM_TEST_CLI_KEY", KEY)
        monkeypatch.delenv("DARKROOM_URL", raising=False)
        yield server


def test_engines_list_shows_the_configured_engine_and_its_health(cloud: OpenAIImagesServer) -> None:
    result = CliRunner().invoke(app, ["engines", "list", "--json"])
    assert result.exit_code == 0, result.output
    (engine,) = json.loads(result.stdout)
    assert engine["name"] == "openai-remote" and engine["kind"] == "openai"
    assert engine["capabilities"]["external"] is True and engine["health"]["ok"] is True
    assert engine["capacity"]["labels"] == ["public"]  # a cloud: never confidential or internal work
    table = CliRunner().invoke(app, ["engines", "list"])
    assert table.exit_code == 0 and "openai-remote" in table.stdout


def test_engines_test_probes_the_engine_and_its_key(cloud: OpenAIImagesServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ok = CliRunner().invoke(app, ["engines", "test", "openai-remote"])
    assert ok.exit_code == 0 and "ok" in ok.stdout, ok.output
    assert CliRunner().invoke(app, ["engines", "test", "a1111"]).exit_code == 2  # not configured here
    monkeypatch.setenv("DARKROOM_TEST_CLI_KEY", "sk-wrong")
    refused = CliRunner().invoke(app, ["engines", "test", "openai"])
    assert refused.exit_code == 1 and "401" in refused.output

"""Where `darkroom` commands find their settings: env, darkroom.toml (here or ~/.config/darkroom), the data dir
`darkroom serve` recorded; and that every path is absolute, so a command run from another folder means the same
data dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from darkroom.cli import app
from darkroom.config import ConfigFileError, Settings, command_settings, record_data_dir


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty home for config and state, no DARKROOM_* from the caller's env, and a fresh current folder."""
    for name in ("DARKROOM_DATA_DIR", "DARKROOM_MODELS_DIR", "DARKROOM_CONFIG", "DARKROOM_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path


@pytest.fixture
def data_dir(home, tiny_diffusers_model) -> Path:
    data = home / "node" / "darkroom-data"
    shutil.copytree(tiny_diffusers_model, data / "models" / tiny_diffusers_model.name)
    return data


def listed_models() -> list[str]:
    done = CliRunner().invoke(app, ["models", "list", "--as-json"])
    assert done.exit_code == 0, done.output
    return [m["id"] for m in json.loads(done.stdout)]


def test_models_list_from_another_folder_finds_the_data_dir_given_by_env(data_dir, monkeypatch):
    assert listed_models() == []  # ./darkroom-data here: nothing
    monkeypatch.setenv("DARKROOM_DATA_DIR", str(data_dir))
    assert listed_models() == ["tiny-diffusers"]


def test_models_list_finds_the_data_dir_of_a_darkroom_toml_here_or_in_the_user_config(data_dir, home):
    (home / "elsewhere" / "darkroom.toml").write_text(f'data_dir = "{data_dir}"\n')
    assert listed_models() == ["tiny-diffusers"]
    (home / "elsewhere" / "darkroom.toml").unlink()
    user = home / "config" / "darkroom"
    user.mkdir(parents=True)
    (user / "darkroom.toml").write_text('data_dir = "../../node/darkroom-data"\n')  # relative to the file's folder
    assert listed_models() == ["tiny-diffusers"]


def test_the_data_dir_serve_recorded_is_used_when_nothing_else_names_one(data_dir, home):
    record_data_dir(Settings(data_dir=data_dir))
    done = CliRunner().invoke(app, ["models", "list", "--as-json"])
    assert [m["id"] for m in json.loads(done.stdout)] == ["tiny-diffusers"]
    assert f"data dir {data_dir} (recorded by `darkroom serve`" in done.stderr
    (home / "elsewhere" / "darkroom-data").mkdir()  # a data dir here wins over the record
    assert listed_models() == []


def test_precedence_nested_tables_and_absolute_paths(home, monkeypatch):
    user = home / "config" / "darkroom"
    user.mkdir(parents=True)
    (user / "darkroom.toml").write_text('port = 9001\nworkers = 3\n[storage]\ns3_prefix = "user"\n')
    (home / "elsewhere" / "darkroom.toml").write_text('port = 9002\nmodels_dir = "m"\n[storage]\ns3_region = "eu"\n')
    monkeypatch.setenv("DARKROOM_WORKERS", "5")
    settings, origin = command_settings(workers=None, database_url="sqlite://")
    assert (settings.port, settings.workers) == (9002, 5)  # the folder's file over the user's; env over both
    assert (settings.storage.s3_prefix, settings.storage.s3_region) == ("user", "eu")  # tables merge
    assert settings.models_dir == home / "elsewhere" / "m"
    assert settings.data_dir == home / "elsewhere" / "darkroom-data" and origin == "default"
    assert Settings(data_dir=Path("rel")).data_dir == home / "elsewhere" / "rel"


def test_darkroom_config_names_the_one_file_and_a_broken_one_is_named(home, monkeypatch):
    (home / "elsewhere" / "darkroom.toml").write_text("port = 9002\n")
    only = home / "only.toml"
    only.write_text("port = 9003\n")
    monkeypatch.setenv("DARKROOM_CONFIG", str(only))
    assert Settings().port == 9003
    monkeypatch.setenv("DARKROOM_CONFIG", "")
    assert Settings().port == 8000
    only.write_text("port = \n")
    monkeypatch.setenv("DARKROOM_CONFIG", str(only))
    with pytest.raises(ConfigFileError, match=str(only)):
        Settings()
    done = CliRunner().invoke(app, ["models", "list"])
    assert done.exit_code == 2 and str(only) in done.output


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({}, ["--api-processes", "0"], "--api-processes"),
        ({"DARKROOM_SERVER__API_PROCESSES": "0"}, [], "api_processes"),
        ({"DARKROOM_SERVER__ADMISSION_FLOOR": "0"}, [], "admission_floor"),
        ({"DARKROOM_CPU_WORKER_NICE": "20"}, [], "cpu_worker_nice"),  # past what nice(2) takes
        ({"DARKROOM_CPU_WORKER_NICE": "-1"}, [], "cpu_worker_nice"),  # would raise the worker's priority
    ],
)
def test_serve_refuses_out_of_range_process_counts_floors_and_niceness_before_it_starts(
    home, monkeypatch, env, args, named
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = CliRunner().invoke(app, ["serve", "--data-dir", str(home / "data"), *args])
    assert done.exit_code == 2, done.output
    assert named in done.output
    assert not (home / "data" / "darkroom.db").exists()  # nothing opened

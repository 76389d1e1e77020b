"""`bl-api` operator commands and the environment they read."""

from __future__ import annotations

import socket

import pytest
from bl_api import __version__
from bl_api.cli import main
from bl_api.config import ConfigError, Settings

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import apply_pending


def test_version_prints_the_running_version(capsys, monkeypatch):
    monkeypatch.delenv("BL_API_VERSION_OVERRIDE", raising=False)
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


@pytest.mark.postgres
def test_check_config_passes_on_a_migrated_database(capsys, monkeypatch, pg_db):
    monkeypatch.setenv("DATABASE_URL", pg_db)
    assert main(["check-config"]) == 1            # reachable, but the schema is missing
    assert "MISSING" in capsys.readouterr().out
    apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "database: ok" in out
    assert "course_events present" in out


def test_check_config_fails_when_the_database_is_unreachable(capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DATABASE_URL", f"postgresql://bl:s3cret@127.0.0.1:{port}/bl")
    assert main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err
    assert "s3cret" not in err


def test_check_config_fails_without_database_url(capsys, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["check-config"]) == 1
    assert "DATABASE_URL is not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"DATABASE_URL": "host=x port"}, "not a valid libpq", id="bad-conninfo"),
        pytest.param({"DATABASE_URL": "host=x", "BL_API_POOL_MAX": "ten"}, "not a whole number",
                     id="pool-max-not-a-number"),
        pytest.param({"DATABASE_URL": "host=x", "BL_API_POOL_MAX": "0"}, "at least 1", id="pool-max-zero"),
    ],
)
def test_bad_settings_are_refused_with_a_message(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_settings_defaults():
    s = Settings.from_env({"DATABASE_URL": "postgresql://u@db1/bl"})
    assert (s.pool_max, s.test_slow_header) == (10, False)
    assert Settings.from_env({"DATABASE_URL": "host=db1", "BL_API_TEST_SLOW_HEADER": "1"}).test_slow_header

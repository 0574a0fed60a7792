"""Settings: production variables give a clean deploy check; bad values fail loudly; secrets
can come from files."""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEBUG", "SECRET_KEY"))}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _production(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "secret_key"
    secret.write_text(secrets.token_urlsafe(50) + "\n")
    keys = tmp_path / "keys"
    keys.write_text(Fernet.generate_key().decode())
    return {
        "DEBUG": "False",
        "SECRET_KEY_FILE": str(secret),
        "HERMIT_ENCRYPTION_KEYS_FILE": str(keys),
        "ALLOWED_HOSTS": "hermit.example.com",
        "SITE_URL": "https://hermit.example.com",
        "HERMIT_DATA_DIR": str(tmp_path / "data"),
    }


def test_it_passes_the_deploy_check_with_production_variables(tmp_path: Path) -> None:
    result = _manage("check", "--deploy", **_production(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_it_refuses_production_without_a_secret_key(tmp_path: Path) -> None:
    env = _production(tmp_path)
    del env["SECRET_KEY_FILE"]
    result = _manage("check", **env)
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_it_refuses_a_boolean_that_is_not_true_or_false(tmp_path: Path) -> None:
    result = _manage("check", DEBUG="yes", HERMIT_DATA_DIR=str(tmp_path))
    assert result.returncode != 0
    assert "DEBUG must be True or False" in result.stderr


def test_it_runs_embedded_with_no_services(tmp_path: Path) -> None:
    env = {"HERMIT_DATA_DIR": str(tmp_path), "DATABASE_URL": "", "REDIS_URL": ""}
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, "
        "s.CHANNEL_LAYERS['default']['BACKEND'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env, "DJANGO_SETTINGS_MODULE": "portal.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split() == [
        "django.db.backends.sqlite3",
        "filesystem://",
        "channels.layers.InMemoryChannelLayer",
    ], result.stderr
    migrate = _manage("migrate", "--noinput", **env)
    assert migrate.returncode == 0, migrate.stderr
    with sqlite3.connect(tmp_path / "hermit.sqlite3") as db:  # WAL is stored in the file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("value", ["True", "true", "False", "FALSE"])
def test_envbool_accepts_only_true_and_false(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from portal.settings import envbool

    monkeypatch.setenv("HERMIT_X", value)
    assert envbool("HERMIT_X", "False") is (value.lower() == "true")
    monkeypatch.setenv("HERMIT_X", "1")
    with pytest.raises(ValueError, match="HERMIT_X must be True or False"):
        envbool("HERMIT_X", "False")

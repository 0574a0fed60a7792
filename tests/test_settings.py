"""Settings: production is the default (DEBUG off, secrets required); production variables give
a clean deploy check; bad values fail loudly; secrets can come from files; the embedded database
and broker are private; the debug page shows no passwords."""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.http import HttpRequest
from django.test import RequestFactory
from django.views.debug import get_exception_reporter_class, technical_500_response

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run manage.py with portal.settings and this environment, less DEBUG and SECRET_KEY."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEBUG", "SECRET_KEY"))}
    clean["DJANGO_SETTINGS_MODULE"] = "portal.settings"
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


def test_it_defaults_to_production_and_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], "HERMIT_DATA_DIR": str(tmp_path)}  # no DEBUG at all
    code = "import portal.settings as s; print(s.DEBUG, s.SESSION_COOKIE_SECURE)"

    def settings_with(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env={**base, **env},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    result = settings_with()
    assert result.returncode != 0
    assert "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is False" in result.stderr
    result = settings_with(SECRET_KEY=secrets.token_urlsafe(50))
    assert result.returncode != 0
    assert "HERMIT_ENCRYPTION_KEYS" in result.stderr  # no key derived from SECRET_KEY either
    keys = Fernet.generate_key().decode()
    result = settings_with(SECRET_KEY=secrets.token_urlsafe(50), HERMIT_ENCRYPTION_KEYS=keys)
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_it_runs_embedded_with_no_services(tmp_path: Path) -> None:
    env = {"HERMIT_DATA_DIR": str(tmp_path), "DATABASE_URL": "", "REDIS_URL": "", "DEBUG": "True"}
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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_it_keeps_the_embedded_database_and_broker_private(tmp_path: Path) -> None:
    env = {"HERMIT_DATA_DIR": str(tmp_path), "DATABASE_URL": "", "REDIS_URL": "", "DEBUG": "True"}
    umask = os.umask(0o022)  # what most systems have: new files 0644, new folders 0755
    try:
        assert _manage("migrate", "--noinput", **env).returncode == 0
        db = tmp_path / "hermit.sqlite3"
        broker = tmp_path / "celery-broker"
        with closing(sqlite3.connect(db)) as conn:  # a second process: SQLite makes -wal, -shm
            conn.execute("SELECT count(*) FROM django_migrations").fetchone()
            files = [db, tmp_path / "hermit.sqlite3-wal", tmp_path / "hermit.sqlite3-shm"]
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        dirs = [broker, broker / "in", broker / "processed", broker / "control"]
        assert {str(d): _mode(d) for d in dirs} == {str(d): 0o700 for d in dirs}

        # An installation made before: its files are made private when settings next load.
        db.chmod(0o644)
        broker.chmod(0o755)
        assert _manage("check", **env).returncode == 0
        assert (_mode(db), _mode(broker)) == (0o600, 0o700)
    finally:
        os.umask(umask)


def _error_pages(request: HttpRequest, dsn: str) -> tuple[str, str]:
    """Return the debug page and the error mail text for an error naming dsn."""
    try:
        raise ValueError(f"cannot reach {dsn}")  # in the message and in this frame's locals
    except ValueError:
        html = technical_500_response(request, *sys.exc_info()).content.decode()
        reporter = get_exception_reporter_class(request)(request, *sys.exc_info())
        return html, reporter.get_traceback_text()


def test_the_debug_page_shows_no_passwords(rf: RequestFactory, settings: Any) -> None:
    password = "pa55-" + secrets.token_hex(8)
    dsn = f"postgres://hermit:{password}@db.internal:5432/hermit"
    redis = f"redis://:{password}@redis.internal:6379/0"
    settings.DEBUG = True
    settings.DATABASE_URL = dsn
    settings.REDIS_URL = settings.CELERY_BROKER_URL = redis
    settings.HERMIT_SENTRY_DSN = f"https://key:{password}@sentry.internal/1"
    settings.HERMIT_UPSTREAMS = {"spare": {"LOCATION": redis}}  # a URL under a harmless name
    request = rf.get("/sandbox/ui/x", HTTP_X_UPSTREAM=dsn)
    for page in _error_pages(request, dsn):
        assert password not in page
        assert "hermit:********************@db.internal" in page  # the rest is still shown
        assert "DATABASE_URL" in page


def test_the_in_memory_backend_is_refused_in_production(tmp_path: Path) -> None:
    """SANDBOX_BACKEND=fake runs `exec` as a host process: settings refuse it without DEBUG."""
    result = _manage("check", **_production(tmp_path), SANDBOX_BACKEND="fake")
    assert result.returncode != 0
    assert "SANDBOX_BACKEND=fake is for tests only" in result.stderr
    assert _manage("check", **_production(tmp_path)).returncode == 0

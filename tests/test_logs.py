"""Logs: one JSON line per event with LOG_FORMAT=json, and no secret ever reaches the output, in
either format, whether in a message, an extra or an exception's traceback (also a failing
request's, and the error mail it sends)."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path

from ai_gateway.credentials import KEY_PREFIX
from portal.lib.logs import RedactFilter, logging_config
from portal.lib.redact import MASK

ROOT = Path(__file__).resolve().parent.parent
Configure = Callable[[str], io.StringIO]
LOGGERS = ("", "django", "django.server", "django.request", "httpx", "httpcore")


def _gateway_token() -> str:
    while True:  # Sandbox.gateway_token: token_urlsafe(32), with upper case and a digit
        token = secrets.token_urlsafe(32)
        if any(c.isupper() for c in token) and any(c.isdigit() for c in token):
            return token


@pytest.fixture
def leaks() -> dict[str, str]:
    """One of each secret the issue names, fresh for each test."""
    return {
        "provider key": "sk-ant-api03-" + secrets.token_urlsafe(60),
        "gateway token": _gateway_token(),
        "AI credential": KEY_PREFIX + secrets.token_urlsafe(32),
        "session cookie": secrets.token_hex(16),
    }


@pytest.fixture
def configure_logs() -> Iterator[Configure]:
    """Configure logging as settings.LOGGING does for a format, the console going to a buffer;
    the loggers' handlers are put back afterwards."""
    saved = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate)

    def configure(log_format: str) -> io.StringIO:
        buffer = io.StringIO()
        config = logging_config(log_format, "INFO")
        config["handlers"]["console"]["stream"] = buffer
        logging.config.dictConfig(config)
        return buffer

    yield configure
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _assert_clean(output: str, leaks: dict[str, str]) -> None:
    for kind, secret in leaks.items():
        assert secret not in output, f"the {kind} reached the log:\n{output}"
    assert MASK in output


def test_it_writes_one_json_line_per_event_with_its_extras(configure_logs: Configure) -> None:
    out = configure_logs("json")
    log = logging.getLogger("sandboxes.test")
    log.info("woke %s in %d ms", "alice/default", 120, extra={"sandbox": 7, "stage": "dozing"})
    log.warning("slow", extra={"sizes": [1, 2], "path": Path("/tmp/x")})

    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "woke alice/default in 120 ms"
    assert (first["level"], first["logger"]) == ("INFO", "sandboxes.test")
    assert (first["sandbox"], first["stage"]) == (7, "dozing")
    assert first["time"].endswith("Z") and first["time"][:2] == "20"
    assert (second["level"], second["sizes"], second["path"]) == ("WARNING", [1, 2], "/tmp/x")


def test_it_writes_an_exception_as_one_string_field(configure_logs: Configure) -> None:
    out = configure_logs("json")
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("sandboxes.test").exception("start failed")

    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in entry["exc_info"]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_it_keeps_secrets_out_of_messages_extras_and_tracebacks(
    configure_logs: Configure, leaks: dict[str, str], log_format: str
) -> None:
    out = configure_logs(log_format)
    log = logging.getLogger("ai_gateway.test")
    log.info("upstream key %s", leaks["provider key"])
    log.info("config", extra={"env": {"OPENCLAW_GATEWAY_TOKEN": leaks["gateway token"]}})
    log.info("headers %s", {"Cookie": f"sessionid={leaks['session cookie']}"})
    log.warning("refused", extra={"key": leaks["AI credential"]})
    try:
        token = leaks["gateway token"]
        raise RuntimeError(
            f"gateway refused {token} for {leaks['AI credential']} "
            f"(upstream {leaks['provider key']}, cookie sessionid={leaks['session cookie']})"
        )
    except RuntimeError:
        log.exception("chat relay failed")

    output = out.getvalue()
    _assert_clean(output, leaks)
    assert "Traceback (most recent call last)" in output
    assert f"RuntimeError: gateway refused {MASK} for {KEY_PREFIX}{MASK}" in output


def _boom(request: HttpRequest) -> HttpResponse:
    # A handler that puts what it received in its error, as careless code does.
    raise RuntimeError(f"could not serve {dict(request.headers)} with {os.environ['LEAK_KEY']}")


urlpatterns = [path("boom/", _boom)]


@pytest.mark.urls("tests.test_logs")
@pytest.mark.django_db
def test_it_keeps_a_failing_requests_secrets_out_of_the_log_and_the_error_mail(
    configure_logs: Configure, leaks: dict[str, str], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.DEBUG = False  # the error mail goes out only then
    settings.ADMINS = [("Ops", "ops@example.com")]
    monkeypatch.setenv("LEAK_KEY", leaks["provider key"])
    out = configure_logs("json")
    client = Client(raise_request_exception=False)
    client.cookies[settings.SESSION_COOKIE_NAME] = leaks["session cookie"]

    response = client.get(
        f"/boom/?token={leaks['gateway token']}",
        headers={"Authorization": f"Bearer {leaks['AI credential']}"},
    )

    assert response.status_code == 500
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    (error,) = [e for e in entries if e["logger"] == "django.request"]
    assert error["message"] == "Internal Server Error: /boom/"
    assert error["status_code"] == 500
    assert "RuntimeError: could not serve" in error["exc_info"]
    _assert_clean(out.getvalue(), leaks)
    (email,) = mail.outbox
    assert "RuntimeError" in email.body
    _assert_clean(f"{email.subject}{email.body}{email.alternatives}", leaks)  # type: ignore[attr-defined]


def test_it_writes_json_lines_from_settings_with_log_format_json(leaks: dict[str, str]) -> None:
    code = (
        "import logging, sys; "
        "logging.getLogger('sandboxes').error('key %s', sys.argv[-1]); "
        "logging.getLogger('sandboxes').info('done')"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}", leaks["provider key"]],
        cwd=ROOT,
        env={**os.environ, "LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "portal.settings_dev"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["level"], e["message"]) for e in lines] == [
        ("ERROR", f"key sk-ant-{MASK}"),
        ("INFO", "done"),
    ]


def test_it_refuses_an_unknown_log_format() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT must be one of text, json"):
        logging_config("xml", "INFO")


def test_it_makes_celery_workers_log_through_settings(configure_logs: Configure) -> None:
    from celery.app.log import Logging

    from portal.celery import app

    configure_logs("text")  # only to have the loggers put back afterwards
    before = (app.log.already_setup, Logging._setup)
    app.log.already_setup = False
    try:
        app.log.setup_logging_subsystem(loglevel="INFO")  # as a worker or beat does at start
        handlers = logging.getLogger().handlers
        assert [type(h) for h in handlers] == [logging.StreamHandler]
        assert any(isinstance(f, RedactFilter) for f in handlers[0].filters)
    finally:
        app.log.already_setup, Logging._setup = before

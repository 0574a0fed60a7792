"""Shared test setup: named users, and every module in tests/fixtures/ loaded as a plugin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.fixture(scope="session", autouse=True)
def celery_queue() -> str:
    """A Celery queue of this test run's own, so workers of other runs never take its tasks."""
    from portal.celery import app

    queue = f"hermit-test-{os.getpid()}"
    app.conf.task_default_queue = queue
    return queue


@pytest.fixture(autouse=True)
def _no_auto_provision(settings):  # noqa: ANN001, ANN202
    """Sign-ups in tests do not start real gateways unless a test asks for it."""
    settings.HERMIT_AUTO_PROVISION = False


@pytest.fixture(autouse=True)
def _private_cache(settings):  # noqa: ANN001, ANN202
    """Each test gets an empty in-process cache, so rate limits never leak between tests."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def alice(db: None):  # noqa: ANN201
    from tests.factories import make_user

    return make_user("alice@example.com")


@pytest.fixture
def bob(db: None):  # noqa: ANN201
    from tests.factories import make_user

    return make_user("bob@example.com")


@pytest.fixture
def staff(db: None):  # noqa: ANN201
    from tests.factories import make_user

    return make_user("staff@example.com", is_staff=True, is_superuser=True)

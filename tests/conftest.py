"""Shared test setup: named users, and every module in tests/fixtures/ loaded as a plugin."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import host_namespace  # noqa: F401  (a fixture: a second machine)

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


@pytest.fixture(scope="session", autouse=True)
def sandbox_dirs() -> Iterator[dict[str, str]]:
    """Give this test run its own sandbox data dir, cgroup parent and uid range, so it never
    meets a portal or another test run on the same machine; the runtime build is shared.

    Returns the settings as environment variables, for servers that tests start."""
    from django.conf import settings

    from sandboxes.backends import get_backend

    run = f"t{os.getpid()}"
    data_dir = Path(settings.HERMIT_DATA_DIR) / "test-runs" / run
    data_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "HERMIT_RUNTIME_DIR": str(settings.HERMIT_RUNTIME_DIR),
        "HERMIT_DATA_DIR": str(data_dir),
        "HERMIT_CGROUP_PARENT": f"hermit-{run}",
        "HERMIT_UID_BASE": str(300_000 + (os.getpid() % 1000) * 1000),
        "HERMIT_CHECKPOINT_DIR": str(data_dir / "checkpoints"),
        # No warm pool unless a test asks for one: a pooled gateway costs a cold boot.
        "HERMIT_WARM_POOL_SIZE": "0",
        # Without Redis the broker is a folder: servers must use this process's folder.
        "HERMIT_CELERY_BROKER_DIR": str(settings.CELERY_BROKER_DIR),
    }
    for name, value in values.items():
        if name != "HERMIT_CELERY_BROKER_DIR":
            numeric = name in ("HERMIT_UID_BASE", "HERMIT_WARM_POOL_SIZE")
            setattr(settings, name, int(value) if numeric else value)
    settings.HERMIT_DATA_DIR = data_dir
    get_backend.cache_clear()
    yield values
    from tests.fixtures.runtime import remove_cgroup_parent

    # Pooled gateways are stopped by then; this ends any a failed test left behind.
    remove_cgroup_parent(Path("/sys/fs/cgroup"), values["HERMIT_CGROUP_PARENT"])
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _quick_password_hashing() -> None:
    """Hash the tests' passwords with few PBKDF2 iterations (tests.factories explains why),
    in place of Django's own PBKDF2 hasher; it checks hashes of any iteration count, and the
    other production hashers stay, so every stored hash still checks."""
    from django.conf import settings
    from django.test.signals import setting_changed

    standard = "django.contrib.auth.hashers.PBKDF2PasswordHasher"
    assert settings.PASSWORD_HASHERS[0] == standard, settings.PASSWORD_HASHERS
    hashers = ["tests.factories.QuickPBKDF2PasswordHasher", *settings.PASSWORD_HASHERS[1:]]
    settings.PASSWORD_HASHERS = hashers
    setting_changed.send(None, setting="PASSWORD_HASHERS", value=hashers, enter=True)


@pytest.fixture(scope="session", autouse=True)
def _flush_by_delete() -> Iterator[None]:
    """Empty the tables after each transactional test with DELETE rather than TRUNCATE.

    On PostgreSQL a TRUNCATE of the ~35 tables gives each table and index a new file: ~0.5 s,
    after each of the ~100 transactional tests. The tables are small, and DELETE empties them
    in milliseconds. It first takes the lock TRUNCATE takes, so it waits, as TRUNCATE does, for
    whatever a server or thread of the test still writes; foreign keys are checked at commit
    (Django makes them deferrable). Flushes that reset sequences or cascade still TRUNCATE."""
    from django.db import connection

    if connection.vendor != "postgresql":
        yield
        return
    ops = type(connection.ops)
    truncate = ops.sql_flush

    def sql_flush(
        self: Any, style: Any, tables: list[str], *, reset_sequences: bool = False,
        allow_cascade: bool = False,
    ) -> list[str]:  # fmt: skip
        if reset_sequences or allow_cascade or not tables:
            return truncate(
                self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade
            )
        names = [style.SQL_FIELD(self.quote_name(table)) for table in tables]
        lock = f"LOCK TABLE {', '.join(names)} IN ACCESS EXCLUSIVE MODE;"
        return [lock, *(f"DELETE FROM {name};" for name in names)]

    ops.sql_flush = sql_flush  # type: ignore[method-assign,assignment]
    yield
    ops.sql_flush = truncate  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_auto_provision(settings):
    """Sign-ups in tests do not start real gateways unless a test asks for it."""
    settings.HERMIT_AUTO_PROVISION = False


@pytest.fixture(autouse=True)
def _private_cache(settings):
    """Each test gets an empty in-process cache, so rate limits never leak between tests."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def alice(db: None):
    from tests.factories import make_user

    return make_user("alice@example.com")


@pytest.fixture
def bob(db: None):
    from tests.factories import make_user

    return make_user("bob@example.com")


@pytest.fixture
def staff(db: None):
    """A superuser with TOTP: ``client.force_login(staff)`` opens the admin."""
    from tests.factories import make_user
    from tests.mfa import enroll_totp

    user = make_user("staff@example.com", is_staff=True, is_superuser=True)
    enroll_totp(user)
    return user


@pytest.fixture
def client():
    """Django's test client, whose force_login also passes a TOTP step for users who have
    TOTP (the admin requires it), as a real login through allauth would."""
    from tests.mfa import MfaClient

    return MfaClient()


@pytest.fixture(scope="session", autouse=True)
def _close_stray_connections(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Servers and threads of the tests may still hold connections to the test database when
    the session ends; end them so the database can be dropped."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

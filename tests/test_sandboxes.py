"""Sandboxes end to end: provisioning through a real Celery worker, supervision and repair by
reconcile, re-attachment after a worker restart, clear failures, and the ops CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from allauth.account.models import EmailAddress
from allauth.account.signals import email_confirmed
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from sandboxes import actions, tasks
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox
from tests.factories import make_user
from tests.fixtures.live import Server

pytestmark = pytest.mark.django_db(transaction=True)
State = Sandbox.State


def _wait_state(sandbox: Sandbox, states: set[str], timeout: float) -> Sandbox:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sandbox.refresh_from_db()
        if sandbox.state in states:
            return sandbox
        time.sleep(0.3)
    raise AssertionError(
        f"sandbox stayed {sandbox.state}; events: "
        f"{list(sandbox.events.values_list('message', flat=True)[:10])}"
    )


def _wait_output(server: Server, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.output():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.output()[-3000:]}"
        time.sleep(0.1)


def _poll(sandbox: Sandbox) -> Any:
    return get_backend(sandbox.backend).poll(actions.spec_for(sandbox), sandbox.backend_state)


def test_it_provisions_on_confirmation_and_survives_a_worker_restart(
    sandbox_pool: Any,
    transactional_db: None,
    start_server: Callable[..., Server],
    settings: Any,
    initialized_repository: Callable[[Sandbox], Any],
) -> None:
    settings.HERMIT_AUTO_PROVISION = True
    sandbox_pool.restore_shared()
    worker = start_server("celery", name="worker-1")
    user = make_user("celery@agents.test")
    address = EmailAddress.objects.get(user=user)
    with transaction.atomic():  # the task is enqueued when the confirmation commits
        email_confirmed.send(sender=EmailAddress, request=None, email_address=address)
    sandbox = _wait_state(Sandbox.objects.get(owner=user), {State.RUNNING, State.FAILED}, 120)
    assert sandbox.state == State.RUNNING, sandbox.error_message + worker.output()[-2000:]

    def progress_now() -> list[int | None]:
        events = sandbox.events.order_by("created_at", "id").exclude(progress=None)
        return list(events.values_list("progress", flat=True))

    # The state is committed just before its event: give the worker a moment to write it.
    deadline = time.monotonic() + 5
    while (progress := progress_now())[-1] != 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert progress[-1] == 100 and len(progress) >= 4
    assert progress == sorted(progress), progress
    main_pid = sandbox.backend_state["main"][0]

    # Kill the worker hard; a new worker sees the same sandbox and leaves it alone.
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    assert _poll(sandbox).running
    worker = start_server("celery", name="worker-2")
    try:
        _wait_output(worker, "ready.", 60)  # the only worker on this run's queue
        reconcile = tasks.reconcile_sandboxes.delay()
        _wait_output(worker, f"reconcile_sandboxes[{reconcile.id}] succeeded", 60)
        # The stop queues a backup, which this worker runs before it shuts down: into a copy
        # of an initialised repository, not one it first sets up with ``restic init`` (~3 s).
        initialized_repository(sandbox)
        tasks.stop_sandbox.delay(sandbox.pk)
        sandbox = _wait_state(sandbox, {State.STOPPED}, 60)
    finally:
        worker.stop()  # it would run the tasks later tests queue (backups after each stop)
    assert not sandbox.events.filter(kind="crashed").exists()
    assert not os.path.exists(f"/proc/{main_pid}")


def test_it_restarts_a_crashed_gateway_on_reconcile(sandbox_for: Callable[..., Sandbox]) -> None:
    sandbox = sandbox_for("pro@agents.test", plan="pro")
    idle_since = timezone.now() - timedelta(hours=1)
    Sandbox.objects.filter(pk=sandbox.pk).update(last_activity_at=idle_since)
    old_main = sandbox.backend_state["main"][0]
    os.kill(old_main, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _poll(sandbox).running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _poll(sandbox).running

    counts = tasks.reconcile_sandboxes()
    assert counts.get("restarted") == 1, counts
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
    assert _poll(sandbox).running
    assert sandbox.backend_state["main"][0] != old_main
    crash = sandbox.events.get(kind="crashed")
    assert "restarting" in crash.message
    assert sandbox.last_activity_at == idle_since  # a crash restart is not activity
    assert tasks.reconcile_sandboxes().get("ok", 0) >= 1


def test_it_stops_a_gateway_that_should_be_asleep(sandbox_for: Callable[..., Sandbox]) -> None:
    # Any running free sandbox will do: the chat and Control UI tests' one, which no test after
    # this module needs running, so stopping it here costs the pool no start.
    sandbox = sandbox_for("alice@chat.test")
    Sandbox.objects.filter(pk=sandbox.pk).update(state=State.SLEEPING)
    sandbox.refresh_from_db()
    assert actions.reconcile_sandbox(sandbox) == "stopped-stray"
    assert not _poll(sandbox).running
    assert sandbox.events.filter(kind="reconciled").exists()


def test_it_fails_clearly_when_bubblewrap_is_missing(sandbox_pool: Any, settings: Any) -> None:
    sandbox_pool.restore_shared()  # plans and the built runtime first, then the user
    alice = make_user("alice@example.com")
    settings.HERMIT_BWRAP = "/nonexistent/bwrap"
    get_backend.cache_clear()
    try:
        sandbox = Sandbox.objects.get(owner=alice)
        steps = list(actions.start_sandbox(sandbox))
    finally:
        get_backend.cache_clear()
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED
    assert "bubblewrap" in sandbox.error_message.lower()
    assert "failed" in steps[-1].message.lower()
    assert not sandbox.backend_state.get("main")


def test_it_fails_clearly_when_the_runtime_is_not_built(alice: Any) -> None:
    sandbox = Sandbox.objects.get(owner=alice)
    steps = list(actions.start_sandbox(sandbox))
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED
    assert "build_runtime" in sandbox.error_message
    assert "build_runtime" in steps[-1].message


def test_the_ops_cli_reports_and_runs_commands(sandbox_for: Callable[..., Sandbox]) -> None:
    sandbox = sandbox_for("ops@agents.test")
    out = StringIO()
    call_command("sandbox", "list", stdout=out)
    assert "ops@agents.test" in out.getvalue()
    out = StringIO()
    call_command("sandbox", "status", "ops@agents.test", stdout=out)
    status = json.loads(out.getvalue())
    assert status["state"] == "running" and status["backend"]["running"]
    assert status["stats"]["memory_bytes"] > 50_000_000
    out = StringIO()
    call_command("sandbox", "exec", "ops@agents.test", "--", "id", "-u", stdout=out)
    assert out.getvalue().strip() != "0"
    out = StringIO()
    call_command("sandbox", "logs", "ops@agents.test", "--lines", "50", stdout=out)
    assert out.getvalue().strip()
    assert sandbox.state == State.RUNNING


def test_it_wakes_an_always_on_sandbox_found_asleep(sandbox_for: Callable[..., Sandbox]) -> None:
    """After the host shut down (make run's Ctrl-C puts agents to sleep), pro agents come back."""
    sandbox = sandbox_for("pro@agents.test", plan="pro")
    actions.sleep_sandbox(sandbox)
    assert sandbox.state == State.SLEEPING and not _poll(sandbox).running
    assert tasks.reconcile_sandboxes().get("woke") == 1
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and _poll(sandbox).running
    assert sandbox.events.filter(kind="reconciled", message__contains="Always-on").exists()


def test_the_ops_cli_puts_every_running_sandbox_to_sleep(
    sandbox_for: Callable[..., Sandbox],
) -> None:
    sandbox = sandbox_for("ops@agents.test")
    call_command("sandbox", "sleep", "--all", stdout=StringIO())
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING and not _poll(sandbox).running


def test_it_retries_a_failed_always_on_sandbox_after_a_pause(
    sandbox_for: Callable[..., Sandbox],
) -> None:
    sandbox = sandbox_for("pro@agents.test", plan="pro")
    get_backend(sandbox.backend).stop(actions.spec_for(sandbox), sandbox.backend_state)
    # Just failed (a queryset update leaves updated_at alone, and the pooled gateway may have
    # started longer ago than the pause on a busy machine).
    Sandbox.objects.filter(pk=sandbox.pk).update(state=State.FAILED, updated_at=timezone.now())
    sandbox.refresh_from_db()
    assert actions.reconcile_sandbox(sandbox) != "retried"  # just failed: not yet
    Sandbox.objects.filter(pk=sandbox.pk).update(
        updated_at=timezone.now() - actions.FAILED_RETRY_AFTER
    )
    sandbox.refresh_from_db()
    assert actions.reconcile_sandbox(sandbox) == "retried"
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and _poll(sandbox).running


@pytest.fixture
def eager_tasks() -> Any:
    """Celery tasks run in the caller, at once (no worker)."""
    from portal.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def test_a_superuser_made_on_the_command_line_gets_a_sandbox_on_sign_in(
    settings: Any, monkeypatch: pytest.MonkeyPatch, eager_tasks: None
) -> None:
    """createsuperuser has no email confirmation: signing in asks for the first start, so the
    dashboard never shows "provisioning" forever."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    settings.HERMIT_AUTO_PROVISION = True
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "correct horse battery staple")
    call_command(
        "createsuperuser", "--noinput", "--username", "root", "--email", "root@example.com"
    )
    root = get_user_model().objects.get(username="root")
    sandbox = Sandbox.objects.get(owner=root)
    assert sandbox.state == State.PROVISIONING
    assert not EmailAddress.objects.filter(user=root, verified=True).exists()

    Client().force_login(root)
    sandbox.refresh_from_db()
    # The start ran (and failed: no runtime is built in this test): no longer provisioning.
    assert sandbox.state == State.FAILED and "build_runtime" in sandbox.error_message
    kinds = list(sandbox.events.order_by("id").values_list("kind", "state"))
    assert ("queued", State.PROVISIONING) in kinds and ("state", State.STARTING) in kinds


def test_signing_in_provisions_only_accounts_that_may_have_a_sandbox(
    settings: Any, eager_tasks: None
) -> None:
    from django.test import Client

    settings.HERMIT_AUTO_PROVISION = True
    settings.ACCOUNT_EMAIL_VERIFICATION = "mandatory"
    unverified = make_user("unverified@example.com")
    EmailAddress.objects.filter(user=unverified).update(verified=False)
    verified = make_user("verified@example.com")
    for user in (unverified, verified):
        Client().force_login(user)
    assert Sandbox.objects.get(owner=unverified).state == State.PROVISIONING
    assert not Sandbox.objects.get(owner=unverified).events.filter(kind="queued").exists()
    assert Sandbox.objects.get(owner=verified).state == State.FAILED  # started (no runtime)
    # asked once: signing in again does not queue it again
    Client().force_login(verified)
    assert Sandbox.objects.get(owner=verified).events.filter(kind="queued").count() == 1


def test_reconcile_stops_a_deactivated_users_always_on_sandbox(
    sandbox_for: Callable[..., Sandbox],
) -> None:
    from django.contrib.auth import get_user_model

    sandbox = sandbox_for("pro@agents.test", plan="pro")
    since = timezone.now()
    get_user_model().objects.filter(pk=sandbox.owner_id).update(is_active=False)
    assert tasks.reconcile_sandboxes().get("stopped-inactive") == 1
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED and not _poll(sandbox).running
    # asleep or failed on an always-on plan: still never started again
    for state in (State.SLEEPING, State.FAILED):
        Sandbox.objects.filter(pk=sandbox.pk).update(
            state=state, updated_at=timezone.now() - actions.FAILED_RETRY_AFTER
        )
        assert tasks.reconcile_sandboxes() == {"inactive": 1}
    sandbox.refresh_from_db()
    assert not _poll(sandbox).running
    assert not sandbox.events.filter(
        kind="state", state=State.STARTING, created_at__gte=since
    ).exists()


def test_no_start_path_starts_a_deactivated_users_sandbox(alice: Any) -> None:
    from django.contrib.auth import get_user_model

    sandbox = Sandbox.objects.get(owner=alice)
    get_user_model().objects.filter(pk=alice.pk).update(is_active=False)
    for state in (State.PROVISIONING, State.SLEEPING, State.STOPPED, State.FAILED):
        Sandbox.objects.filter(pk=sandbox.pk).update(state=state)
        sandbox.refresh_from_db()
        with pytest.raises(actions.OwnerInactive):
            list(actions.start_sandbox(sandbox))
        with pytest.raises(BackendError, match="deactivated"):
            list(actions.wake_sandbox(sandbox, timeout=5))
        tasks.start_sandbox(sandbox.pk)
        tasks.provision_sandbox(sandbox.pk)
        tasks.restart_sandbox(sandbox.pk)
        sandbox.refresh_from_db()
        assert sandbox.state in (state, State.STOPPED)  # restart may stop it, never start it
    assert not sandbox.events.filter(kind="state", state=State.STARTING).exists()
    assert not actions.may_provision(alice.__class__.objects.get(pk=alice.pk))

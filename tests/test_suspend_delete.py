"""Staff suspend and unsuspend users and delete accounts from the admin; users delete their
own account from the dashboard. On the in-memory backend (tests/test_admin_e2e.py does both on
a real gateway)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from ai_gateway import credentials, proxy
from sandboxes import actions, tasks
from sandboxes.backends.fake import FakeBackend
from sandboxes.backups import tasks as backup_tasks
from sandboxes.models import AccountDeletion, BackupRepository, Sandbox, Suspension
from tests.factories import PASSWORD, make_user
from tests.fixtures.backend import volume_of

pytestmark = pytest.mark.django_db
State = Sandbox.State
USERS = "admin:auth_user_changelist"


@pytest.fixture
def fake(fake_backend: FakeBackend, settings: Any) -> FakeBackend:
    settings.HERMIT_DELETE_GRACE_DAYS = 14
    return fake_backend


def running(email: str) -> Sandbox:
    sandbox = Sandbox.objects.get(owner=make_user(email))
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    return sandbox


def post_users(client: Client, action: str, users: list[Any], **extra: Any) -> str:
    data = {"action": action, "_selected_action": [u.pk for u in users], **extra}
    return client.post(reverse(USERS), data, follow=True).content.decode()


def run_stops(delay: mock.MagicMock) -> None:
    for call in delay.call_args_list:
        tasks.stop_sandbox.apply(args=call.args).get()


# -- suspend ------------------------------------------------------------------------------------


def test_it_suspends_a_user_stopping_their_agent_and_refusing_its_start_and_key(
    client: Client, staff: Any, fake: FakeBackend, django_capture_on_commit_callbacks: Any
) -> None:
    sandbox = running("alice@example.com")
    alice = sandbox.owner
    key = credentials.rotate_credential(sandbox)
    assert proxy.authorized_owner(key).owner_suspended is False
    client.force_login(staff)
    with mock.patch.object(tasks.stop_sandbox, "delay") as delay:
        page = post_users(client, "suspend", [alice])
        assert 'id="account-action-form"' in page and not Suspension.objects.exists()
        with django_capture_on_commit_callbacks(execute=True):
            page = post_users(client, "suspend", [alice], apply="yes", reason="Spam runs")
    assert "Suspended 1 user(s)" in page
    delay.assert_called_once_with(sandbox.pk)
    suspension = Suspension.objects.get(user=alice)
    assert (suspension.suspended_by, suspension.reason) == (staff, "Spam runs")
    event = sandbox.events.get(kind="suspended")
    assert (event.actor, event.actor_user) == ("staff", staff)
    assert event.message == "Account suspended by staff: Spam runs"
    run_stops(delay)
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED

    with pytest.raises(actions.OwnerSuspended, match=r"suspended.*Reason: Spam runs"):
        for _ in actions.start_sandbox(sandbox, explicit=True):
            pass
    tasks.start_sandbox.apply(args=[sandbox.pk]).get()  # the dashboard's or staff's start
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED
    with pytest.raises(proxy.Refused, match="suspended"):
        proxy.authorized_owner(key)
    assert "suspended" in client.get(reverse(USERS)).content.decode()

    # Unsuspend: the key works again, and the agent may start.
    assert "Lifted the suspension of 1 user(s)." in post_users(client, "unsuspend", [alice])
    assert not Suspension.objects.exists()
    assert sandbox.events.get(kind="unsuspended").actor_user == staff
    assert proxy.authorized_owner(key).owner_suspended is False
    tasks.start_sandbox.apply(args=[sandbox.pk]).get()
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING


def test_it_tells_a_suspended_user_why_on_the_dashboard(
    client: Client, staff: Any, fake: FakeBackend
) -> None:
    alice = make_user("alice@example.com")
    Suspension.objects.create(user=alice, reason="Unpaid invoices", suspended_by=staff)
    client.force_login(alice)
    page = client.get(reverse("dashboard")).content.decode()
    assert "Your account is suspended, so your agent cannot run. Reason: Unpaid invoices" in page
    assert reverse("sandbox-start") not in page  # no start button while suspended


def test_it_stops_a_suspended_users_agent_on_reconcile(fake: FakeBackend, staff: Any) -> None:
    sandbox = running("alice@example.com")
    Suspension.objects.create(user=sandbox.owner, suspended_by=staff)  # the queued stop lost
    assert actions.reconcile_sandbox(sandbox) == "stopped-inactive"
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED


# -- delete (staff) -----------------------------------------------------------------------------


def test_it_deletes_an_account_after_the_grace_period(
    client: Client, staff: Any, fake: FakeBackend, django_capture_on_commit_callbacks: Any
) -> None:
    sandbox = running("alice@example.com")
    alice = sandbox.owner
    (volume_of(sandbox) / "workspace").mkdir(parents=True)
    (volume_of(sandbox) / "workspace" / "notes.md").write_text("mine")
    BackupRepository.objects.create(sandbox=sandbox, location="/backups/sbx-x")
    key = credentials.rotate_credential(sandbox)
    client.force_login(staff)
    with mock.patch.object(tasks.stop_sandbox, "delay") as delay:
        page = post_users(client, "delete_account", [alice])
        assert "after 14 day(s)" in page and not AccountDeletion.objects.exists()
        page = post_users(client, "delete_account", [alice], apply="yes")
        assert "This field is required." in page  # not confirmed
        with django_capture_on_commit_callbacks(execute=True):
            page = post_users(client, "delete_account", [alice], apply="yes", confirm="on")
    assert "Deleted 1 account(s)" in page
    deletion = AccountDeletion.objects.get()
    assert (deletion.user, deletion.requested_by, deletion.email) == (
        alice, staff, "alice@example.com"
    )  # fmt: skip
    assert deletion.purge_after == deletion.requested_at + timedelta(days=14)
    alice.refresh_from_db()
    assert not alice.is_active
    event = sandbox.events.get(kind="deletion-requested")
    assert (event.actor, event.actor_user) == ("staff", staff)
    with pytest.raises(proxy.Refused, match="deactivated"):
        proxy.authorized_owner(key)
    run_stops(delay)
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED

    # Within the grace period nothing is removed.
    assert tasks.purge_deleted_accounts.apply().get() == 0
    assert (volume_of(sandbox) / "workspace" / "notes.md").exists()
    later = timezone.now() + timedelta(days=14, minutes=1)
    with (
        time_machine.travel(later),
        mock.patch.object(backup_tasks.purge_backups, "delay") as purge_backups,
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert tasks.purge_deleted_accounts.apply().get() == 1
        assert tasks.purge_deleted_accounts.apply().get() == 0  # done once
    assert not volume_of(sandbox).exists()
    assert not get_user_model().objects.filter(pk=alice.pk).exists()
    assert not Sandbox.objects.filter(pk=sandbox.pk).exists()
    purge_backups.assert_called_once_with("/backups/sbx-x")
    assert credentials.authenticate(key) is None
    deletion.refresh_from_db()
    assert deletion.user is None and deletion.user_pk == alice.pk
    assert deletion.purged_at is not None and deletion.requested_by == staff


def test_it_cancels_a_deletion_within_the_grace_period(
    client: Client, staff: Any, fake: FakeBackend
) -> None:
    sandbox = running("alice@example.com")
    client.force_login(staff)
    with mock.patch.object(tasks.stop_sandbox, "delay"):
        post_users(client, "delete_account", [sandbox.owner], apply="yes", confirm="on")
    deletion = AccountDeletion.objects.get()
    page = client.post(
        reverse("admin:sandboxes_accountdeletion_changelist"),
        {"action": "cancel", "_selected_action": [deletion.pk]},
        follow=True,
    ).content.decode()
    assert "Cancelled 1 deletion(s)" in page
    assert not AccountDeletion.objects.exists()
    sandbox.owner.refresh_from_db()
    assert sandbox.owner.is_active
    assert sandbox.events.get(kind="deletion-cancelled").actor_user == staff


def test_it_never_deletes_users_outright_in_the_admin(client: Client, staff: Any) -> None:
    alice = make_user("alice@example.com")
    client.force_login(staff)
    listing = client.get(reverse(USERS)).content.decode()
    assert 'value="delete_selected"' not in listing and 'value="delete_account"' in listing
    response = client.get(reverse("admin:auth_user_delete", args=[alice.pk]))
    assert response.status_code == 403
    assert get_user_model().objects.filter(pk=alice.pk).exists()


# -- delete (the user) --------------------------------------------------------------------------


def test_it_lets_a_user_delete_their_own_account_with_their_password(
    client: Client, fake: FakeBackend, django_capture_on_commit_callbacks: Any
) -> None:
    sandbox = running("alice@example.com")
    alice = sandbox.owner
    client.force_login(alice)
    assert reverse("account-delete") in client.get(reverse("dashboard")).content.decode()
    with mock.patch.object(tasks.stop_sandbox, "delay") as delay:
        page = client.post(reverse("account-delete"), {"password": "wrong"}).content.decode()
        assert "That is not your password." in page
        assert not AccountDeletion.objects.exists() and not delay.called
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(reverse("account-delete"), {"password": PASSWORD}, follow=True)
    assert "Your account is deleted." in response.content.decode()
    assert "_auth_user_id" not in client.session
    deletion = AccountDeletion.objects.get()
    assert (deletion.requested_by, deletion.by_owner) == (alice, True)
    event = sandbox.events.get(kind="deletion-requested")
    assert (event.actor, event.actor_user) == ("user", alice)
    run_stops(delay)
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED
    assert not client.login(username="alice", password=PASSWORD)  # deactivated


def test_it_purges_at_once_when_there_is_no_grace_period(
    client: Client, fake: FakeBackend, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.HERMIT_DELETE_GRACE_DAYS = 0
    sandbox = running("alice@example.com")
    client.force_login(sandbox.owner)
    with (
        mock.patch.object(tasks.stop_sandbox, "delay"),
        mock.patch.object(tasks.purge_account, "delay") as purge,
        django_capture_on_commit_callbacks(execute=True),
    ):
        client.post(reverse("account-delete"), {"password": PASSWORD})
    deletion = AccountDeletion.objects.get()
    purge.assert_called_once_with(deletion.pk)
    assert tasks.purge_account.apply(args=[deletion.pk]).get() is True
    assert not Sandbox.objects.filter(pk=sandbox.pk).exists()
    assert ("stop", sandbox.slug) in fake.calls

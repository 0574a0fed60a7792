"""Staff backups in the admin: "Back up now" and "Restore snapshot…" on one or many sandboxes,
each queued as a Celery task and recorded under the staff member's name, only for staff with
the backup / restore permission; the sandbox's page lists its snapshots and the latest backup
or restore step."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from sandboxes.backups import tasks as backup_tasks
from sandboxes.events import record_event
from sandboxes.models import Sandbox, SandboxEvent, Snapshot
from tests.factories import make_user
from tests.mfa import enroll_totp

pytestmark = pytest.mark.django_db
CHANGELIST = "admin:sandboxes_sandbox_changelist"


def make_snapshot(sandbox: Sandbox, *, minutes_ago: int, **fields: Any) -> Snapshot:
    values: dict[str, Any] = {
        "restic_id": f"{sandbox.pk:04x}{minutes_ago:06x}" + "cd" * 27,
        "taken_at": timezone.now() - timedelta(minutes=minutes_ago),
        "size_bytes": 1_000_000,
        **fields,
    }
    return Snapshot.objects.create(sandbox=sandbox, **values)


def staff_with(*codenames: str) -> Any:
    user = make_user("helpdesk@example.com", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    enroll_totp(user)
    return user


@pytest.fixture
def queued() -> Iterator[dict[str, mock.MagicMock]]:
    with (
        mock.patch.object(backup_tasks.backup_sandbox, "delay") as backup,
        mock.patch.object(backup_tasks.restore_sandbox, "delay") as restore,
    ):
        yield {"backup": backup, "restore": restore}


@pytest.fixture
def sandboxes(alice: Any, bob: Any) -> tuple[Sandbox, Sandbox]:
    return Sandbox.objects.get(owner=alice), Sandbox.objects.get(owner=bob)


def post_action(client: Client, action: str, sandboxes: list[Sandbox], **extra: Any) -> Any:
    data = {"action": action, "_selected_action": [s.pk for s in sandboxes], **extra}
    return client.post(reverse(CHANGELIST), data, follow=True)


# -- Back up now --------------------------------------------------------------------------------


def test_it_queues_a_backup_of_each_sandbox_under_the_staff_members_name(
    client: Client, staff: Any, sandboxes: tuple[Sandbox, Sandbox], queued: Any
) -> None:
    client.force_login(staff)
    page = post_action(client, "back_up", list(sandboxes)).content.decode()
    assert "Requested a backup of 2 sandbox(es)." in page
    assert sorted(c.args for c in queued["backup"].call_args_list) == sorted(
        (s.pk, "staff", staff.pk) for s in sandboxes
    )
    for sandbox in sandboxes:
        event = sandbox.events.get(kind="backup-requested")
        assert (event.actor, event.actor_user, event.message) == (
            SandboxEvent.Actor.STAFF,
            staff,
            "Staff requested a backup",
        )


# -- Restore snapshot… --------------------------------------------------------------------------


def test_it_asks_which_snapshot_of_one_sandbox_then_queues_it(
    client: Client, staff: Any, sandboxes: tuple[Sandbox, Sandbox], queued: Any
) -> None:
    alices, bobs = sandboxes
    old = make_snapshot(alices, minutes_ago=600)
    new = make_snapshot(alices, minutes_ago=5)
    bobs_snapshot = make_snapshot(bobs, minutes_ago=7)
    client.force_login(staff)
    page = post_action(client, "restore_snapshot", [alices]).content.decode()
    assert 'id="restore-form"' in page
    assert old.short_id in page and new.short_id in page
    assert bobs_snapshot.short_id not in page  # only this sandbox's snapshots
    assert not queued["restore"].called
    assert not alices.events.filter(kind="restore-requested").exists()

    # Another sandbox's snapshot is not a choice.
    page = post_action(
        client, "restore_snapshot", [alices], apply="yes", snapshot=bobs_snapshot.pk
    ).content.decode()
    assert "Select a valid choice" in page
    assert not queued["restore"].called

    page = post_action(
        client, "restore_snapshot", [alices], apply="yes", snapshot=old.pk
    ).content.decode()
    assert "Requested a restore of 1 sandbox(es)." in page
    queued["restore"].assert_called_once_with(alices.pk, old.pk, staff.pk)
    event = alices.events.get(kind="restore-requested")
    assert (event.actor, event.actor_user) == (SandboxEvent.Actor.STAFF, staff)
    assert old.short_id in event.message


def test_it_restores_the_latest_snapshot_of_many_sandboxes(
    client: Client, staff: Any, sandboxes: tuple[Sandbox, Sandbox], queued: Any
) -> None:
    alices, bobs = sandboxes
    make_snapshot(alices, minutes_ago=120)
    alices_latest = make_snapshot(alices, minutes_ago=10)
    bobs_latest = make_snapshot(bobs, minutes_ago=30)
    client.force_login(staff)
    page = post_action(client, "restore_snapshot", list(sandboxes)).content.decode()
    assert "The latest snapshot of each" in page
    post_action(client, "restore_snapshot", list(sandboxes), apply="yes", which="latest")
    assert sorted(c.args for c in queued["restore"].call_args_list) == sorted(
        [(alices.pk, alices_latest.pk, staff.pk), (bobs.pk, bobs_latest.pk, staff.pk)]
    )


def test_it_restores_the_latest_at_or_before_a_time_and_names_sandboxes_without_one(
    client: Client, staff: Any, sandboxes: tuple[Sandbox, Sandbox], queued: Any
) -> None:
    alices, bobs = sandboxes
    before = make_snapshot(alices, minutes_ago=180)
    make_snapshot(alices, minutes_ago=10)
    make_snapshot(bobs, minutes_ago=30)  # after the time: bob has none at or before it
    at = timezone.localtime(timezone.now() - timedelta(hours=1))
    client.force_login(staff)
    page = post_action(
        client,
        "restore_snapshot",
        list(sandboxes),
        apply="yes",
        which="at",
        at=at.strftime("%Y-%m-%dT%H:%M:%S"),
    ).content.decode()
    queued["restore"].assert_called_once_with(alices.pk, before.pk, staff.pk)
    assert "Requested a restore of 1 sandbox(es)." in page
    assert f"No snapshot to restore, left alone: {bobs}." in page
    assert not bobs.events.filter(kind="restore-requested").exists()


def test_it_wants_the_time_when_asked_for_a_point_in_time(
    client: Client, staff: Any, sandboxes: tuple[Sandbox, Sandbox], queued: Any
) -> None:
    make_snapshot(sandboxes[0], minutes_ago=10)
    client.force_login(staff)
    page = post_action(client, "restore_snapshot", list(sandboxes), apply="yes", which="at")
    assert "Give the date and time." in page.content.decode()
    assert not queued["restore"].called


# -- permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "perms",
    [
        ["view_sandbox"],
        ["view_sandbox", "backup_sandbox"],
        ["view_sandbox", "restore_sandbox"],
        ["view_sandbox", "backup_sandbox", "restore_sandbox"],
    ],
)
def test_it_offers_each_action_only_with_its_permission(
    client: Client, sandboxes: tuple[Sandbox, Sandbox], queued: Any, perms: list[str]
) -> None:
    alices, _ = sandboxes
    snapshot = make_snapshot(alices, minutes_ago=10)
    client.force_login(staff_with(*perms))
    can_back_up, can_restore = "backup_sandbox" in perms, "restore_sandbox" in perms
    page = client.get(reverse(CHANGELIST)).content.decode()
    assert ('value="back_up"' in page) is can_back_up
    assert ('value="restore_snapshot"' in page) is can_restore
    post_action(client, "back_up", [alices])
    post_action(client, "restore_snapshot", [alices], apply="yes", snapshot=snapshot.pk)
    assert queued["backup"].called is can_back_up
    assert queued["restore"].called is can_restore
    assert alices.events.filter(kind="backup-requested").exists() is can_back_up
    assert alices.events.filter(kind="restore-requested").exists() is can_restore


def test_it_keeps_non_staff_out(client: Client, alice: Any, queued: Any) -> None:
    sandbox = Sandbox.objects.get(owner=alice)
    client.force_login(alice)
    response = client.post(
        reverse(CHANGELIST), {"action": "back_up", "_selected_action": [sandbox.pk]}
    )
    assert response.status_code == 302
    assert not queued["backup"].called


# -- the sandbox's page -------------------------------------------------------------------------


def test_it_lists_the_snapshots_and_the_latest_progress_on_the_sandbox_page(
    client: Client, staff: Any, sandboxes: tuple[Sandbox, Sandbox]
) -> None:
    alices, bobs = sandboxes
    mine = [make_snapshot(alices, minutes_ago=m, trigger="user") for m in (5, 65)]
    theirs = make_snapshot(bobs, minutes_ago=5)
    record_event(alices, "backup-requested", "Staff requested a backup",
                 actor=SandboxEvent.Actor.STAFF, actor_user=staff)  # fmt: skip
    record_event(alices, "backup", "Reading the data dir", progress=40)
    client.force_login(staff)
    page = client.get(reverse("admin:sandboxes_sandbox_change", args=[alices.pk])).content
    html = page.decode()
    for snapshot in mine:
        assert snapshot.short_id in html
    assert theirs.short_id not in html
    assert "976.6\xa0KB" in html  # sizes, human-readable
    assert '<progress max="100" value="40"></progress> 40% · Reading the data dir' in html
    assert "Last backup: never" in html


# -- end to end: the real restic engine, the task run in the test -------------------------------


@pytest.mark.django_db(transaction=True)  # the backup's lease is renewed from another thread
def test_it_backs_up_for_real_under_the_staff_members_name(
    client: Client, staff: Any, data_sandbox: Any, eager_backups: None
) -> None:
    sandbox = data_sandbox("carol@example.com", repository=True)
    client.force_login(staff)
    post_action(client, "back_up", [sandbox])
    snapshot = sandbox.snapshots.get()
    assert (snapshot.trigger, snapshot.actor_user) == (Snapshot.Trigger.STAFF, staff)
    done = sandbox.events.get(kind="backup", progress=100)
    assert (done.actor, done.actor_user) == (SandboxEvent.Actor.STAFF, staff)
    html = client.get(reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk])).content
    page = html.decode()
    assert snapshot.short_id in page
    assert f'<progress max="100" value="100"></progress> 100% · {done.message}' in page
    assert "Last backup: never" not in page and "Lease: free" in page

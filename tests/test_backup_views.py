"""The owner's backup pages: "Back up now" and its refusals, the snapshot list, restore with a
confirmation, "Download my agent", and tenancy: alice's snapshot and export ids are a 404 for
bob on every URL and in the JSON, as ids that do not exist are.

The end-to-end tests back up a stopped sandbox's data dir with the real restic engine into a
local repository, through the Celery tasks the buttons queue (run here in the test process)."""

from __future__ import annotations

import asyncio
import copy
import io
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import time_machine
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from portal.asgi import application
from sandboxes.backends.fake import FakeBackend
from sandboxes.backups import tasks as backup_tasks
from sandboxes.backups.storage import export_storage
from sandboxes.events import record_event
from sandboxes.models import BackupRepository, Export, Sandbox, SandboxEvent, Snapshot
from tests.factories import make_user
from tests.fixtures.backend import running_fake_sandbox, volume_of
from tests.fixtures.backups import sh, write_files

pytestmark = pytest.mark.django_db(transaction=True)
State = Sandbox.State


# -- helpers ------------------------------------------------------------------------------------


def sandbox_of(user: Any, state: str = State.STOPPED) -> Sandbox:
    sandbox = Sandbox.objects.select_related("owner").get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=state)
    sandbox.refresh_from_db()
    return sandbox


def make_snapshot(sandbox: Sandbox, *, minutes_ago: int = 5, **fields: Any) -> Snapshot:
    taken = timezone.now() - timedelta(minutes=minutes_ago)
    values: dict[str, Any] = {
        "restic_id": f"{sandbox.pk:04x}{minutes_ago:04x}" + "ab" * 28,
        "taken_at": taken,
        "trigger": Snapshot.Trigger.SCHEDULE,
        "files": 12,
        "size_bytes": 3_500_000,
        "added_bytes": 20_000,
        **fields,
    }
    return Snapshot.objects.create(sandbox=sandbox, **values)


def make_export(sandbox: Sandbox, snapshot: Snapshot, *, ttl: timedelta, content: bytes) -> Export:
    """A ready export whose archive is stored in the export storage."""
    name = export_storage().save(f"sbx-{sandbox.pk}/test-export.tar", ContentFile(content))
    return Export.objects.create(
        sandbox=sandbox,
        snapshot=snapshot,
        storage_name=name,
        state=Export.State.READY,
        expires_at=timezone.now() + ttl,
        size_bytes=len(content),
    )


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def with_data() -> Iterator[Callable[[Sandbox, dict[str, str | bytes]], None]]:
    """Return ``give(sandbox, files)``: a data dir holding ``files``, owned by the sandbox's
    uid as a start leaves it; removed after the test."""
    made: list[Path] = []

    def give(sandbox: Sandbox, files: dict[str, str | bytes]) -> None:
        write_files(volume_of(sandbox), files)
        made.append(volume_of(sandbox))

    yield give
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


def archive_members(data: bytes) -> dict[str, bytes]:
    """The regular files of a (gzipped) tar, by name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


@pytest.fixture
def queued() -> Iterator[dict[str, mock.MagicMock]]:
    """Catch the tasks the views queue (their ``delay``), to look at and run them here."""
    with (
        mock.patch.object(backup_tasks.backup_sandbox, "delay") as backup,
        mock.patch.object(backup_tasks.restore_sandbox, "delay") as restore,
        mock.patch.object(backup_tasks.export_snapshot, "delay") as export,
    ):
        yield {"backup": backup, "restore": restore, "export": export}


@pytest.fixture
def charlie(db: None) -> Any:
    """A signed-up user with no sandbox at all."""
    user = make_user("charlie@example.com")
    Sandbox.objects.filter(owner=user).delete()
    return user


def signed_in(client: Client, user: Any) -> Client:
    client.force_login(user)
    return client


def alices_things(alice: Any) -> tuple[Sandbox, Snapshot, Export]:
    sandbox = sandbox_of(alice)
    snapshot = make_snapshot(sandbox, restic_id="a11ce" + "0" * 59)
    export = make_export(sandbox, snapshot, ttl=timedelta(hours=1), content=tar_of({"a": b"x"}))
    return sandbox, snapshot, export


# -- tenancy ------------------------------------------------------------------------------------


def test_it_gives_bob_a_404_for_each_of_alices_ids_on_every_url(
    client: Client, alice: Any, bob: Any, queued: dict[str, mock.MagicMock]
) -> None:
    _, snapshot, export = alices_things(alice)
    bobs = sandbox_of(bob)
    signed_in(client, bob)
    restore = reverse("backup-restore", args=[snapshot.pk])
    download = reverse("export-download", args=[export.pk])
    assert client.get(restore).status_code == 404
    assert client.post(restore).status_code == 404
    assert client.get(download).status_code == 404
    # The same answer as for ids that exist nowhere.
    assert client.get(reverse("backup-restore", args=[snapshot.pk + 1000])).status_code == 404
    assert client.get(reverse("export-download", args=[export.pk + 1000])).status_code == 404
    assert not any(task.called for task in queued.values())
    assert not bobs.events.filter(kind__endswith="-requested").exists()
    assert not Sandbox.objects.get(owner=alice).events.filter(kind__endswith="-requested").exists()


def test_it_lists_only_the_users_own_snapshots_and_exports(
    client: Client, alice: Any, bob: Any
) -> None:
    _, snapshot, export = alices_things(alice)
    bobs_snapshot = make_snapshot(sandbox_of(bob), restic_id="b0b" + "1" * 61)
    signed_in(client, bob)
    alices_url = reverse("backup-restore", args=[snapshot.pk])
    for page in (reverse("dashboard"), reverse("backups-card")):
        html = client.get(page).content.decode()
        assert reverse("backup-restore", args=[bobs_snapshot.pk]) in html
        assert alices_url not in html
        assert reverse("export-download", args=[export.pk]) not in html
    data = client.get(reverse("backups-json")).json()
    assert [s["id"] for s in data["snapshots"]] == [bobs_snapshot.pk]
    assert data["exports"] == []
    signed_in(client, alice)
    data = client.get(reverse("backups-json")).json()
    assert [s["id"] for s in data["snapshots"]] == [snapshot.pk]
    assert [e["id"] for e in data["exports"]] == [export.pk]
    assert data["exports"][0]["download_url"] == reverse("export-download", args=[export.pk])


def test_it_queues_bobs_backup_and_export_only_for_bobs_sandbox(
    client: Client, alice: Any, bob: Any, queued: dict[str, mock.MagicMock]
) -> None:
    alices_things(alice)
    bobs = sandbox_of(bob)
    make_snapshot(bobs)
    signed_in(client, bob)
    client.post(reverse("backup-now"))
    client.post(reverse("export-request"))
    queued["backup"].assert_called_once_with(bobs.pk, "user", bob.pk)
    queued["export"].assert_called_once_with(bobs.pk, None, bob.pk)


@pytest.mark.parametrize(
    ("name", "method", "args"),
    [
        ("backup-now", "post", []),
        ("backup-restore", "get", [1]),
        ("backup-restore", "post", [1]),
        ("export-request", "post", []),
        ("export-download", "get", [1]),
        ("backups-json", "get", []),
        ("backups-card", "get", []),
    ],
)
def test_it_sends_anonymous_visitors_to_log_in_and_refuses_users_without_a_sandbox(
    client: Client, charlie: Any, name: str, method: str, args: list[int]
) -> None:
    url = reverse(name, args=args)
    response = getattr(client, method)(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("account_login"))
    signed_in(client, charlie)
    assert getattr(client, method)(url).status_code == 404


def test_it_finds_no_snapshot_through_the_doors_for_anyone_else(alice: Any, bob: Any) -> None:
    from django.http import Http404

    from sandboxes.access import get_export_for_user as export_for_user
    from sandboxes.access import get_snapshot_for_user as snapshot_for_user

    _, snapshot, export = alices_things(alice)
    assert snapshot_for_user(alice, snapshot.pk) == snapshot
    assert export_for_user(alice, export.pk) == export
    for user in (bob, AnonymousUser()):
        with pytest.raises(Http404):
            snapshot_for_user(user, snapshot.pk)
        with pytest.raises(Http404):
            export_for_user(user, export.pk)


def test_it_refuses_other_methods(client: Client, alice: Any) -> None:
    signed_in(client, alice)
    assert client.get(reverse("backup-now")).status_code == 405
    assert client.get(reverse("export-request")).status_code == 405
    assert client.post(reverse("backups-json")).status_code == 405


# -- the dashboard ------------------------------------------------------------------------------


def test_it_shows_the_snapshot_list_with_time_trigger_and_size(client: Client, alice: Any) -> None:
    sandbox = sandbox_of(alice)
    older = make_snapshot(sandbox, minutes_ago=90, trigger=Snapshot.Trigger.SLEEP)
    newer = make_snapshot(sandbox, minutes_ago=3, trigger=Snapshot.Trigger.USER)
    html = signed_in(client, alice).get(reverse("dashboard")).content.decode()
    assert 'id="backups-card"' in html and 'id="backup-now"' in html
    assert html.index(f'data-snapshot="{newer.pk}"') < html.index(f'data-snapshot="{older.pk}"')
    assert "You asked" in html and "Before sleeping" in html
    assert "3.3\xa0MB" in html  # filesizeformat
    assert f"{timezone.localtime(newer.taken_at):%H:%M:%S}" in html
    assert "every day" in html  # the free plan's schedule


def test_it_says_when_there_are_no_backups_and_disables_the_download(
    client: Client, alice: Any
) -> None:
    sandbox_of(alice)
    html = signed_in(client, alice).get(reverse("dashboard")).content.decode()
    assert "No backups yet." in html
    assert 'id="export-request" disabled' in html


def test_it_shows_a_restore_in_progress_with_the_progress_bar(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice, State.RUNNING)
    snapshot = make_snapshot(sandbox)
    signed_in(client, alice)
    client.post(reverse("backup-restore", args=[snapshot.pk]))
    html = client.get(reverse("dashboard")).content.decode()
    assert '<div class="progress" id="progress-wrap" >' in html  # not hidden, though running
    assert "A restore of your agent is queued" in html
    assert "js/backups.js" in html


# -- "Back up now" ------------------------------------------------------------------------------


def test_it_queues_a_backup_and_records_who_asked(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice)
    response = signed_in(client, alice).post(reverse("backup-now"), follow=True)
    queued["backup"].assert_called_once_with(sandbox.pk, "user", alice.pk)
    event = sandbox.events.get(kind="backup-requested")
    assert (event.actor, event.actor_user) == (SandboxEvent.Actor.USER, alice)
    assert "Backup queued" in response.content.decode()


def test_it_refuses_a_second_press_within_a_minute(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice)
    signed_in(client, alice)
    with time_machine.travel(timezone.now(), tick=False) as clock:
        client.post(reverse("backup-now"))
        record_event(sandbox, "backup", "Backup done", progress=100)  # the task ran
        clock.shift(timedelta(seconds=30))
        page = client.post(reverse("backup-now"), follow=True).content.decode()
        assert "less than a minute ago" in page
        assert queued["backup"].call_count == 1
        clock.shift(timedelta(seconds=31))
        client.post(reverse("backup-now"))
        assert queued["backup"].call_count == 2


def test_it_refuses_while_a_backup_or_restore_is_queued(
    client: Client, alice: Any, staff: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice)
    record_event(sandbox, "restore-requested", "Staff requested a restore",
                 actor=SandboxEvent.Actor.STAFF, actor_user=staff)  # fmt: skip
    signed_in(client, alice)
    page = client.post(reverse("backup-now"), follow=True).content.decode()
    assert "A restore of your agent is queued and starts shortly." in page
    assert not queued["backup"].called
    record_event(sandbox, "restore", "Restoring", progress=10)  # the task began
    client.post(reverse("backup-now"))
    assert queued["backup"].call_count == 1


def test_it_stops_counting_a_request_as_queued_after_a_while(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    from sandboxes.views_backups import QUEUE_PATIENCE

    sandbox = sandbox_of(alice)
    record_event(sandbox, "backup-requested", "Backup requested")  # its task was lost
    signed_in(client, alice)
    client.post(reverse("backup-now"))
    assert not queued["backup"].called
    with time_machine.travel(timezone.now() + QUEUE_PATIENCE + timedelta(seconds=1)):
        client.post(reverse("backup-now"))
    assert queued["backup"].call_count == 1


def test_it_refuses_while_a_backup_holds_the_lease(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice)
    BackupRepository.objects.create(
        sandbox=sandbox,
        lock_token="worker-1",
        lock_kind=BackupRepository.LockKind.BACKUP,
        locked_until=timezone.now() + timedelta(minutes=2),
    )
    signed_in(client, alice)
    page = client.post(reverse("backup-now"), follow=True).content.decode()
    assert "A backup of your agent is running." in page
    assert "A backup of your agent is running." in client.get(reverse("dashboard")).content.decode()
    assert (
        client.get(reverse("backups-json")).json()["busy"] == "A backup of your agent is running."
    )
    assert not queued["backup"].called
    BackupRepository.objects.filter(sandbox=sandbox).update(
        locked_until=timezone.now() - timedelta(seconds=1)
    )  # a dead worker's lease runs out
    client.post(reverse("backup-now"))
    assert queued["backup"].call_count == 1


# -- restore ------------------------------------------------------------------------------------


def test_it_asks_before_restoring_and_says_what_happens(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice, State.RUNNING)
    snapshot = make_snapshot(sandbox, minutes_ago=60)
    url = reverse("backup-restore", args=[snapshot.pk])
    page = signed_in(client, alice).get(url).content.decode()
    assert 'id="restore-confirm"' in page
    assert "starts again" in page and "kept first, as a new backup" in page
    assert f"{timezone.localtime(snapshot.taken_at):%H:%M:%S}" in page
    assert not queued["restore"].called  # a GET only asks
    assert not sandbox.events.filter(kind="restore-requested").exists()

    response = client.post(url)
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    queued["restore"].assert_called_once_with(sandbox.pk, snapshot.pk, alice.pk)
    event = sandbox.events.get(kind="restore-requested")
    assert (event.actor, event.actor_user) == (SandboxEvent.Actor.USER, alice)
    # Asking again while it is queued: refused, with the reason, and the button disabled.
    page = client.get(url).content.decode()
    assert "A restore of your agent is queued" in page
    assert 'id="restore-submit" disabled' in page
    client.post(url)
    assert queued["restore"].call_count == 1


def test_it_refuses_to_restore_a_sandbox_that_has_not_settled(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice, State.STARTING)
    snapshot = make_snapshot(sandbox)
    url = reverse("backup-restore", args=[snapshot.pk])
    page = signed_in(client, alice).post(url).content.decode()
    assert "Your agent is starting: it can be restored once it has settled." in page
    assert not queued["restore"].called


# -- "Download my agent" ------------------------------------------------------------------------


def test_it_refuses_a_download_before_the_first_backup(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox_of(alice)
    page = signed_in(client, alice).post(reverse("export-request"), follow=True)
    assert "back up your agent first" in page.content.decode()
    assert not queued["export"].called


def test_it_refuses_a_second_download_while_one_is_prepared(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice)
    make_snapshot(sandbox)
    signed_in(client, alice)
    client.post(reverse("export-request"))
    page = client.post(reverse("export-request"), follow=True).content.decode()
    assert "Your download is queued" in page
    assert "Preparing your download…" in client.get(reverse("dashboard")).content.decode()
    assert queued["export"].call_count == 1


def test_it_serves_a_local_export_to_its_owner_only(client: Client, alice: Any, bob: Any) -> None:
    _, snapshot, _ = alices_things(alice)
    sandbox = Sandbox.objects.get(owner=alice)
    export = make_export(
        sandbox, snapshot, ttl=timedelta(hours=1), content=tar_of({"data/memo.txt": b"hello"})
    )
    url = reverse("export-download", args=[export.pk])
    signed_in(client, bob)
    assert client.get(url).status_code == 404
    signed_in(client, alice)
    response = client.get(url)
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith('attachment; filename="hermit-agent-')
    body = b"".join(response.streaming_content)  # type: ignore[attr-defined]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.extractfile("data/memo.txt").read() == b"hello"  # type: ignore[union-attr]


def test_it_says_an_export_expired(client: Client, alice: Any) -> None:
    _, snapshot, _ = alices_things(alice)
    export = make_export(
        Sandbox.objects.get(owner=alice), snapshot, ttl=timedelta(hours=1), content=b"tar"
    )
    signed_in(client, alice)
    with time_machine.travel(timezone.now() + timedelta(hours=2)):
        response = client.get(reverse("export-download", args=[export.pk]))
        assert response.status_code == 410
        assert "This download expired on" in response.content.decode()
        dashboard = client.get(reverse("dashboard")).content.decode()
        assert 'id="export-expired"' in dashboard
        assert client.get(reverse("backups-json")).json()["exports"][0]["expired"] is True


def test_it_says_an_export_is_still_being_prepared_or_was_interrupted(
    client: Client, alice: Any
) -> None:
    sandbox, snapshot, _ = alices_things(alice)
    pending = Export.objects.create(sandbox=sandbox, snapshot=snapshot)
    url = reverse("export-download", args=[pending.pk])
    lease = BackupRepository.objects.create(
        sandbox=sandbox,
        lock_token="worker-1",
        lock_kind=BackupRepository.LockKind.EXPORT,
        locked_until=timezone.now() + timedelta(minutes=2),
    )
    signed_in(client, alice)
    response = client.get(url)
    assert response.status_code == 409
    assert "still being prepared" in response.content.decode()
    assert "Preparing your download…" in client.get(reverse("dashboard")).content.decode()
    # Its worker died: the lease runs out and nothing prepares it any more.
    BackupRepository.objects.filter(pk=lease.pk).update(locked_until=timezone.now())
    response = client.get(url)
    assert response.status_code == 410
    assert "This download was interrupted. Ask for a new one." in response.content.decode()
    assert 'id="export-interrupted"' in client.get(reverse("dashboard")).content.decode()


def test_it_stops_waiting_for_an_export_whose_task_failed(
    client: Client, alice: Any, queued: dict[str, mock.MagicMock]
) -> None:
    sandbox = sandbox_of(alice)
    snapshot = make_snapshot(sandbox)
    signed_in(client, alice)
    with time_machine.travel(timezone.now(), tick=False) as clock:
        client.post(reverse("export-request"))
        # The task made its Export, then found the repository busy: no event, a failed row.
        Export.objects.create(sandbox=sandbox, snapshot=snapshot, state=Export.State.FAILED,
                              error="A backup of this agent is already running.")  # fmt: skip
        page = client.get(reverse("dashboard")).content.decode()
        assert "Preparing your download…" not in page
        assert "could not be prepared: A backup of this agent is already running." in page
        clock.shift(timedelta(seconds=61))
        client.post(reverse("export-request"))
    assert queued["export"].call_count == 2


# -- end to end: the real restic engine, tasks run in the test ---------------------------------


NOTES = "state/workspace/notes.md"


def test_it_backs_up_lists_and_serves_the_download_of_a_real_snapshot(
    client: Client, alice: Any, bob: Any, eager_backups: None, with_data: Any
) -> None:
    sandbox = sandbox_of(alice)
    with_data(sandbox, {NOTES: "The user's cat is called Ada.\n"})
    signed_in(client, alice)
    page = client.post(reverse("backup-now"), follow=True).content.decode()
    snapshot = sandbox.snapshots.get()
    assert (snapshot.trigger, snapshot.actor_user) == (Snapshot.Trigger.USER, alice)
    assert snapshot.files >= 1 and snapshot.size_bytes > 0
    assert f'data-snapshot="{snapshot.pk}"' in page and "You asked" in page
    done = sandbox.events.filter(kind="backup", progress=100).get()
    assert (done.actor, done.actor_user) == (SandboxEvent.Actor.USER, alice)
    assert done.message.startswith(f"Backed up snapshot {snapshot.short_id}")

    page = client.post(reverse("export-request"), follow=True).content.decode()
    export = sandbox.exports.get()
    assert export.state == Export.State.READY and export.snapshot == snapshot
    url = reverse("export-download", args=[export.pk])
    assert f'href="{url}"' in page and 'id="export-download"' in page
    response = client.get(url)
    assert response.status_code == 200
    assert response["Content-Disposition"].endswith('.tar.gz"')
    members = archive_members(b"".join(response.streaming_content))  # type: ignore[attr-defined]
    notes = [data for name, data in members.items() if name.endswith(NOTES)]
    assert notes == [b"The user's cat is called Ada.\n"]

    signed_in(client, bob)
    assert client.get(url).status_code == 404
    assert client.get(reverse("backups-json")).json()["exports"] == []


def test_it_links_to_a_presigned_s3_url_that_serves_the_archive(
    client: Client, alice: Any, bob: Any, eager_backups: None, with_data: Any, s3_backups: Any
) -> None:
    import httpx

    sandbox = sandbox_of(alice)
    with_data(sandbox, {NOTES: "Stored in a bucket.\n"})
    signed_in(client, alice)
    client.post(reverse("backup-now"))
    client.post(reverse("export-request"))
    export = sandbox.exports.get(state=Export.State.READY)
    url = reverse("export-download", args=[export.pk])
    response = client.get(url)
    assert response.status_code == 302
    link = response["Location"]
    assert link.startswith(s3_backups.endpoint) and "X-Amz-Signature=" in link
    download = httpx.get(link)
    assert download.status_code == 200
    assert "attachment" in download.headers["content-disposition"]
    members = archive_members(download.content)
    assert [d for n, d in members.items() if n.endswith(NOTES)] == [b"Stored in a bucket.\n"]
    signed_in(client, bob)
    assert client.get(url).status_code == 404


RESTORE_EMAIL = "alice@restore.test"


@pytest.fixture
def agent(fake_backend: FakeBackend) -> Iterator[Sandbox]:
    """A running sandbox on the in-memory backend, its data dir on disk: what the restore view
    streams and does (states, steps, the swap of the data, the pre-restore snapshot) is the
    portal's and restic's, both real here. A real agent restored and answering again is
    proven in tests/test_backups.py; this one starts no gateway (a cold boot, ~10 s)."""
    sandbox = running_fake_sandbox(RESTORE_EMAIL)
    yield sandbox
    shutil.rmtree(volume_of(sandbox), ignore_errors=True)


@pytest.fixture
def private_channels(settings: Any) -> None:
    """A channel-layer prefix of this test run's own: other runs on the same Redis have
    sandboxes with the same ids, whose events must not reach this test's socket."""
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    if "CONFIG" in layers["default"]:
        layers["default"]["CONFIG"]["prefix"] = f"asgi-test-{os.getpid()}"
    settings.CHANNEL_LAYERS = layers


async def test_it_restores_after_the_confirmation_with_live_progress(
    agent: Sandbox,
    eager_backups: None,
    private_channels: None,
    initialized_repository: Callable[[Sandbox], Any],
) -> None:
    """The owner backs up, changes a file, confirms a restore of that backup: the progress
    socket streams the restore's steps, the agent runs again on the old file, and the state
    it had is listed as a "Before a restore" snapshot. (Its repository is set up already: the
    first backup's restic init is in test_it_backs_up_lists_and_serves_the_download...) The
    agent runs on the in-memory backend, backed up with its pause as a real one is."""
    await asyncio.to_thread(initialized_repository, agent)
    owner = await get_user_model().objects.aget(pk=agent.owner_id)
    notes = volume_of(agent) / NOTES
    write = f"mkdir -p {notes.parent} && printf %s {{}} > {notes}"
    await asyncio.to_thread(sh, agent, write.format("first"))
    client = Client()
    await asyncio.to_thread(client.force_login, owner)
    await asyncio.to_thread(client.post, reverse("backup-now"))
    first = await agent.snapshots.filter(trigger=Snapshot.Trigger.USER).aget()
    await asyncio.to_thread(sh, agent, write.format("second"))
    url = reverse("backup-restore", args=[first.pk])
    confirm = await asyncio.to_thread(client.get, url)
    assert 'id="restore-submit"' in confirm.content.decode()

    ws = WebsocketCommunicator(
        application, "/ws/sandbox/progress/", headers=[(b"origin", b"http://127.0.0.1:8000")]
    )
    ws.scope["user"] = owner
    assert (await ws.connect())[0]
    try:
        posting = asyncio.ensure_future(asyncio.to_thread(client.post, url))
        seen: list[dict[str, Any]] = []
        while not any(e["kind"] == "restore" and e["progress"] == 100 for e in seen):
            seen.append(await ws.receive_json_from(timeout=180))
        response = await posting
    finally:
        await ws.disconnect()
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    kinds = [e["kind"] for e in seen]
    assert kinds[0] == "restore-requested"
    assert "restoring" in {e["state"] for e in seen}
    stored = [e for e in seen if e["kind"] == "restore" and e["id"] is not None]
    assert stored[-1]["message"].startswith(f"Restored snapshot {first.short_id}")
    progress = [e["progress"] for e in stored]
    assert progress == sorted(progress), [(e["kind"], e["progress"], e["message"]) for e in seen]

    await agent.arefresh_from_db()
    assert agent.state == State.RUNNING, agent.error_message
    assert await asyncio.to_thread(sh, agent, f"cat {notes}") == "first"
    before = await agent.snapshots.aget(trigger=Snapshot.Trigger.PRE_RESTORE)
    page = (await asyncio.to_thread(client.get, reverse("dashboard"))).content.decode()
    assert f'data-snapshot="{before.pk}"' in page and "Before a restore" in page
    actors = [e.actor_user_id async for e in agent.events.filter(kind="restore")]
    assert actors and set(actors) == {agent.owner_id}

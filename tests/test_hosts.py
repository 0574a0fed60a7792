"""Sandbox hosts: registry and heartbeat, routing to host queues (with a real worker),
placement, draining and lost hosts (by real restic backups and restore-on-start), the CLI and
the admin. Sandboxes run on the in-memory backend: moving one is the portal's bookkeeping, its
backup and its restore, not a gateway's."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.core.management import CommandError, call_command
from django.utils import timezone

from portal.celery import _consume_host_queue, app
from sandboxes import actions, hosts, sleep, tasks
from sandboxes.backends.fake import FakeBackend
from sandboxes.backups import actions as backups
from sandboxes.models import BootSlot, Checkpoint, Sandbox, SandboxEvent, SandboxHost, Snapshot
from tests.factories import make_user
from tests.fixtures.backend import volume_of
from tests.fixtures.live import Server

State = Sandbox.State
HostState = SandboxHost.State
NOTES = "state/workspace/notes.md"


def make_host(name: str, *, free: int | None = 8000, ago: float = 5, **fields: Any) -> SandboxHost:
    beat = None if free is None else timezone.now() - timedelta(seconds=ago)
    return SandboxHost.objects.create(
        name=name, address=f"10.0.0.{len(name)}", free_ram_mb=free, last_heartbeat=beat, **fields
    )


def on_host(sandbox: Sandbox, host: SandboxHost | None) -> Sandbox:
    Sandbox.objects.filter(pk=sandbox.pk).update(host=host)
    sandbox.refresh_from_db()
    return sandbox


def running(email: str) -> Sandbox:
    user = make_user(email)
    sandbox = Sandbox.objects.get(owner=user)
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    return sandbox


def messages(sandbox: Sandbox) -> list[str]:
    return list(sandbox.events.order_by("created_at", "id").values_list("message", flat=True))


# -- registry, heartbeat, routing --------------------------------------------------------------


@pytest.mark.django_db
def test_it_registers_this_machine_and_heartbeats_its_free_ram_and_awake_sandboxes(
    fake_backend: FakeBackend, settings: Any
) -> None:
    settings.HERMIT_HOST_NAME = "beat-host"
    assert not SandboxHost.objects.filter(name="beat-host").exists()
    first = hosts.heartbeat()
    assert first.state == HostState.ACTIVE and first.last_heartbeat is not None
    total, available = hosts.meminfo()
    assert total > 0 and first.capacity_ram_mb == total
    assert first.free_ram_mb is not None and abs(first.free_ram_mb - available) < 512
    assert first.awake_sandboxes == 0

    sandbox = on_host(running("beat@example.com"), first)
    assert sandbox.host == first
    second = hosts.heartbeat()
    assert second.pk == first.pk and second.awake_sandboxes == 1
    assert second.last_heartbeat is not None and second.last_heartbeat >= first.last_heartbeat

    # A heartbeat never revives a lost host: its sandboxes were moved away.
    SandboxHost.objects.filter(pk=first.pk).update(state=HostState.LOST)
    assert hosts.heartbeat().state == HostState.LOST


@pytest.mark.django_db
def test_it_routes_every_sandbox_task_to_its_hosts_queue(alice: Any, settings: Any) -> None:
    from sandboxes.backups import tasks as backup_tasks

    far = make_host("far-host")
    sandbox = on_host(Sandbox.objects.get(owner=alice), far)
    queue = hosts.queue_for("far-host")
    assert queue == f"{app.conf.task_default_queue}.host.far-host"  # this run's own namespace
    scoped: list[Any] = [
        tasks.provision_sandbox,
        tasks.start_sandbox,
        tasks.stop_sandbox,
        tasks.restart_sandbox,
        tasks.wake_sandbox,
        tasks.sleep_sandbox,
        tasks.apply_plan,
        tasks.move_sandbox,
        tasks.reconcile_one,
        tasks.sleep_one,
        tasks.move_off_host,
        backup_tasks.backup_sandbox,
        backup_tasks.restore_sandbox,
        backup_tasks.export_snapshot,
        backup_tasks.check_backup,
    ]
    for task in scoped:
        route = app.amqp.router.route({}, task.name, (sandbox.pk,), {}, task)
        assert route["queue"].name == queue, task.name
    by_keyword = hosts.route_task(tasks.stop_sandbox.name, (), {"sandbox_id": sandbox.pk}, {})
    assert by_keyword == {"queue": queue}

    default = app.conf.task_default_queue
    for name in ("sandboxes.tasks.reconcile_sandboxes", "sandboxes.tasks.check_hosts"):
        assert app.amqp.router.route({}, name, (), {})["queue"].name == default
    on_host(sandbox, None)  # not placed yet: any worker
    assert hosts.route_task(tasks.stop_sandbox.name, (sandbox.pk,), {}, {}) is None
    assert hosts.route_task(tasks.stop_sandbox.name, (10**9,), {}, {}) is None  # gone
    explicit = app.amqp.router.route({"queue": "elsewhere"}, tasks.stop_sandbox.name, (1,), {})
    assert explicit["queue"].name == "elsewhere"


@pytest.mark.django_db(transaction=True)
async def test_the_router_answers_in_async_code_too() -> None:
    """A consumer that queues a sandbox's task from its event loop gets it routed (Django
    refuses queries on that thread: the router asks from another)."""
    far = await database_sync_to_async(make_host)("async-host")
    user = await database_sync_to_async(make_user)("async@example.com")
    sandbox = await Sandbox.objects.aget(owner=user)
    await Sandbox.objects.filter(pk=sandbox.pk).aupdate(host=far)
    route = hosts.route_task(tasks.wake_sandbox.name, (sandbox.pk,), {}, {})
    assert route == {"queue": hosts.queue_for("async-host")}


def test_a_host_worker_adds_its_own_queue_to_what_it_consumes(settings: Any) -> None:
    settings.HERMIT_HOST_NAME = "signal-host"
    default = app.conf.task_default_queue
    wanted = hosts.queue_for("signal-host")

    def worker_queues() -> Any:
        """A worker's queues after ``-Q <default>``, inside what celeryd_after_setup passes."""
        queues = app.amqp.Queues([])
        queues.add(default)
        queues.select([default])
        return queues, SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=queues)))

    queues, worker = worker_queues()
    _consume_host_queue(sender="w1", instance=worker)
    assert set(queues.consume_from) == {default, wanted}

    settings.HERMIT_HOST_WORKER = False  # a worker that cannot run sandboxes
    queues, worker = worker_queues()
    _consume_host_queue(sender="w2", instance=worker)
    assert set(queues.consume_from) == {default}


def _wait(check: Callable[[], bool], timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}; worker log:\n{server.output()[-3000:]}"
        time.sleep(0.2)


def test_a_real_worker_heartbeats_and_takes_its_hosts_sandbox_tasks(
    transactional_db: None, start_server: Callable[..., Server]
) -> None:
    """A worker started as another host (HERMIT_HOST_NAME) registers itself, heartbeats, and
    runs the tasks of the sandboxes placed on it, which reach it on its own queue only."""
    name = f"second-{int(time.time() * 1000) % 10**8}"
    worker = start_server(
        "celery", name="host-worker", HERMIT_HOST_NAME=name, HERMIT_HOST_HEARTBEAT_INTERVAL="1"
    )
    try:
        _wait(
            lambda: SandboxHost.objects.filter(name=name, last_heartbeat__isnull=False).exists(),
            60,
            "the worker never heartbeated",
            worker,
        )
        host = SandboxHost.objects.get(name=name)
        assert host.state == HostState.ACTIVE and (host.free_ram_mb or 0) > 0
        assert f"consumes the host queue {hosts.queue_for(name)}" in worker.output()

        user = make_user("second@example.com")
        sandbox = Sandbox.objects.get(owner=user)
        Sandbox.objects.filter(pk=sandbox.pk).update(state=State.STOPPED, host=host)
        elsewhere = Sandbox.objects.get(owner=make_user("elsewhere@example.com"))
        nowhere = make_host(f"nowhere-{name}")
        Sandbox.objects.filter(pk=elsewhere.pk).update(state=State.STOPPED, host=nowhere)

        tasks.sleep_sandbox.delay(elsewhere.pk)  # on a queue no worker of this run consumes
        # Sent to this worker's queue by mistake (as if the sandbox moved after it was queued):
        # the worker sends it on to the sandbox's own host instead of running it.
        tasks.sleep_sandbox.apply_async((elsewhere.pk,), queue=hosts.queue_for(name))
        tasks.sleep_sandbox.delay(sandbox.pk)
        done = SandboxEvent.objects.filter(sandbox=sandbox, kind="staff-result")
        _wait(done.exists, 60, "the host's task never ran", worker)
        assert done.get().message == "Sleep: nothing to do, it is stopped"
        time.sleep(1)
        assert not SandboxEvent.objects.filter(sandbox=elsewhere, kind="staff-result").exists()

        with (
            app.connection_for_write() as conn,
            conn.SimpleQueue(hosts.queue_for(nowhere.name)) as q,
        ):
            _wait(lambda: q.qsize() == 2, 30, "the misrouted task was not sent on", worker)
            q.clear()  # both wait for their own host
        first = host.last_heartbeat
        assert first is not None
        _wait(  # the worker's timer beats again
            lambda: SandboxHost.objects.filter(name=name, last_heartbeat__gt=first).exists(),
            30,
            "the worker heartbeated only once",
            worker,
        )
    finally:
        worker.stop()


# -- placement ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_placement_picks_the_active_host_with_the_most_free_ram_that_has_room(
    alice: Any, settings: Any
) -> None:
    settings.HERMIT_HOST_MIN_FREE_MB = 1000
    SandboxHost.objects.all().delete()
    small = make_host("small", free=3000)
    big = make_host("big", free=9000, state=HostState.DRAINING)
    make_host("gone", free=20000, state=HostState.LOST)
    full = make_host("full", free=8000, capacity_sandboxes=1)
    squeezed = make_host("squeezed", free=900)
    silent = make_host("silent", free=None)
    on_host(Sandbox.objects.get(owner=make_user("tenant@example.com")), full)

    assert hosts.choose() == small  # draining, lost, full and low-on-RAM hosts take none
    SandboxHost.objects.filter(pk=big.pk).update(state=HostState.ACTIVE)
    assert hosts.choose() == big
    assert hosts.choose(exclude=big) == small
    SandboxHost.objects.exclude(pk=silent.pk).update(state=HostState.DRAINING)
    assert hosts.choose() == silent  # one that has not reported yet counts as having room
    assert squeezed.free_ram_mb == 900

    SandboxHost.objects.filter(pk=big.pk).update(state=HostState.ACTIVE)
    sandbox = Sandbox.objects.get(owner=alice)
    assert tasks.request_provisioning(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.host == big
    assert hosts.place(sandbox) == big  # placed once; it keeps its host


@pytest.mark.django_db
def test_with_no_room_anywhere_the_sandbox_is_not_queued_and_its_owner_is_told(
    alice: Any, django_capture_on_commit_callbacks: Any
) -> None:
    SandboxHost.objects.update(state=HostState.DRAINING)
    sandbox = Sandbox.objects.get(owner=alice)
    with django_capture_on_commit_callbacks() as queued:
        assert not tasks.request_provisioning(sandbox)
    assert queued == []
    sandbox.refresh_from_db()
    assert sandbox.host is None
    event = sandbox.events.get(kind="placement")
    assert event.message.startswith("Every machine is full right now")

    with pytest.raises(hosts.NoRoom):
        hosts.choose()


@pytest.mark.django_db
def test_a_fresh_install_places_on_this_machine(alice: Any, settings: Any) -> None:
    settings.HERMIT_HOST_NAME = "only-machine"
    SandboxHost.objects.all().delete()
    sandbox = Sandbox.objects.get(owner=alice)
    assert hosts.place(sandbox).name == "only-machine"
    assert SandboxHost.objects.get().state == HostState.ACTIVE


# -- draining ----------------------------------------------------------------------------------


@pytest.fixture
def two_hosts(settings: Any, tmp_path: Path) -> tuple[SandboxHost, SandboxHost]:
    """Hosts 1 (this process) and 2, whose backups both reach (HERMIT_BACKUP_DIR)."""
    settings.HERMIT_HOST_NAME = "host-1"
    settings.HERMIT_BACKUP_DIR = str(tmp_path / "shared-backups")
    SandboxHost.objects.all().delete()
    return make_host("host-1", free=9000), make_host("host-2", free=4000)


@pytest.mark.django_db
def test_draining_moves_a_sleeping_agent_by_backup_and_its_data_comes_back_on_the_next_start(
    fake_backend: FakeBackend,
    data_sandbox: Callable[..., Sandbox],
    two_hosts: tuple[SandboxHost, SandboxHost],
) -> None:
    host1, host2 = two_hosts
    sandbox = on_host(data_sandbox("drain@example.com", state="sleeping", repository=True), host2)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    Checkpoint.objects.create(sandbox=sandbox, location="/nowhere/ckpt", identity="x")
    notes = (volume_of(sandbox) / NOTES).read_text()

    out = StringIO()
    call_command("hosts", "drain", "host-2", stdout=out)
    assert "host-2 is draining" in out.getvalue()
    assert tasks.move_off_host(sandbox.pk) == "moved"

    sandbox.refresh_from_db()
    assert (sandbox.state, sandbox.host) == (State.SLEEPING, host1)
    assert not volume_of(sandbox).exists()  # host 2's copy is gone: its backup holds the data
    assert not Checkpoint.objects.filter(sandbox=sandbox).exists()  # a host-local image
    snapshot = Snapshot.objects.get(sandbox=sandbox)
    assert snapshot.trigger == Snapshot.Trigger.MOVE
    assert messages(sandbox)[-1].startswith(
        f"Moved to another machine; its data comes back from its backup of "
        f"{snapshot.taken_at:%Y-%m-%d %H:%M} UTC"
    )
    assert tasks.move_off_host(sandbox.pk) == "not-draining"  # done once

    list(actions.wake_sandbox(sandbox))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    assert (volume_of(sandbox) / NOTES).read_text() == notes
    assert any(m.startswith("Restored snapshot") for m in messages(sandbox))


@pytest.mark.django_db
def test_a_running_agent_on_a_draining_host_moves_at_its_next_sleep(
    fake_backend: FakeBackend,
    two_hosts: tuple[SandboxHost, SandboxHost],
    eager_backups: None,
    django_capture_on_commit_callbacks: Any,
) -> None:
    host1, host2 = two_hosts
    sandbox = on_host(running("awake@example.com"), host2)
    hosts.set_state("host-2", HostState.DRAINING)
    assert tasks.queue_moves(host2) == 0  # awake: it stays until it sleeps
    assert tasks.move_off_host(sandbox.pk) == "not-idle"

    with django_capture_on_commit_callbacks(execute=True):
        assert sleep.hibernate(sandbox) == "checkpointed"
    sandbox.refresh_from_db()
    assert (sandbox.state, sandbox.host) == (State.SLEEPING, host1)
    assert not Checkpoint.objects.filter(sandbox=sandbox).exists()
    assert fake_backend.images() == []
    assert any(m.startswith("Moved to another machine") for m in messages(sandbox))


@pytest.mark.django_db
def test_a_drain_with_nowhere_to_go_leaves_the_agent_where_it_is(
    fake_backend: FakeBackend,
    data_sandbox: Callable[..., Sandbox],
    two_hosts: tuple[SandboxHost, SandboxHost],
) -> None:
    _, host2 = two_hosts
    sandbox = on_host(data_sandbox("stay@example.com", state="sleeping"), host2)
    hosts.set_state("host-1", HostState.DRAINING)
    hosts.set_state("host-2", HostState.DRAINING)
    assert tasks.move_off_host(sandbox.pk) == "no-room"
    sandbox.refresh_from_db()
    assert sandbox.host == host2 and volume_of(sandbox).exists()


@pytest.mark.django_db
def test_a_drain_never_moves_an_agent_whose_backups_only_its_host_can_read(
    fake_backend: FakeBackend,
    data_sandbox: Callable[..., Sandbox],
    two_hosts: tuple[SandboxHost, SandboxHost],
    settings: Any,
) -> None:
    _, host2 = two_hosts
    settings.HERMIT_BACKUP_DIR = ""  # the default: inside host 2's own data dir
    sandbox = on_host(data_sandbox("local@example.com", state="sleeping"), host2)
    hosts.set_state("host-2", HostState.DRAINING)
    assert tasks.move_off_host(sandbox.pk) == "backups-local"
    sandbox.refresh_from_db()
    assert sandbox.host == host2 and volume_of(sandbox).exists()
    assert not Snapshot.objects.filter(sandbox=sandbox).exists()


# -- lost hosts --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_lost_hosts_agents_come_back_elsewhere_from_their_latest_snapshot(
    fake_backend: FakeBackend,
    data_sandbox: Callable[..., Sandbox],
    two_hosts: tuple[SandboxHost, SandboxHost],
    settings: Any,
) -> None:
    settings.HERMIT_HOST_LOST_AFTER = 90
    host1, host2 = two_hosts
    SandboxHost.objects.filter(pk=host2.pk).update(
        last_heartbeat=timezone.now() - timedelta(seconds=91)
    )
    never = make_host("never-beat", free=None)
    saved = data_sandbox("saved@example.com", state="stopped", repository=True)
    Sandbox.objects.filter(pk=saved.pk).update(backend="fake")
    snapshot = backups.backup_sandbox(saved, trigger=Snapshot.Trigger.SCHEDULE)
    assert snapshot is not None
    notes = (volume_of(saved) / NOTES).read_text()
    Sandbox.objects.filter(pk=saved.pk).update(
        state=State.RUNNING, backend_state={"pid": 1}, host=host2
    )
    fresh = on_host(Sandbox.objects.get(owner=make_user("fresh@example.com")), host2)
    Sandbox.objects.filter(pk=fresh.pk).update(state=State.SLEEPING, backend="fake")
    Checkpoint.objects.create(sandbox=fresh, location="/host-2/ckpt", identity="x")
    BootSlot.objects.create(
        host="host-2", number=0, sandbox=saved, lease_until=timezone.now() + timedelta(hours=1)
    )

    counts = tasks.check_hosts()
    assert counts["lost"] == 1 and counts["relocated"] == 2
    host2.refresh_from_db()
    never.refresh_from_db()
    assert host2.state == HostState.LOST and never.state == HostState.ACTIVE
    saved.refresh_from_db()
    fresh.refresh_from_db()
    assert (saved.host, fresh.host) == (host1, host1)
    assert saved.state == State.SLEEPING and saved.backend_state == {}
    assert not Checkpoint.objects.filter(sandbox=fresh).exists()
    assert not BootSlot.objects.filter(sandbox=saved).exists()  # host 2's slot is let go
    assert messages(saved)[-1] == (
        "The machine your agent ran on stopped answering, so it was moved to another one. It "
        f"comes back from its backup of {snapshot.taken_at:%Y-%m-%d %H:%M} UTC when it next "
        "starts; changes made since then may be lost."
    )
    assert messages(fresh)[-1].endswith(
        "It had no backup, so it starts fresh, without its data, next time."
    )

    events = SandboxEvent.objects.count()
    assert tasks.check_hosts() == {"lost": 0, "relocated": 0, "no-room": 0, "moves": 0}
    assert SandboxEvent.objects.count() == events  # idempotent

    shutil.rmtree(volume_of(saved))  # host 2's disk is out of reach: host 1 has no copy
    list(actions.wake_sandbox(saved))
    saved.refresh_from_db()
    assert saved.state == State.RUNNING, saved.error_message
    assert (volume_of(saved) / NOTES).read_text() == notes


# -- the CLI and the admin ---------------------------------------------------------------------


@pytest.mark.django_db
def test_the_hosts_command_lists_drains_and_undrains(
    alice: Any, two_hosts: tuple[SandboxHost, SandboxHost]
) -> None:
    host1, host2 = two_hosts
    on_host(Sandbox.objects.get(owner=alice), host2)
    out = StringIO()
    call_command("hosts", "list", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "NAME",
        "ADDRESS",
        "STATE",
        "HEARTBEAT",
        "SANDBOXES",
        "AWAKE",
        "FREE",
        "RAM",
    ]
    row = next(line for line in lines if line.startswith("host-2"))
    assert row.split()[:6] == ["host-2", host2.address, "active", "5", "s", "ago"]
    assert row.split()[6:] == ["1", "0", "4000", "MB"]

    call_command("hosts", "drain", "host-2", stdout=out)
    host2.refresh_from_db()
    assert host2.state == HostState.DRAINING
    assert hosts.choose() == host1
    call_command("hosts", "undrain", "host-2", stdout=out)
    host2.refresh_from_db()
    assert host2.state == HostState.ACTIVE
    assert (
        "host-2 is active: new sandboxes may be placed on it (it was draining)." in out.getvalue()
    )

    with pytest.raises(
        CommandError,
        match=re.escape("No sandbox host is named 'nope'. Known hosts: host-1, host-2."),
    ):
        call_command("hosts", "drain", "nope")


@pytest.mark.django_db
def test_staff_see_hosts_in_the_admin_and_cannot_add_or_delete_them(
    client: Any, staff: Any, two_hosts: tuple[SandboxHost, SandboxHost]
) -> None:
    _, host2 = two_hosts
    make_host("quiet", free=None)
    client.force_login(staff)
    page = client.get("/admin/sandboxes/sandboxhost/")
    assert page.status_code == 200
    text = page.content.decode()
    for expected in ("host-1", "host-2", "quiet", "9000 MB", "5 s ago", "never", "unknown"):
        assert expected in text, expected
    assert client.get("/admin/sandboxes/sandboxhost/add/").status_code == 403
    change = client.get(f"/admin/sandboxes/sandboxhost/{host2.pk}/change/")
    assert change.status_code == 200 and 'name="name"' not in change.content.decode()

    client.post(
        "/admin/sandboxes/sandboxhost/",
        {"action": "drain", "_selected_action": [host2.pk]},
    )
    host2.refresh_from_db()
    assert host2.state == HostState.DRAINING


@pytest.mark.django_db
def test_a_start_read_before_a_move_does_not_start_the_agent_on_its_old_host(
    fake_backend: FakeBackend, two_hosts: tuple[SandboxHost, SandboxHost]
) -> None:
    host1, host2 = two_hosts
    sandbox = on_host(running("raced@example.com"), host2)
    actions.stop_sandbox(sandbox)
    sandbox.refresh_from_db()
    stale = Sandbox.objects.select_related("owner").get(pk=sandbox.pk)  # a wake read it here
    fake_backend.calls.clear()
    on_host(sandbox, host1)  # ... and a drain moved it before the wake claimed it
    with pytest.raises(actions.TransitionRefused):
        for _ in actions.start_sandbox(stale):
            pass
    sandbox.refresh_from_db()
    assert (sandbox.state, sandbox.host) == (State.STOPPED, host1)
    assert not any(method in ("start", "restore") for method, _ in fake_backend.calls)

"""Fencing (sandboxes.fencing): a lost host whose worker comes back stops and removes what was
moved away from it, and nothing else. On the in-memory backend; tests/test_two_hosts.py fences
a real gateway left running on a second host."""

from __future__ import annotations

from typing import Any

import pytest
from django import db
from django.core.cache import cache

from portal.celery import HostHeartbeat
from sandboxes import actions, fencing, hosts, sleep, tasks
from sandboxes.backends import volumes
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Checkpoint, Sandbox, SandboxEvent, SandboxHost
from tests.factories import make_user
from tests.fixtures.backend import volume_of

State = Sandbox.State
HostState = SandboxHost.State


def running_on(email: str, host: SandboxHost | None) -> Sandbox:
    sandbox = Sandbox.objects.get(owner=make_user(email))
    actions.provision_sandbox(sandbox)
    Sandbox.objects.filter(pk=sandbox.pk).update(host=host)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    (volume_of(sandbox) / "state" / "notes.md").write_text("kept")
    return sandbox


@pytest.fixture
def came_back(fake_backend: FakeBackend, settings: Any) -> tuple[SandboxHost, SandboxHost]:
    """This machine's host, marked lost (and back: its worker heartbeats), and the host its
    sandboxes were moved to."""
    settings.HERMIT_HOST_NAME = "back-host"
    cache.delete(fencing.QUEUED_KEY.format(host="back-host"))
    here = hosts.heartbeat()
    hosts.set_state(here.name, HostState.LOST)
    here.refresh_from_db()
    elsewhere = SandboxHost.objects.create(name="new-home", address="10.0.0.9")
    return here, elsewhere


@pytest.mark.django_db
def test_a_lost_host_that_comes_back_stops_and_removes_only_what_moved_away(
    fake_backend: FakeBackend, came_back: tuple[SandboxHost, SandboxHost]
) -> None:
    here, elsewhere = came_back
    moved = running_on("moved@example.com", here)
    slept = running_on("slept@example.com", here)
    assert sleep.hibernate(slept) == "checkpointed", slept.error_message
    image = Checkpoint.objects.get(sandbox=slept).location
    kept = running_on("kept@example.com", here)
    unplaced = running_on("unplaced@example.com", None)
    # The lost host's sandboxes were reassigned (sandboxes.relocation), their rows' state and
    # checkpoint rows now the new host's business; this machine still holds them.
    Sandbox.objects.filter(pk__in=[moved.pk, slept.pk]).update(host=elsewhere, backend_state={})
    Checkpoint.objects.filter(sandbox=slept).delete()
    assert {moved.pk, slept.pk, kept.pk, unplaced.pk} <= fake_backend.resident()
    assert fencing.strays(fake_backend, here) == sorted([moved.pk, slept.pk])

    counts = fencing.fence()
    assert counts == {"fenced": 2, "images": 1, "failed": 0}
    here_now = fake_backend.resident()
    assert moved.pk not in here_now and slept.pk not in here_now
    assert not volume_of(moved).exists() and not volume_of(slept).exists()
    assert image not in [location for location, _, _ in fake_backend.list_checkpoints()]
    for sandbox in (moved, slept):
        event = SandboxEvent.objects.filter(sandbox=sandbox, kind="fenced").get()
        assert event.message.startswith("Its old machine back-host came back after it was")
    # What is this host's (or no host's) runs on, with its data.
    for sandbox in (kept, unplaced):
        sandbox.refresh_from_db()
        assert (
            actions.get_backend("fake")
            .poll(actions.spec_for(sandbox), sandbox.backend_state)
            .running
        )
        assert (volume_of(sandbox) / "state" / "notes.md").read_text() == "kept"
        assert not SandboxEvent.objects.filter(sandbox=sandbox, kind="fenced").exists()

    events = SandboxEvent.objects.count()
    assert fencing.fence() == {"fenced": 0, "images": 0, "failed": 0}  # idempotent
    assert SandboxEvent.objects.count() == events
    here.refresh_from_db()
    assert here.state == HostState.LOST  # it stays lost until staff undrain it


@pytest.mark.django_db
def test_only_a_lost_hosts_heartbeat_queues_the_fence_on_its_own_queue_once_a_minute(
    fake_backend: FakeBackend,
    came_back: tuple[SandboxHost, SandboxHost],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here, elsewhere = came_back
    queued: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.fence_host, "apply_async", lambda **kw: queued.append(kw))
    monkeypatch.setattr(db, "close_old_connections", lambda: None)  # the test's transaction
    beat = HostHeartbeat.beat

    beat(None)  # type: ignore[arg-type]  # the bootstep's timer callback uses no state
    beat(None)  # type: ignore[arg-type]
    assert queued == [{"queue": hosts.queue_for("back-host")}]

    hosts.set_state(here.name, HostState.ACTIVE)  # staff undrained it
    cache.delete(fencing.QUEUED_KEY.format(host="back-host"))
    moved = running_on("active@example.com", elsewhere)
    beat(None)  # type: ignore[arg-type]
    assert len(queued) == 1, "an active host fences nothing"
    assert moved.pk in fake_backend.resident()


@pytest.mark.django_db
def test_a_sandbox_moved_back_before_its_turn_is_kept(
    fake_backend: FakeBackend,
    came_back: tuple[SandboxHost, SandboxHost],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here, elsewhere = came_back
    sandbox = running_on("back-again@example.com", elsewhere)
    listed = fencing.strays

    def then_moved_back(backend: Any, host: SandboxHost) -> list[int]:
        found = listed(backend, host)
        Sandbox.objects.filter(pk=sandbox.pk).update(host=here)  # undrained and placed here
        return found

    monkeypatch.setattr(fencing, "strays", then_moved_back)
    assert fencing.fence()["fenced"] == 0
    assert sandbox.pk in fake_backend.resident()
    assert (volume_of(sandbox) / "state" / "notes.md").read_text() == "kept"


@pytest.mark.django_db
def test_a_volume_another_host_took_over_on_a_shared_data_dir_is_left_alone(
    fake_backend: FakeBackend, came_back: tuple[SandboxHost, SandboxHost]
) -> None:
    """Hosts should each have their own data dir; where several share one (a network mount),
    the new host prepared the moved agent's volume in the same place, and it is that host's."""
    here, elsewhere = came_back
    sandbox = running_on("shared-dir@example.com", here)
    Sandbox.objects.filter(pk=sandbox.pk).update(host=elsewhere, backend_state={})
    volumes.claim(volume_of(sandbox), elsewhere.name)  # its start on the new host prepared it

    assert fencing.fence() == {"fenced": 1, "images": 0, "failed": 0}
    assert sandbox.pk not in fake_backend.resident()  # the copy that ran here was stopped
    assert (volume_of(sandbox) / "state" / "notes.md").read_text() == "kept"
    assert volumes.owner(volume_of(sandbox)) == elsewhere.name

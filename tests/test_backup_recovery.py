"""What keeps a restore or backup safe from everyone else while it works, and what lets
reconcile finish one a dead worker left: a restoring agent no one else can start, a start that
waits for a long backup, deep trees removed, a stuck-start check that leaves a restoring start
alone. Real restic where needed, on sandboxes whose data dir is written by hand (no gateway)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from sandboxes import actions as sandbox_actions
from sandboxes.backends import safefs
from sandboxes.backups import actions
from sandboxes.events import record_event
from sandboxes.models import BackupRepository, Sandbox
from tests.fixtures.backend import volume_of

pytestmark = pytest.mark.django_db(transaction=True)
State = Sandbox.State
MakeSandbox = Callable[..., Sandbox]


def test_a_restoring_agent_is_started_by_no_one_but_its_restore(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("held@recovery.test", state="restoring")
    for start in (
        lambda s: sandbox_actions.start_sandbox(s, explicit=True),
        lambda s: sandbox_actions.start_sandbox(s, actor="staff"),
        lambda s: sandbox_actions.restart_sandbox(s),
    ):
        with pytest.raises(sandbox_actions.TransitionRefused, match="being restored"):
            list(start(sandbox))
    stale = Sandbox.objects.get(pk=sandbox.pk)
    stale.state = State.STOPPED  # an object read before the restore held it
    with pytest.raises(sandbox_actions.TransitionRefused, match="being restored"):
        list(sandbox_actions.start_sandbox(stale, explicit=True))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RESTORING
    assert not sandbox.events.filter(state=State.STARTING).exists()


DEPTH = 1500  # restic restores it; shutil.rmtree recurses once per level


def deep_tree(root: Path, depth: int, link_to: Path) -> None:
    """Make ``root`` hold ``depth`` nested dirs (made through fds: the path is too long to
    name), with a link to ``link_to`` at the bottom."""
    root.mkdir(mode=0o700)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.symlink(link_to, "outside", dir_fd=fd)
    finally:
        os.close(fd)


def test_a_very_deep_tree_is_removed_and_no_link_in_it_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the tree's\n")
    deep_tree(tmp_path / "deep", DEPTH, outside)
    safefs.remove_tree(tmp_path / "deep")
    assert not (tmp_path / "deep").exists()
    assert (outside / "keep.txt").read_text() == "not the tree's\n"
    safefs.remove_tree(tmp_path / "deep")  # gone already: nothing to do
    (tmp_path / "link").symlink_to(outside)
    safefs.remove_tree(tmp_path / "link")  # the link goes, not what it points at
    assert not (tmp_path / "link").is_symlink() and (outside / "keep.txt").exists()


def test_reconcile_removes_a_very_deep_previous_dir_a_dead_restore_left(
    data_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    sandbox = data_sandbox("deep@recovery.test", state="running")
    parent, pk = volume_of(sandbox).parent, sandbox.pk
    outside = tmp_path / "outside"
    outside.mkdir()
    deep_tree(parent / f".previous-{pk}-20261123T020000000000-0123456789ab", DEPTH, outside)
    deep_tree(parent / f".restore-{pk}-ba9876543210", DEPTH, outside)
    row = actions.repository_for(sandbox)
    BackupRepository.objects.filter(pk=row.pk).update(
        lock_token="dead-worker", lock_kind="restore", locked_until=timezone.now()
    )
    assert actions.reconcile_backups(sandbox) == "restore-finished"
    assert list(parent.glob(f".*-{pk}-*")) == []
    assert outside.is_dir()
    row.refresh_from_db()
    assert (row.lock_token, row.locked_until) == ("", None)
    assert actions.reconcile_backups(sandbox) is None  # done once


def test_a_start_waits_for_a_backup_that_reads_longer_than_its_lease(
    data_sandbox: MakeSandbox, settings: Any
) -> None:
    settings.HERMIT_BACKUP_LEASE_SECONDS = 2  # renewed every second while the backup works
    sandbox = data_sandbox("long-read@recovery.test")
    held = actions.claim_lease(actions.repository_for(sandbox), "backup")

    def finish() -> None:
        time.sleep(5)
        actions.release_lease(held)
        connection.close()

    releaser = threading.Thread(target=finish)
    began = time.monotonic()
    releaser.start()
    assert actions.wait_for_backup(sandbox) is True
    waited = time.monotonic() - began
    releaser.join()
    assert waited >= 4.5, waited  # well past the 2 s lease: it was renewed, so it waited on
    assert actions.wait_for_backup(sandbox) is False

    # Still held at HERMIT_BACKUP_TIMEOUT: the start fails saying why, and boots nothing.
    settings.HERMIT_BACKUP_TIMEOUT = 1
    held = actions.claim_lease(actions.repository_for(sandbox), "backup")
    try:
        steps = list(sandbox_actions.start_sandbox(sandbox, explicit=True))
    finally:
        actions.release_lease(held)
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED and not sandbox.backend_state
    assert "A backup of this agent has been reading its data" in sandbox.error_message
    assert steps[-1].message.startswith("Failed: A backup of this agent")


def test_a_restore_acts_on_the_state_after_its_long_restore_step(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("raced@recovery.test", repository=True)
    snapshot = actions.backup_sandbox(sandbox, trigger="user")
    assert snapshot is not None

    def meanwhile(percent: int, message: str) -> None:  # while restic restores
        Sandbox.objects.filter(pk=sandbox.pk, state=State.STOPPED).update(state=State.STARTING)

    with pytest.raises(actions.BackupFailed, match="Your agent's data is unchanged"):
        actions.restore_sandbox(sandbox, snapshot, on_progress=meanwhile)
    sandbox.refresh_from_db()
    assert sandbox.state == State.STARTING  # the restore left the start alone
    last = sandbox.events.filter(kind="restore").order_by("-created_at", "-id").first()
    assert last is not None and last.message.startswith("Restore failed: ")
    assert last.message.endswith("your agent is unchanged")
    assert list(volume_of(sandbox).parent.glob(f".*-{sandbox.pk}-*")) == []
    assert (volume_of(sandbox) / "state/workspace/notes.md").is_file()
    row = BackupRepository.objects.get(sandbox=sandbox)
    assert row.lock_token == ""


def test_reconcile_leaves_a_start_that_is_restoring_or_making_progress(
    data_sandbox: MakeSandbox,
) -> None:
    from django.conf import settings

    sandbox = data_sandbox("slow-start@recovery.test", state="starting")
    stuck_after = timedelta(
        seconds=settings.HERMIT_START_TIMEOUT + settings.HERMIT_READY_TIMEOUT + 60
    )
    later = timezone.now() + stuck_after + timedelta(seconds=10)
    with time_machine.travel(later, tick=False):
        held = actions.claim_lease(actions.repository_for(sandbox), "restore")  # restore-on-start
        try:
            assert sandbox_actions.reconcile_sandbox(sandbox) == "pending"
        finally:
            actions.release_lease(held)
        record_event(sandbox, "progress", "Starting the gateway")  # the start goes on
        assert sandbox_actions.reconcile_sandbox(sandbox) == "pending"
    with time_machine.travel(later + stuck_after + timedelta(seconds=10), tick=False):
        assert sandbox_actions.reconcile_sandbox(sandbox) == "failed-stuck"
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED


def test_reconcile_leaves_stopped_an_agent_a_dead_restore_held_while_stopped(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("was-stopped@recovery.test")
    actions._stop_for_restore(sandbox, "user", sandbox.owner)  # held, then the worker died
    assert sandbox.state == State.RESTORING
    row = actions.repository_for(sandbox)
    BackupRepository.objects.filter(pk=row.pk).update(
        lock_token="dead-worker", lock_kind="restore", locked_until=timezone.now()
    )
    assert actions.reconcile_backups(sandbox) == "resumed"
    sandbox.refresh_from_db()
    assert sandbox.state == State.STOPPED
    assert not sandbox.events.filter(state=State.STARTING).exists()
    assert (volume_of(sandbox) / "state/workspace/notes.md").is_file()

"""Moving sandboxes off a draining or lost host, by backup and restore-on-start.

A sandbox's data lives on its host's disk (its data dir) and in its backup repository (which
every host reaches). A move never copies a data dir between hosts: the sandbox is reassigned,
and its next start on the new host finds no data dir and restores it from the latest snapshot
(:func:`sandboxes.backups.actions.restore_if_missing`), then cold boots. A checkpoint (a CRIU
image on the old host's disk) never moves: it is dropped.

* **Draining** (:func:`move_idle`, run by the draining host's own worker, where the data is):
  a sleeping or failed sandbox is backed up (trigger ``move``), held in ``stopping`` (so no
  start can begin meanwhile: a wake waits and then follows it to its new host), its checkpoint
  and local data dir are removed, and it is released on the new host in the state it had. A
  stopped sandbox has no such hold (``stopped`` may only start or restore), so it is moved by a
  conditional update and its data dir removed only if it is still stopped there. A running or
  dozing one is moved after its next sleep (sandboxes.sleep queues the move).
* **Lost** (:func:`relocate_lost`, run anywhere): the host cannot be asked for anything. Its
  sandboxes are reassigned, awake ones recorded as asleep, checkpoint rows dropped, and each
  gets an event saying from which snapshot it will come back (changes since may be lost), or
  that it had none and starts fresh. Always-on ones are started again by reconcile.

Every host must reach the backups (S3, or HERMIT_BACKUP_DIR on storage every host mounts at
the same path): a drain refuses to move a sandbox whose backups are on its host's own disk
(:func:`backups_shared`), and a lost host's sandboxes can only come back if they are not.

Every step is a conditional update on the sandbox's host (and state), so a pass that runs
twice, or two passes at once, move each sandbox once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sandboxes import actions, bootqueue, hosts
from sandboxes.events import record_event
from sandboxes.models import Checkpoint, Sandbox, SandboxHost, Snapshot

log = logging.getLogger(__name__)
State = Sandbox.State
HostState = SandboxHost.State
IDLE = (State.SLEEPING, State.FAILED, State.STOPPED)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _latest_snapshot(sandbox: Sandbox) -> Snapshot | None:
    return Snapshot.objects.filter(sandbox=sandbox).order_by("-taken_at").first()


# -- draining ----------------------------------------------------------------------------------


def movable(host: SandboxHost) -> list[int]:
    """The pks of the host's sandboxes a drain can move now (idle, nothing running)."""
    return list(
        Sandbox.objects.filter(host=host, state__in=IDLE, backend_state={})
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def backups_shared() -> bool:
    """Whether every host reaches the backups: S3, or HERMIT_BACKUP_DIR set (to storage every
    host mounts at that path). The default, inside the host's own data dir, is not."""
    from sandboxes.backups import storage

    return storage.s3_mode() or bool(settings.HERMIT_BACKUP_DIR)


def move_idle(sandbox: Sandbox) -> str:
    """Move an idle sandbox off its draining host; return the outcome.

    ``moved``; ``not-draining`` (its host is active or lost: nothing to do); ``not-idle``
    (awake: it moves after its next sleep); ``no-room`` (no other host has room: tried again on
    the next pass); ``backups-local`` (the backups are on this host's disk, which no other
    host reads: see :func:`backups_shared`); ``backup-failed`` or ``busy`` (another backup or
    restore holds it: tried again); ``raced`` (it changed meanwhile); ``failed`` (its local
    data could not be removed: it stays, and its event says why).
    """
    from sandboxes.backups import actions as backups
    from sandboxes.backups.storage import StorageError

    sandbox.refresh_from_db()
    host = sandbox.host
    if host is None or host.state != HostState.DRAINING:
        return "not-draining"
    if sandbox.state not in IDLE or sandbox.backend_state:
        return "not-idle"
    if not backups_shared():
        log.warning("sandbox %s: not moved: its backups are on this host's disk", sandbox.pk)
        return "backups-local"
    try:
        target = hosts.choose(exclude=host)
    except hosts.NoRoom:
        return "no-room"
    before = sandbox.updated_at
    has_data = backups.has_data(sandbox)
    if has_data:
        try:
            backups.backup_sandbox(sandbox, trigger=Snapshot.Trigger.MOVE)
        except backups.BackupBusy:
            return "busy"
        except (backups.BackupFailed, StorageError) as exc:
            log.warning("sandbox %s: no backup to move it with: %s", sandbox.pk, exc)
            return "backup-failed"
        sandbox.refresh_from_db()
    guard = {"host_id": host.pk, "updated_at": before}
    if sandbox.state == State.STOPPED:
        return _move_stopped(sandbox, host, target, guard, has_data)
    was, error = sandbox.state, sandbox.error_message
    try:
        actions.transition(
            sandbox, State.STOPPING, message="Moving your agent to another machine", guard=guard
        )
    except actions.TransitionRefused:
        return "raced"
    try:
        _clear_local(sandbox)
    except OSError as exc:
        actions.transition(sandbox, was, message=f"The move did not work: {exc}")
        return "failed"
    actions.transition(
        sandbox,
        was,
        message=_moved_message(sandbox, has_data),
        host=target,
        error_message=error,
    )
    log.info("sandbox %s: moved from %s to %s", sandbox.pk, host.name, target.name)
    return "moved"


def _move_stopped(
    sandbox: Sandbox, host: SandboxHost, target: SandboxHost, guard: dict[str, Any], data: bool
) -> str:
    moved = Sandbox.objects.filter(pk=sandbox.pk, state=State.STOPPED, **guard).update(
        host=target, updated_at=timezone.now()
    )
    if not moved:
        return "raced"
    sandbox.refresh_from_db()
    if sandbox.state == State.STOPPED:  # a start that claimed it meanwhile keeps the data here
        try:
            _clear_local(sandbox)
        except OSError as exc:
            log.warning("sandbox %s: could not remove its data after a move: %s", sandbox.pk, exc)
    record_event(sandbox, "moved", _moved_message(sandbox, data))
    return "moved"


def _clear_local(sandbox: Sandbox) -> None:
    """Drop the sandbox's checkpoint and remove its data dir on this host (its backup holds
    the data). Raise OSError if the data dir could not be removed."""
    from sandboxes import sleep

    sleep.drop_checkpoint(sandbox)
    actions.get_backend(sandbox.backend).remove_volume(sandbox.pk)


def _moved_message(sandbox: Sandbox, had_data: bool) -> str:
    if not had_data:
        return "Moved to another machine; it starts there next time"
    snapshot = _latest_snapshot(sandbox)
    when = f" of {_when(snapshot.taken_at)}" if snapshot else ""
    return (
        f"Moved to another machine; its data comes back from its backup{when} when it next "
        "starts (nothing is lost)"
    )


def queue_move_if_draining(sandbox: Sandbox) -> bool:
    """After a sleep: queue the move of a sandbox whose host drains (once the transaction
    commits). Return True if one was queued."""
    if sandbox.host_id is None:
        return False
    if not SandboxHost.objects.filter(pk=sandbox.host_id, state=HostState.DRAINING).exists():
        return False
    from sandboxes import tasks

    transaction.on_commit(lambda: tasks.move_off_host.delay(sandbox.pk))
    return True


# -- lost hosts --------------------------------------------------------------------------------


def mark_lost(now: datetime | None = None) -> list[SandboxHost]:
    """Mark lost every active or draining host whose heartbeat is older than
    HERMIT_HOST_LOST_AFTER (a host that never heartbeated is left alone); return them."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.HERMIT_HOST_LOST_AFTER)
    silent = SandboxHost.objects.filter(
        state__in=[HostState.ACTIVE, HostState.DRAINING], last_heartbeat__lt=cutoff
    )
    lost = []
    for host in silent:
        claimed = SandboxHost.objects.filter(
            pk=host.pk, state=host.state, last_heartbeat__lt=cutoff
        ).update(state=HostState.LOST, state_changed_at=now)
        if claimed:
            log.warning("sandbox host %s missed its heartbeats: marked lost", host.name)
            host.state = HostState.LOST
            lost.append(host)
    return lost


def relocate_lost(host: SandboxHost) -> dict[str, int]:
    """Reassign every sandbox of a lost host to other active hosts; return counts
    (``moved``, ``no-room``). Idempotent: a moved sandbox is no longer the host's."""
    counts = {"moved": 0, "no-room": 0}
    for sandbox in Sandbox.objects.select_related("owner").filter(host=host).order_by("pk"):
        try:
            target = hosts.choose(exclude=host)
        except hosts.NoRoom:
            counts["no-room"] += 1
            continue
        if _relocate(sandbox, host, target):
            counts["moved"] += 1
    return counts


def _relocate(sandbox: Sandbox, lost: SandboxHost, target: SandboxHost) -> bool:
    """Move one sandbox of a lost host to ``target``; return False if it was not the lost
    host's any more (moved meanwhile)."""
    guard = {"host_id": lost.pk}
    try:
        if sandbox.state in (State.STARTING, State.RUNNING, State.DOZING):
            actions.transition(
                sandbox, State.STOPPING, message="Its machine stopped answering", guard=guard
            )
        if sandbox.state == State.STOPPING:
            actions.transition(
                sandbox, State.SLEEPING, message="Asleep", guard=guard, backend_state={}
            )
        elif sandbox.state == State.RESTORING:
            actions.transition(
                sandbox, State.STOPPED, message="Restore abandoned", guard=guard, backend_state={}
            )
    except actions.TransitionRefused:
        return False
    if not Sandbox.objects.filter(pk=sandbox.pk, **guard).update(
        host=target, backend_state={}, boot_queued_at=None
    ):
        return False
    sandbox.host = target
    Checkpoint.objects.filter(sandbox=sandbox).delete()  # the image is on the lost host's disk
    bootqueue.release(sandbox)  # a boot slot on the lost host, or its place in that line
    record_event(sandbox, "moved", _lost_message(sandbox))
    if sandbox.state == State.PROVISIONING:
        from sandboxes import tasks

        transaction.on_commit(lambda: tasks.provision_sandbox.delay(sandbox.pk))
    log.info("sandbox %s: moved off lost host %s to %s", sandbox.pk, lost.name, target.name)
    return True


def _lost_message(sandbox: Sandbox) -> str:
    snapshot = _latest_snapshot(sandbox)
    first = "The machine your agent ran on stopped answering, so it was moved to another one."
    if snapshot is None:
        return f"{first} It had no backup, so it starts fresh, without its data, next time."
    return (
        f"{first} It comes back from its backup of {_when(snapshot.taken_at)} when it next "
        "starts; changes made since then may be lost."
    )

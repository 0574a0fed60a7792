"""Backups, restores and exports of sandboxes: the only writers of backup state.

Contract:

* **One at a time.** Every backup, restore and export of a sandbox holds a lease on its
  BackupRepository row (``lock_token``/``lock_kind``/``locked_until``), claimed with a
  conditional UPDATE and renewed by a thread while the work runs. A second caller gets
  BackupBusy. A worker that is killed stops renewing; its lease expires after
  HERMIT_BACKUP_LEASE_SECONDS, and only reconcile (:func:`reconcile_backups`) takes it over,
  to finish what the dead worker left (everyone else is told to try again shortly). Since
  the lease is the only way to run restic on a repository, whoever holds it may remove
  restic's own locks (``restic.unlock``): it does when it took over an expired lease (the
  dead worker's restic left its lock), and after a restic run failed (a run killed at its
  timeout leaves one). So a killed run's lock never blocks the next, and a healthy run
  spends no restic call on it.
* **Where.** A sandbox's data dir is its volume, where its backend says
  (``SandboxBackend.volume``); all of this runs in the root worker of the sandbox's host.
* **Backups** skip a sandbox whose data dir is unchanged since the last snapshot (by
  ``safefs.fingerprint``, which follows and opens nothing), unless forced. A running sandbox is
  frozen (``backend.frozen``) only while restic reads (the second, short pass of
  ``restic.backup``), so the copy is crash-consistent; the pause is stored on the Snapshot.
  A stopped or sleeping one needs no pause: a start waits for a backup that is reading it
  (:func:`wait_for_backup`), and a backup refuses a sandbox that is starting. After each
  backup the plan's retention is applied and the rows are synced from the repository, which is
  the truth.
* **Restores** never leave the user with less than they had: the snapshot is restored into a
  fresh root-owned directory beside the data dirs and verified while the agent still runs; then
  the agent is stopped and held in the ``restoring`` state, the live data is backed up
  ("pre-restore"), the directories are swapped by renames in the root-owned parent (which never
  follow a sandbox's links), and the agent cold boots. The previous data is deleted only once
  the restored agent answers ``/readyz``; otherwise the swap is undone and the previous data
  started again. A worker killed meanwhile leaves an expired lease, from which
  :func:`reconcile_backups` rolls the restore forward or back without losing either dir.
  A restored dir always cold boots: when checkpoints (hibernation) arrive, a restore must
  clear the sandbox's checkpoint, since OpenClaw checks its SQLite files' device and inode.
* **Restore-on-start** (:func:`restore_if_missing`): a sandbox whose data dir is missing but
  that has snapshots is restored from the latest before it starts; if its backups cannot be
  read, the start fails rather than boot an empty agent.

Every step is a SandboxEvent (kinds ``backup``, ``restore``, ``export``) naming its actor, and
progress ticks are broadcast as provisioning's are. Secrets (the repository password, S3 keys)
reach restic through its environment only; ResticError messages hold none.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.core.files import File
from django.db import close_old_connections, connection
from django.utils import timezone

from sandboxes import actions, alerts, sleep
from sandboxes.backends import get_backend, safefs
from sandboxes.backends.base import BackendError
from sandboxes.backups import EXCLUDES, restic, storage
from sandboxes.events import broadcast_progress, record_event
from sandboxes.limits import limits_for
from sandboxes.models import BackupRepository, Export, Sandbox, SandboxEvent, Snapshot

log = logging.getLogger(__name__)

State = Sandbox.State
Actor = SandboxEvent.Actor
Trigger = Snapshot.Trigger
LockKind = BackupRepository.LockKind
ProgressFn = Callable[[int, str], None]  # percent 0-100, message
T = TypeVar("T")

RESTORE_PREFIX = ".restore-"
PREVIOUS_PREFIX = ".previous-"
FAILED_PREFIX = ".failed-"
# Sandboxes a backup may read: stopped ones as they are, running ones frozen.
BACKUP_STATES = frozenset(
    {State.RUNNING, State.DOZING, State.SLEEPING, State.STOPPED, State.FAILED}
)
# The latest pre-restore snapshots are kept whatever the plan's retention says.
PRE_RESTORE_TAG = f"trigger={Trigger.PRE_RESTORE}"
PRE_RESTORE_KEEP = 3
HELD_MESSAGE = "Held for a restore"  # a stopped, sleeping or failed agent, not a running one
WAIT_PROGRESS_SECONDS = 5.0  # how often a start waiting for a backup says it still waits
TRIGGER_ACTOR: dict[str, str] = {
    Trigger.USER: Actor.USER,
    Trigger.STAFF: Actor.STAFF,
    Trigger.OPS: Actor.STAFF,
}


class BackupBusy(Exception):
    """Another backup, restore or export of this sandbox holds the lease (or it is starting)."""


class BackupFailed(Exception):
    """A backup, restore or export failed; the message says why, for the user and staff."""


# -- the repository and its lease -------------------------------------------------------------


def repository_for(sandbox: Sandbox) -> BackupRepository:
    """Return the sandbox's repository row, creating it (with a new password and id) if needed."""
    row = BackupRepository.objects.filter(sandbox=sandbox).first()
    if row is not None:
        return row
    repo_id = secrets.token_hex(8)
    row, _ = BackupRepository.objects.get_or_create(
        sandbox=sandbox,
        defaults={"repo_id": repo_id, "location": storage.location_for(sandbox.pk, repo_id)},
    )
    return row


def restic_repo(row: BackupRepository) -> restic.Repo:
    return restic.Repo(location=row.location, password=row.password, env=storage.repo_env())


@dataclass
class Lease:
    """A claimed lease on one repository row, renewed by a thread until released."""

    row: BackupRepository
    kind: str
    token: str
    took_over: bool = False  # the previous holder's lease had expired: a killed worker
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise BackupFailed if the lease could not be renewed in time (someone may take it)."""
        if self.lost.is_set():
            raise BackupFailed(
                "This worker lost its hold on the backup repository (it could not renew its "
                "lease in time); stopped so that two runs never overlap."
            )

    def _renew_loop(self, seconds: float) -> None:
        try:
            while not self._stop.wait(max(1.0, seconds / 4)):
                try:
                    renewed = BackupRepository.objects.filter(
                        pk=self.row.pk, lock_token=self.token
                    ).update(locked_until=timezone.now() + timedelta(seconds=seconds))
                except Exception:
                    log.warning("could not renew the backup lease of %s", self.row.pk)
                    close_old_connections()
                    continue
                if not renewed:
                    self.lost.set()
                    return
        finally:
            connection.close()


def _lease_seconds() -> float:
    return float(settings.HERMIT_BACKUP_LEASE_SECONDS)


def claim_lease(row: BackupRepository, kind: str, *, takeover: bool = False) -> Lease:
    """Claim the repository's lease for ``kind`` or raise BackupBusy; start renewing it.

    A lease that expired without being released marks work a dead worker left half done
    (a paused agent, a half-swapped restore): only ``takeover`` (reconcile's recovery, which
    finishes that work) may claim it; anyone else is told to try again shortly.
    """
    now = timezone.now()
    seconds = _lease_seconds()
    token = secrets.token_hex(16)
    claim = {
        "lock_token": token,
        "lock_kind": kind,
        "locked_until": now + timedelta(seconds=seconds),
    }
    mine = BackupRepository.objects.filter(pk=row.pk)
    took_over = False
    claimed = mine.filter(lock_token="").update(**claim)
    if not claimed and takeover:  # left by a worker that died: its lease has run out
        claimed = mine.exclude(lock_token="").filter(locked_until__lte=now).update(**claim)
        took_over = bool(claimed)
    if not claimed:
        holder = BackupRepository.objects.filter(pk=row.pk).first()
        what = (holder.lock_kind if holder else "") or "backup"
        until = holder.locked_until if holder else None
        if until is not None and until <= now:
            raise BackupBusy(
                f"An interrupted {what} of this agent is being recovered; try again shortly."
            )
        raise BackupBusy(
            f"A {what} of this agent is already running; try again when it has finished."
        )
    lease = Lease(row=row, kind=kind, token=token, took_over=took_over)
    lease._thread = threading.Thread(
        target=lease._renew_loop, args=(seconds,), name=f"backup-lease-{row.pk}", daemon=True
    )
    lease._thread.start()
    return lease


def release_lease(lease: Lease) -> None:
    lease._stop.set()
    if lease._thread is not None:
        lease._thread.join()
    BackupRepository.objects.filter(pk=lease.row.pk, lock_token=lease.token).update(
        lock_token="", lock_kind="", locked_until=None
    )


@contextlib.contextmanager
def leased(sandbox: Sandbox, kind: str) -> Iterator[tuple[Lease, restic.Repo]]:
    """Hold the sandbox's repository lease for the block; yield it and the restic Repo, with
    the repository created, and unlocked if a dead worker may have left a lock in it.

    A restic failure in the block is raised as BackupFailed, after removing any lock the
    failed run left (the lease says no other restic works on the repository).
    """
    row = repository_for(sandbox)
    lease = claim_lease(row, kind)
    repo = restic_repo(row)
    try:
        row.refresh_from_db()
        repo = restic_repo(row)
        _ensure_initialized(row, repo)
        if lease.took_over:
            restic.unlock(repo)
        yield lease, repo
    except storage.StorageError as exc:  # the bucket is unreachable or refused: nothing to unlock
        raise BackupFailed(str(exc)) from exc
    except (restic.ResticError, BackupFailed) as exc:
        cause = exc if isinstance(exc, restic.ResticError) else exc.__cause__
        if isinstance(cause, restic.ResticError) and cause.kind not in ("missing", "password"):
            with contextlib.suppress(restic.ResticError):
                restic.unlock(repo)
        if isinstance(exc, BackupFailed):
            raise
        raise BackupFailed(str(exc)) from exc
    finally:
        release_lease(lease)


def _ensure_initialized(row: BackupRepository, repo: restic.Repo) -> None:
    if row.initialized_at is not None:
        return
    storage.ensure_bucket()
    restic.init(repo)
    row.initialized_at = timezone.now()
    BackupRepository.objects.filter(pk=row.pk).update(initialized_at=row.initialized_at)


def unlocked(repo: restic.Repo, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a restic ``step`` under the caller's lease; if a lock a dead run left blocks it
    (restic says "locked"), remove the locks and run it once more."""
    try:
        return step(repo, *args, **kwargs)
    except restic.ResticError as exc:
        if exc.kind != "locked":
            raise
    restic.unlock(repo)
    return step(repo, *args, **kwargs)


def wait_for_backup(sandbox: Sandbox, timeout: float | None = None) -> bool:
    """Wait while a backup reads the sandbox's data (a start calls this once it is starting,
    so the backup never sees files change under it). Return True if it had to wait.

    Waits as long as the backup's lease is held and renewed (its worker is alive, however long
    it reads), up to ``timeout`` seconds (default HERMIT_BACKUP_TIMEOUT, the longest restic may
    run); the waiting is shown as progress. Returns once the lease is released or has expired
    (its worker died, and restic with it). Raises BackupFailed if it is still held then: better
    a start that fails saying why than an agent that changes its files under a backup.
    """
    limit = float(settings.HERMIT_BACKUP_TIMEOUT) if timeout is None else timeout
    started = time.monotonic()
    shown = -1.0
    while True:
        busy = BackupRepository.objects.filter(
            sandbox=sandbox, lock_kind=LockKind.BACKUP, locked_until__gt=timezone.now()
        ).exclude(lock_token="")
        if not busy.exists():
            return shown >= 0
        waited = time.monotonic() - started
        if waited >= limit:
            raise BackupFailed(
                f"A backup of this agent has been reading its data for {waited:.0f} s and is "
                "still running; try starting it again once the backup has finished."
            )
        if shown < 0 or waited - shown >= WAIT_PROGRESS_SECONDS:
            shown = waited
            done = f" ({waited:.0f} s so far)" if waited >= 1 else ""
            broadcast_progress(sandbox, 6, f"Finishing a backup of your agent{done}")
        time.sleep(0.2)


# -- backup ------------------------------------------------------------------------------------


def backup_sandbox(
    sandbox: Sandbox,
    *,
    trigger: str,
    actor: str | None = None,
    actor_user: Any = None,
    force: bool = False,
    on_progress: ProgressFn | None = None,
) -> Snapshot | None:
    """Back up the sandbox's data dir; return the new Snapshot, or None if nothing changed
    since the last one (and ``force`` is False).

    Raises BackupBusy if another backup, restore or export holds the sandbox's lease or the
    sandbox is starting, stopping or restoring; BackupFailed (recorded as an event) if it has
    no data or restic fails.
    """
    actor = actor or TRIGGER_ACTOR.get(trigger, Actor.SYSTEM)
    sandbox.refresh_from_db()
    if not _is_dir(_volume(sandbox)):
        reason = "This agent has no data to back up yet."
        if actor_user is not None:  # a person asked: tell them
            record_event(sandbox, "backup", reason, actor=actor, actor_user=actor_user)
        raise BackupFailed(reason)
    _check_backup_state(sandbox)
    recorded = False
    try:
        with leased(sandbox, LockKind.BACKUP) as (lease, repo):
            sandbox.refresh_from_db()  # after the claim: a start that began before waits for us
            _check_backup_state(sandbox)
            report = _Reporter(sandbox, "backup", actor, actor_user, on_progress)
            try:
                return _backup(
                    sandbox,
                    lease,
                    repo,
                    trigger=trigger,
                    actor_user=actor_user,
                    force=force,
                    report=report,
                    retention=True,
                )
            except (restic.ResticError, BackendError, OSError) as exc:
                recorded = True
                report.event(f"Backup failed: {_reason(exc)}", 100)
                _attempted(sandbox)
                raise BackupFailed(_reason(exc)) from exc
    except BackupFailed as exc:
        if not recorded:  # the repository could not be set up (storage, restic init)
            record_event(
                sandbox, "backup", f"Backup failed: {exc}", actor=actor, actor_user=actor_user
            )
            _attempted(sandbox)
        alerts.backup_failed(sandbox, str(exc))  # once, until a backup succeeds again
        raise


def _attempted(sandbox: Sandbox) -> None:
    """Note a failed attempt, so the schedule tries again after the plan's interval."""
    BackupRepository.objects.filter(sandbox=sandbox).update(last_attempt_at=timezone.now())


def _check_backup_state(sandbox: Sandbox) -> None:
    if sandbox.state not in BACKUP_STATES:
        raise BackupBusy(f"The agent is {sandbox.state}; it will be backed up later.")


def _backup(
    sandbox: Sandbox,
    lease: Lease,
    repo: restic.Repo,
    *,
    trigger: str,
    actor_user: Any,
    force: bool,
    report: _Reporter,
    retention: bool,
) -> Snapshot | None:
    row = lease.row
    row.refresh_from_db()
    now = timezone.now()
    fingerprint = safefs.fingerprint(_volume(sandbox), EXCLUDES)
    latest = sandbox.snapshots.first()
    if not force and latest is not None and fingerprint == row.fingerprint:
        BackupRepository.objects.filter(pk=row.pk).update(last_attempt_at=now)
        report.event("Unchanged since the last snapshot; no backup needed", 100)
        return None
    running = sandbox.state in (State.RUNNING, State.DOZING) and bool(sandbox.backend_state)
    report.event("Backing up your agent" + (" (paused while it is read)" if running else ""), 5)
    backend = get_backend(sandbox.backend)
    spec = actions.spec_for(sandbox)
    summary = unlocked(
        repo,
        restic.backup,
        _volume(sandbox),
        tags=[f"trigger={trigger}"],
        host=sandbox.slug,
        excludes=list(EXCLUDES),
        on_progress=report.scaled(10, 90),
        parent=latest.restic_id if latest is not None else None,
        # Running: frozen only while restic reads (its second pass, see restic.backup).
        pause=(lambda: backend.frozen(spec, sandbox.backend_state)) if running else None,
    )
    lease.check()
    snapshot, _ = Snapshot.objects.update_or_create(
        sandbox=sandbox,
        restic_id=summary.snapshot_id,
        defaults={
            "taken_at": summary.time,
            "trigger": trigger,
            "actor_user": actor_user,
            "files": summary.total_files,
            "size_bytes": summary.total_bytes,
            "added_bytes": summary.data_added,
            "pause_ms": round(summary.pause_seconds * 1000) if running else None,
        },
    )
    BackupRepository.objects.filter(pk=row.pk).update(
        fingerprint=fingerprint, last_backup_at=now, last_attempt_at=now
    )
    if retention:
        report.tick("Applying the plan's retention", 95)
        _apply_retention(sandbox, repo, summary.listed or None)
    pause = f", paused {snapshot.pause_ms} ms" if snapshot.pause_ms is not None else ""
    report.event(
        f"Backed up snapshot {snapshot.short_id}: {summary.total_files} files, "
        f"{_size(summary.data_added)} new{pause}",
        100,
    )
    return snapshot


def apply_retention(sandbox: Sandbox) -> list[str]:
    """Forget (and prune) the snapshots the owner's plan does not keep; return their ids."""
    with leased(sandbox, LockKind.BACKUP) as (_lease, repo):
        return _apply_retention(sandbox, repo)


def _apply_retention(
    sandbox: Sandbox, repo: restic.Repo, listed: Sequence[restic.SnapshotInfo] | None = None
) -> list[str]:
    """Apply the plan's policy, except to the latest PRE_RESTORE_KEEP pre-restore snapshots,
    which are kept whatever the plan (a restore's confirmation promises the user can come back
    to the data it replaced); older pre-restore ones are forgotten.

    ``listed``: the repository's snapshots, as the backup just made left them (see
    ``restic.forget``); without it restic lists them."""
    plan = limits_for(sandbox.owner)
    removed = unlocked(
        repo,
        restic.forget,
        keep_last=PRE_RESTORE_KEEP,
        keep_daily=0,
        keep_weekly=0,
        tags=[PRE_RESTORE_TAG],
        prune=False,
        listed=listed,
    )
    if listed is not None:
        listed = [s for s in listed if s.id not in removed]
    removed += unlocked(
        repo,
        restic.forget,
        keep_last=plan.backup_keep_last,
        keep_daily=plan.backup_keep_daily,
        keep_weekly=plan.backup_keep_weekly,
        keep_tags=[PRE_RESTORE_TAG],
        listed=listed,
    )
    if removed:
        Snapshot.objects.filter(sandbox=sandbox, restic_id__in=removed).delete()
        record_event(sandbox, "backup", f"Retention removed {len(removed)} old snapshot(s)")
    return removed


def sync_snapshots(sandbox: Sandbox) -> list[Snapshot]:
    """Make the Snapshot rows match the repository's snapshots; return them, newest first.

    Rows of snapshots the repository no longer has are deleted; snapshots without a row (say,
    after the database was restored from an older dump) get one, their trigger read from the
    tag the backup gave them.
    """
    with leased(sandbox, LockKind.BACKUP) as (_lease, repo):
        return _sync(sandbox, repo)


def _sync(sandbox: Sandbox, repo: restic.Repo) -> list[Snapshot]:
    infos = restic.snapshots(repo)
    ids = {info.id for info in infos}
    Snapshot.objects.filter(sandbox=sandbox).exclude(restic_id__in=ids).delete()
    known = set(Snapshot.objects.filter(sandbox=sandbox).values_list("restic_id", flat=True))
    triggers = set(Trigger.values)
    for info in infos:
        if info.id in known:
            continue
        tagged = [t.split("=", 1)[1] for t in info.tags if t.startswith("trigger=")]
        trigger = tagged[0] if tagged and tagged[0] in triggers else Trigger.OPS
        Snapshot.objects.get_or_create(
            sandbox=sandbox,
            restic_id=info.id,
            defaults={"taken_at": info.time, "trigger": trigger},
        )
    return list(Snapshot.objects.filter(sandbox=sandbox))


# -- restore -----------------------------------------------------------------------------------


def restore_sandbox(
    sandbox: Sandbox,
    snapshot: Snapshot | None = None,
    *,
    actor: str = Actor.SYSTEM,
    actor_user: Any = None,
    on_progress: ProgressFn | None = None,
) -> None:
    """Restore ``snapshot`` (default: the latest) as the sandbox's data and start it.

    See the module docstring for the steps. Raises BackupBusy if another backup, restore or
    export holds the lease, or the sandbox is starting or stopping; BackupFailed, with the live
    data untouched (or back in place), if the snapshot cannot be restored or verified, or the
    restored agent never answers ``/readyz``.
    """
    sandbox.refresh_from_db()
    _check_restore_state(sandbox)
    with leased(sandbox, LockKind.RESTORE) as (lease, repo):
        sandbox.refresh_from_db()
        _check_restore_state(sandbox)
        report = _Reporter(sandbox, "restore", actor, actor_user, on_progress)
        snapshot = _chosen(sandbox, repo, snapshot)
        report.event(f"Restoring snapshot {snapshot.short_id} of {_when(snapshot.taken_at)}", 1)
        fresh = _restore_fresh(sandbox, repo, snapshot, report, 2, 60)
        sandbox.refresh_from_db()  # the restore may have taken long: act on the state now
        was_running = sandbox.state in (State.RUNNING, State.DOZING)
        try:
            _stop_for_restore(sandbox, actor, actor_user)
            lease.check()
            if _is_dir(_volume(sandbox)):
                report.event("Backing up the current data first (pre-restore snapshot)", 62)
                _backup(
                    sandbox,
                    lease,
                    repo,
                    trigger=Trigger.PRE_RESTORE,
                    actor_user=actor_user,
                    force=True,  # the user's way back, even if unchanged since the last one
                    report=report.quiet(62, 74),
                    retention=False,
                )
            lease.check()
        except BaseException as exc:
            _remove(sandbox, fresh)
            _resume_after_abort(sandbox, was_running, actor, actor_user)
            failed = restic.ResticError | BackendError | OSError | actions.TransitionRefused
            if isinstance(exc, failed):
                report.event(f"Restore failed: {_reason(exc)}; your agent is unchanged", 100)
                raise BackupFailed(f"{_reason(exc)} Your agent's data is unchanged.") from exc
            raise
        previous = _swap_in(sandbox, fresh)
        sleep.drop_checkpoint(sandbox, "the data was restored from a backup")
        report.event("Restored data in place; starting your agent", 75)
        _start_or_roll_back(sandbox, previous, actor, actor_user, report)
        report.event(f"Restored snapshot {snapshot.short_id}; your agent is running", 100)


def _check_restore_state(sandbox: Sandbox) -> None:
    if sandbox.state not in BACKUP_STATES:
        raise BackupBusy(f"The agent is {sandbox.state}; try the restore again shortly.")


def _chosen(sandbox: Sandbox, repo: restic.Repo, snapshot: Snapshot | None) -> Snapshot:
    if snapshot is not None:
        if snapshot.sandbox_id != sandbox.pk:
            raise BackupFailed("That snapshot belongs to another agent.")
        return snapshot
    latest = sandbox.snapshots.first()
    if latest is None:
        synced = _sync(sandbox, repo)
        latest = synced[0] if synced else None
    if latest is None:
        raise BackupFailed("This agent has no snapshots to restore.")
    return latest


def _restore_fresh(
    sandbox: Sandbox,
    repo: restic.Repo,
    snapshot: Snapshot,
    report: _Reporter,
    low: int,
    high: int,
) -> Path:
    """Restore ``snapshot`` into a new root-owned dir beside the data dirs; return it.

    The dir is on the data dirs' filesystem (so the swap is a rename) and in their root-owned
    parent, which the sandbox cannot reach. It is removed again if anything fails.
    """
    parent = _volume(sandbox).parent
    parent.mkdir(parents=True, exist_ok=True)
    fresh = parent / f"{RESTORE_PREFIX}{sandbox.pk}-{secrets.token_hex(6)}"
    os.mkdir(fresh, 0o700)
    try:
        restic.restore(repo, snapshot.restic_id, fresh, on_progress=report.scaled(low, high))
    except BaseException as exc:
        _remove(sandbox, fresh)
        if isinstance(exc, restic.ResticError):
            report.event(f"Restore failed: {exc}; your agent is unchanged", 100)
            raise BackupFailed(f"{exc} Your agent's data is unchanged.") from exc
        raise
    return fresh


def _stop_for_restore(sandbox: Sandbox, actor: str, actor_user: Any) -> None:
    """Stop the sandbox into ``restoring`` (no one can start it meanwhile), or raise
    BackupFailed. Stopping this way queues no backup: the restore takes its own."""
    if sandbox.state == State.RUNNING or sandbox.backend_state:
        actions.stop_sandbox(sandbox, actor=actor, actor_user=actor_user, to=State.RESTORING)
    else:
        actions.transition(
            sandbox,
            State.RESTORING,
            actor=actor,
            actor_user=actor_user,
            message=HELD_MESSAGE,
            backend_state={},
        )
    if sandbox.state != State.RESTORING:
        raise BackupFailed(f"The agent could not be stopped: {sandbox.error_message}")


def _resume_after_abort(sandbox: Sandbox, was_running: bool, actor: str, actor_user: Any) -> None:
    """After a restore gave up before the swap: the agent as it was, on its own data."""
    sandbox.refresh_from_db()
    if sandbox.state != State.RESTORING:
        return
    if was_running:
        _start_quietly(sandbox, actor, actor_user)
    else:
        actions.transition(sandbox, State.STOPPED, actor=actor, message="Restore abandoned")


def _swap_in(sandbox: Sandbox, fresh: Path) -> Path | None:
    """Rename the live data dir aside and ``fresh`` into its place; return where the previous
    data went (None if there was none). Both renames happen in the root-owned parent through
    its directory fd, so no link the sandbox planted is followed."""
    volume = _volume(sandbox)
    parent, live = volume.parent, volume.name
    stamp = timezone.now().strftime("%Y%m%dT%H%M%S%f")  # sorts by time: newest last
    previous_name = f"{PREVIOUS_PREFIX}{sandbox.pk}-{stamp}-{fresh.name.rsplit('-', 1)[1]}"
    with safefs.opened_dir(parent) as fd:
        had_live = _entry_is_dir(fd, live)
        if had_live:
            os.rename(live, previous_name, src_dir_fd=fd, dst_dir_fd=fd)
        try:
            os.rename(fresh.name, live, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            if had_live:
                os.rename(previous_name, live, src_dir_fd=fd, dst_dir_fd=fd)
            raise
        os.fsync(fd)
    # A checkpoint cannot be restored onto the new inodes (restore_sandbox drops it).
    Sandbox.objects.filter(pk=sandbox.pk).update(backend_state={})
    sandbox.backend_state = {}
    return parent / previous_name if had_live else None


def _start_or_roll_back(
    sandbox: Sandbox, previous: Path | None, actor: str, actor_user: Any, report: _Reporter
) -> None:
    """Cold start the sandbox (now ``restoring``) on its restored data. Once it answers
    ``/readyz`` delete ``previous``; if it does not, put ``previous`` back, start that, and
    raise BackupFailed."""
    error = _start_quietly(sandbox, actor, actor_user, report)
    if error is None:
        if previous is not None:
            _remove(sandbox, previous)
        return
    report.event(f"The restored agent did not start ({error}); putting the previous data back", 90)
    sandbox.refresh_from_db()  # failed (the backend cleaned up), or still restoring if refused
    if previous is not None:
        _swap_back(sandbox, previous)
    again = None
    if sandbox.state == State.RESTORING:
        actions.transition(sandbox, State.STOPPED, actor=actor, message="Restore rolled back")
    elif previous is not None:
        again = _start_quietly(sandbox, actor, actor_user)
    kept = "your agent is back as it was" if previous is not None else "nothing was replaced"
    report.event(f"Restore rolled back: {kept}", 100)
    raise BackupFailed(
        f"The restored agent did not start ({error}); {kept}."
        + (f" It did not start either: {again}" if again else "")
    )


def _swap_back(sandbox: Sandbox, previous: Path) -> None:
    volume = _volume(sandbox)
    parent, live = volume.parent, volume.name
    failed_name = f"{FAILED_PREFIX}{sandbox.pk}-{secrets.token_hex(6)}"
    with safefs.opened_dir(parent) as fd:
        if _entry_is_dir(fd, live):
            os.rename(live, failed_name, src_dir_fd=fd, dst_dir_fd=fd)
        os.rename(previous.name, live, src_dir_fd=fd, dst_dir_fd=fd)
        os.fsync(fd)
    _remove(sandbox, parent / failed_name)


def _start_quietly(
    sandbox: Sandbox, actor: str, actor_user: Any, report: _Reporter | None = None
) -> str | None:
    """Start the sandbox (an explicit start); return None once it runs, else why not. The
    start records its own steps; ``report`` only shows them to its caller (76-99%)."""
    try:
        for step in actions.start_sandbox(
            sandbox, actor=actor, actor_user=actor_user, explicit=True, restoring=True
        ):
            if report is not None and report.on_progress is not None:
                report.on_progress(76 + step.percent * 23 // 100, step.message)
    except actions.TransitionRefused as exc:
        return str(exc)
    sandbox.refresh_from_db()
    if sandbox.state == State.RUNNING:
        return None
    reason = sandbox.error_message or f"it ended {sandbox.state}"
    return reason.splitlines()[0]  # the first line says what; the log tail is on the sandbox


def restore_if_missing(sandbox: Sandbox, on_progress: ProgressFn | None = None) -> bool:
    """Restore a sandbox whose data dir is missing from its latest snapshot; return True if
    it did. Called by a start before it builds the spec (which would make an empty data dir).

    Returns False if the data dir exists or the sandbox never had a backup. Raises
    BackupFailed if it had backups that cannot be read or restored: better a failed start
    with that reason than an agent booted empty.
    """
    if _is_dir(_volume(sandbox)):
        return False
    row = BackupRepository.objects.filter(sandbox=sandbox).first()
    if row is None or (row.last_backup_at is None and not sandbox.snapshots.exists()):
        return False
    try:
        with leased(sandbox, LockKind.RESTORE) as (_lease, repo):
            if _is_dir(_volume(sandbox)):
                return False
            report = _Reporter(sandbox, "restore", Actor.SYSTEM, None, on_progress)
            infos = _sync(sandbox, repo)
            if not infos:
                raise BackupFailed(
                    "This agent's data is missing and its backup repository holds no "
                    "snapshot; it was not started empty. Ask support to look into it."
                )
            snapshot = infos[0]
            report.event(
                f"This agent's data is missing: restoring snapshot {snapshot.short_id} of "
                f"{_when(snapshot.taken_at)}",
                6,
            )
            fresh = _restore_fresh(sandbox, repo, snapshot, report, 6, 9)
            _swap_in(sandbox, fresh)
            report.event(f"Restored snapshot {snapshot.short_id}", 9)
            return True
    except BackupBusy as exc:
        raise BackupFailed(
            f"This agent's data is missing and cannot be restored now: {exc}"
        ) from exc
    except (BackupFailed, storage.StorageError, OSError) as exc:
        raise BackupFailed(
            "This agent's data is missing and could not be restored from its backups: "
            + _reason(exc)
        ) from exc


def reconcile_backups(sandbox: Sandbox) -> str | None:
    """Repair what a backup or restore whose worker died left behind; return what was done, or
    None if there is nothing to repair (reconcile then goes on as usual).

    A dead worker's lease stays on the row until it expires, and marks the work to finish:

    * a backup's: a running sandbox may still be paused, so it is resumed
      (``backup-recovered``; see :func:`_recover_backup`);
    * a restore's, sandbox ``restoring``: ``rolled-back`` if the swap was half done (the
      previous data put back and started), ``rolled-forward`` if the restored data was in
      place (started on it, the previous data kept until it answers ``/readyz``, and put back
      if it does not), ``resumed`` if nothing had changed yet (started as it was);
    * a restore's, sandbox past ``restoring`` with the previous data still beside it (the
      worker died while the restored agent started): running, so the restored agent answered:
      the previous data is deleted (``restore-finished``); failed or stopped: the previous data
      is put back and started (``rolled-back``); starting: left until the start settles.

    ``pending`` while the lease is alive. Never deletes a previous data dir unless an agent on
    the restored one runs.
    """
    row = BackupRepository.objects.filter(sandbox=sandbox).first()
    if row is None:
        return None
    if row.is_locked(timezone.now()):
        return "pending" if sandbox.state == State.RESTORING else None
    if not row.lock_token and sandbox.state != State.RESTORING:
        return None
    if sandbox.state in (State.STARTING, State.STOPPING, State.PROVISIONING):
        return None  # let it settle first; the expired lease still marks the work
    kind = row.lock_kind or LockKind.RESTORE
    try:
        lease = claim_lease(row, kind, takeover=True)
    except BackupBusy:
        return "pending"
    start_after = restart = False
    try:
        sandbox.refresh_from_db()
        if lease.took_over and row.initialized_at is not None:
            with contextlib.suppress(restic.ResticError):
                restic.unlock(restic_repo(row))  # the dead worker's restic left its lock
        if kind != LockKind.RESTORE:
            outcome, restart = _recover_backup(sandbox, kind)
        else:
            outcome, start_after = _recover_restore(sandbox)
    except (OSError, BackendError, actions.TransitionRefused) as exc:
        # Recorded, not raised: the rest of reconcile goes on, and the next pass tries again.
        log.warning("could not recover sandbox %s's %s: %s", sandbox.pk, kind, exc)
        record_event(sandbox, kind, f"Could not finish an interrupted {kind}: {_reason(exc)}")
        return "recovery-failed"
    finally:
        release_lease(lease)
    # Outside the lease: a start waits for a backup's lease, and restores a missing data dir
    # under its own.
    if start_after:
        _start_quietly(sandbox, Actor.SYSTEM, None)
    if restart:
        with contextlib.suppress(actions.TransitionRefused):
            for _ in actions.restart_sandbox(sandbox):
                pass
    return outcome


def _recover_backup(sandbox: Sandbox, kind: str) -> tuple[str, bool]:
    """Clear a dead backup's (or export's) lease; return (outcome, restart the sandbox).

    A backup that died while its sandbox was paused leaves it paused: a sandbox the database
    says is running is resumed (``backend.thaw``), and restarted only if that fails.
    """
    if kind == LockKind.BACKUP and sandbox.state == State.RUNNING and sandbox.backend_state:
        try:
            get_backend(sandbox.backend).thaw(actions.spec_for(sandbox), sandbox.backend_state)
        except (BackendError, NotImplementedError) as exc:
            record_event(
                sandbox, kind, f"A backup was interrupted and its pause stuck ({exc}); restarting"
            )
            return "backup-recovered", True
        record_event(sandbox, kind, "A backup was interrupted; the agent it paused runs again")
        return "backup-recovered", False
    record_event(sandbox, kind, f"An interrupted {kind} was cleared")
    return "backup-recovered", False


def _recover_restore(sandbox: Sandbox) -> tuple[str, bool]:
    """Finish an interrupted restore (see reconcile_backups); return (outcome, start after)."""
    parent = _volume(sandbox).parent
    for prefix in (RESTORE_PREFIX, FAILED_PREFIX):
        for leftover in parent.glob(f"{prefix}{sandbox.pk}-*"):
            _remove(sandbox, leftover)
    # Named with the swap's time (see _swap_in): the newest name is the latest swap's.
    found = parent.glob(f"{PREVIOUS_PREFIX}{sandbox.pk}-*")
    previous = sorted(found, key=lambda p: p.name)[-1:]
    report = _Reporter(sandbox, "restore", Actor.SYSTEM, None, None)
    if sandbox.state == State.RUNNING:
        if previous:
            _remove(sandbox, previous[0])
            report.event("An interrupted restore had finished: its previous data removed", 100)
        return "restore-finished", False
    if previous and not _is_dir(_volume(sandbox)):
        report.event("A restore was interrupted mid-swap: putting the previous data back", 50)
        _swap_back(sandbox, previous[0])
        return "rolled-back", True
    if previous and sandbox.state == State.RESTORING:
        report.event("A restore was interrupted: starting the restored data", 50)
        try:
            _start_or_roll_back(sandbox, previous[0], Actor.SYSTEM, None, report)
        except BackupFailed:
            return "rolled-back", False
        return "rolled-forward", False
    if previous:  # the restored agent failed, or was stopped, before it answered
        report.event("A restore was interrupted: putting the previous data back", 50)
        _swap_back(sandbox, previous[0])
        return "rolled-back", True
    if sandbox.state == State.RESTORING:
        if not _was_running_before_restore(sandbox):
            report.event("A restore was interrupted before it changed anything", 50)
            actions.transition(sandbox, State.STOPPED, message="Restore abandoned")
            return "resumed", False
        report.event("A restore was interrupted before it changed anything: starting again", 50)
        return "resumed", True
    return "restore-recovered", False


def _was_running_before_restore(sandbox: Sandbox) -> bool:
    """Whether the restore that holds the sandbox stopped a running agent (it was not, if it
    was only held: see _stop_for_restore)."""
    held = sandbox.events.filter(kind="state", state=State.RESTORING).order_by("-created_at")
    last = held.values_list("message", flat=True).first()
    return last != HELD_MESSAGE


# -- export and purge --------------------------------------------------------------------------


def export_snapshot(
    sandbox: Sandbox, snapshot: Snapshot | None = None, *, actor_user: Any = None
) -> Export:
    """Write a .tar.gz of ``snapshot`` (default: the latest) to the export storage; return the
    ready Export, which expires after HERMIT_EXPORT_TTL seconds. Raises BackupBusy or
    BackupFailed (the Export is then marked failed)."""
    if actor_user is None:
        actor = Actor.SYSTEM
    else:
        actor = Actor.USER if actor_user.pk == sandbox.owner_id else Actor.STAFF
    now = timezone.now()
    export = Export.objects.create(
        sandbox=sandbox,
        snapshot=snapshot,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.HERMIT_EXPORT_TTL),
    )
    try:
        with leased(sandbox, LockKind.EXPORT) as (_lease, repo):
            report = _Reporter(sandbox, "export", actor, actor_user, None)
            chosen = _chosen(sandbox, repo, snapshot)
            Export.objects.filter(pk=export.pk).update(snapshot=chosen)
            report.event(f"Packing snapshot {chosen.short_id} for download", 10)
            name, size = _write_archive(sandbox, repo, chosen, export)
            Export.objects.filter(pk=export.pk).update(
                state=Export.State.READY, storage_name=name, size_bytes=size
            )
            report.event(f"Your download of snapshot {chosen.short_id} is ready", 100)
    except (BackupBusy, BackupFailed, restic.ResticError, OSError) as exc:
        Export.objects.filter(pk=export.pk).update(state=Export.State.FAILED, error=_reason(exc))
        if isinstance(exc, BackupBusy):
            raise
        record_event(
            sandbox, "export", f"Export failed: {_reason(exc)}", actor=actor, actor_user=actor_user
        )
        raise BackupFailed(_reason(exc)) from exc
    export.refresh_from_db()
    return export


def _write_archive(
    sandbox: Sandbox, repo: restic.Repo, snapshot: Snapshot, export: Export
) -> tuple[str, int]:
    store = storage.export_storage()
    name = f"sandbox-{sandbox.pk}/hermit-agent-{snapshot.short_id}-{secrets.token_hex(8)}.tar.gz"
    with tempfile.TemporaryFile() as tmp:
        with gzip.GzipFile(fileobj=tmp, mode="wb") as gz:
            restic.dump_archive(repo, snapshot.restic_id, gz)  # type: ignore[arg-type]
        size = tmp.tell()
        tmp.seek(0)
        saved = store.save(name, File(tmp, name=name))
    return saved, size


def delete_expired_exports(now: datetime | None = None) -> int:
    """Delete the files and rows of exports that expired; return how many."""
    now = now or timezone.now()
    expired = Export.objects.filter(expires_at__lte=now)
    count = 0
    store = None
    for export in expired:
        if export.storage_name:
            store = store or storage.export_storage()
            with contextlib.suppress(Exception):
                store.delete(export.storage_name)
        export.delete()
        count += 1
    return count


def purge_backups(location: str) -> None:
    """Delete a repository (a deleted sandbox's) wherever it lives. Idempotent."""
    storage.delete_location(location)


# -- helpers -----------------------------------------------------------------------------------


class _Reporter:
    """Records the steps of one backup/restore/export as events and broadcasts progress."""

    def __init__(
        self,
        sandbox: Sandbox,
        kind: str,
        actor: str,
        actor_user: Any,
        on_progress: ProgressFn | None,
        quiet: bool = False,
        span: tuple[int, int] = (0, 100),
    ) -> None:
        self.sandbox, self.kind, self.actor, self.actor_user = sandbox, kind, actor, actor_user
        self.on_progress = on_progress
        self.silent = quiet
        self.span = span
        self._last = -1

    def quiet(self, low: int, high: int) -> _Reporter:
        """A reporter for a step inside another: ticks only, no events of its own, its 0-100
        shown as ``low``..``high`` of this one's, so the outer bar never jumps back."""
        return _Reporter(
            self.sandbox,
            self.kind,
            self.actor,
            self.actor_user,
            self.on_progress,
            quiet=True,
            span=(self._map(low), self._map(high)),
        )

    def _map(self, percent: float) -> int:
        low, high = self.span
        return low + round((high - low) * max(0.0, min(percent, 100.0)) / 100)

    def event(self, message: str, percent: int) -> None:
        percent = self._map(percent)
        if not self.silent:
            record_event(
                self.sandbox,
                self.kind,
                message,
                progress=percent,
                actor=self.actor,
                actor_user=self.actor_user,
            )
        if self.on_progress is not None:
            self.on_progress(percent, message)

    def tick(self, message: str, percent: int) -> None:
        """Show a step to live listeners without storing it."""
        percent = self._map(percent)
        broadcast_progress(self.sandbox, percent, message)
        if self.on_progress is not None:
            self.on_progress(percent, message)

    def scaled(self, low: int, high: int) -> Callable[[float, str], None]:
        """A restic progress callback (0-100) mapped onto ``low``..``high``."""

        def tick(percent: float, message: str) -> None:
            value = self._map(low + (high - low) * max(0.0, min(percent, 100.0)) / 100)
            if value != self._last:
                self._last = value
                broadcast_progress(self.sandbox, value, message)
            if self.on_progress is not None:
                self.on_progress(value, message)

        return tick


def _volume(sandbox: Sandbox) -> Path:
    """The sandbox's data dir: its volume on this host, as its backend places it. Backups,
    restores and exports run in the root worker of the sandbox's host, beside the volume."""
    return get_backend(sandbox.backend).volume(sandbox.pk)


def has_data(sandbox: Sandbox) -> bool:
    """Return True if the sandbox's data dir exists (checked without following a link)."""
    return _is_dir(_volume(sandbox))


def _is_dir(path: Path) -> bool:
    """Return True if ``path`` is a real directory (a link is not followed)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _entry_is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove(sandbox: Sandbox, path: Path) -> bool:
    """Delete a restore's leftover dir (``safefs.remove_tree``); return False, with the
    reason logged and recorded, if it could not be removed. Never raises: a leftover costs
    disk, not the restore or the recovery."""
    try:
        safefs.remove_tree(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        record_event(sandbox, "restore", f"Could not remove leftover data {path.name}: {exc}")
        return False
    return True


def _reason(exc: BaseException) -> str:
    return str(exc) or exc.__class__.__name__


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000  # type: ignore[assignment]
    return f"{count} B"


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"

"""Everything that changes a sandbox's state. The only writers of Sandbox.state.

Each transition is claimed with a conditional UPDATE (``filter(pk=..., state=old)``), so two
workers racing on the same sandbox cannot both win, and each is recorded as a SandboxEvent.

Who may run: a sandbox starts only while its owner's account is active (every start path ends
in :func:`start_sandbox`, which refuses otherwise), and reconcile stops the sandboxes of
deactivated accounts. A sandbox's first start is asked for (:func:`request_provisioning`) once
its owner may have one: a confirmed email address, or a staff account (made by ops, say with
``createsuperuser``, which has no confirmation step).

Crash back-off: a gateway that crashes HERMIT_CRASH_LIMIT times in a row, each within
HERMIT_CRASH_WINDOW of its start, stays failed with ``restart_after`` set HERMIT_CRASH_BACKOFF
ahead, doubling with each further crash up to HERMIT_CRASH_BACKOFF_MAX (:func:`mark_crashed`).
Until then no automatic start happens (reconcile, a chat or Control UI wake):
:func:`start_sandbox` raises CrashBackoff. An explicit start (the owner's "Try again", staff in
the admin or the CLI) is allowed once HERMIT_CRASH_BACKOFF has passed since the last crash. A
restart after a crash does not count as activity for the sleep schedule.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Generator, Iterator
from datetime import UTC, timedelta
from functools import partial
from typing import Any

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from sandboxes import ai_keys, bootqueue, runtime, sleep
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError, Progress, SandboxSpec
from sandboxes.events import broadcast_progress, record_event
from sandboxes.limits import ResourceTuple, SandboxLimits, limits_for
from sandboxes.models import BackupRepository, RuntimeImage, Sandbox, SandboxEvent

log = logging.getLogger(__name__)

State = Sandbox.State
Actor = SandboxEvent.Actor

ALLOWED: dict[str, frozenset[str]] = {
    State.PROVISIONING: frozenset({State.STARTING, State.FAILED}),
    State.STARTING: frozenset({State.RUNNING, State.FAILED, State.STOPPING}),
    State.RUNNING: frozenset({State.STOPPING, State.STARTING, State.FAILED, State.DOZING}),
    # Dozing: frozen in place (sandboxes.sleep); thawed back to running, or stopped/hibernated.
    State.DOZING: frozenset({State.RUNNING, State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.SLEEPING, State.FAILED, State.RESTORING}),
    State.SLEEPING: frozenset({State.STARTING, State.STOPPING, State.FAILED, State.RESTORING}),
    State.STOPPED: frozenset({State.STARTING, State.RESTORING}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.RESTORING}),
    # A restore holds a stopped sandbox here (its lease held) while it swaps the data dir.
    State.RESTORING: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
}
ACTIVITY_WRITE_INTERVAL = timedelta(seconds=30)
BOOT_SLOT_RENEW_SECONDS = 30
FAILED_RETRY_AFTER = timedelta(minutes=2)  # always-on sandboxes that failed are retried
PROVISION_REQUEST_AGAIN_AFTER = timedelta(minutes=5)  # a lost provisioning task is asked again
OWNER_INACTIVE_MESSAGE = "This account is deactivated, so its agent cannot start."


class TransitionRefused(Exception):
    """The sandbox is not in a state from which the requested change is allowed."""


RESTORING_MESSAGE = "Your agent is being restored; it starts again once the restore is done."


class OwnerInactive(TransitionRefused):
    """The sandbox's owner is deactivated: it may not start."""


class OwnerSuspended(TransitionRefused):
    """Staff suspended the sandbox's owner: it may not start (the message says why)."""


class CrashBackoff(TransitionRefused):
    """The sandbox crashed repeatedly: it may not start yet."""


def crash_backoff(crashes: int) -> timedelta | None:
    """Return how long automatic starts wait after ``crashes`` crashes in a row, or None."""
    over = crashes - settings.HERMIT_CRASH_LIMIT
    if over < 0:
        return None
    longest = timedelta(seconds=settings.HERMIT_CRASH_BACKOFF_MAX)
    return min(timedelta(seconds=settings.HERMIT_CRASH_BACKOFF) * 2 ** min(over, 30), longest)


def backoff_message(restart_after: Any) -> str:
    return (
        "Your agent crashed repeatedly; it will be retried at "
        f"{restart_after.astimezone(UTC):%H:%M} UTC."
    )


def check_crash_backoff(sandbox: Sandbox, *, explicit: bool) -> None:
    """Raise CrashBackoff if repeated crashes hold off this start (see the module docstring)."""
    now = timezone.now()
    if not sandbox.in_crash_backoff(now):
        return
    pause = timedelta(seconds=settings.HERMIT_CRASH_BACKOFF)
    if explicit and (sandbox.last_crash_at is None or now - sandbox.last_crash_at >= pause):
        return
    raise CrashBackoff(backoff_message(sandbox.restart_after))


def suspension_notice(sandbox: Sandbox) -> str:
    """Return why the sandbox's owner is suspended, or "" if they are not (sandboxes.accounts)."""
    from sandboxes.accounts import suspension_notice

    return suspension_notice(sandbox.owner)


def owner_is_active(sandbox: Sandbox) -> bool:
    """Return True if the sandbox's owner is active now (read fresh, not from a cached row)."""
    return get_user_model().objects.filter(pk=sandbox.owner_id, is_active=True).exists()


def may_provision(user: Any) -> bool:
    """Return True if ``user`` may have a sandbox started: an active account that is staff, has
    a confirmed email address, or signed up where confirming one is not mandatory."""
    if not user.is_active:
        return False
    if user.is_staff or settings.ACCOUNT_EMAIL_VERIFICATION != "mandatory":
        return True
    return EmailAddress.objects.filter(user=user, verified=True).exists()


def request_provisioning(sandbox: Sandbox, *, actor_user: Any = None) -> bool:
    """Note that the first start of ``sandbox`` is asked for; return True if the caller should
    enqueue it now.

    False if the sandbox is not provisioning, its owner may not have one yet (see
    :func:`may_provision`), or a request was made in the last PROVISION_REQUEST_AGAIN_AFTER
    (so a page that is reloaded does not queue the same work again). Two requests racing may
    both return True: the provisioning task is idempotent, so one start happens.
    """
    if sandbox.state != State.PROVISIONING or not may_provision(sandbox.owner):
        return False
    recent = timezone.now() - PROVISION_REQUEST_AGAIN_AFTER
    if sandbox.events.filter(kind="queued", created_at__gte=recent).exists():
        return False
    record_event(
        sandbox,
        "queued",
        "Your agent is queued to start",
        progress=1,
        actor=Actor.USER if actor_user is not None else Actor.SYSTEM,
        actor_user=actor_user,
    )
    return True


def transition(
    sandbox: Sandbox,
    to: str,
    *,
    actor: str = Actor.SYSTEM,
    actor_user: Any = None,
    message: str = "",
    progress: int | None = None,
    guard: dict[str, Any] | None = None,
    **fields: Any,
) -> None:
    """Move ``sandbox`` to state ``to``, or raise TransitionRefused.

    The move is claimed atomically against the state read from the database (and the
    lookups in ``guard``, e.g. no activity since some time); extra ``fields`` are written in
    the same UPDATE.
    """
    current = sandbox.state
    if to not in ALLOWED[current]:
        raise TransitionRefused(f"A sandbox that is {current} cannot become {to}.")
    now = timezone.now()
    claimed = Sandbox.objects.filter(pk=sandbox.pk, state=current, **(guard or {})).update(
        state=to, updated_at=now, **fields
    )
    if not claimed:
        sandbox.refresh_from_db()
        raise TransitionRefused(f"The sandbox changed to {sandbox.state} meanwhile.")
    sandbox.state = to
    sandbox.updated_at = now
    for name, value in fields.items():
        setattr(sandbox, name, value)
    record_event(
        sandbox,
        "state",
        message or f"{current} → {to}",
        progress=progress,
        actor=actor,
        actor_user=actor_user,
    )


def create_sandbox(user: Any, name: str = "default") -> Sandbox:
    """Return the user's sandbox ``name``, creating it (provisioning) if it does not exist."""
    sandbox, created = Sandbox.objects.get_or_create(
        owner=user,
        name=name,
        defaults={"gateway_token": secrets.token_urlsafe(32), "backend": settings.SANDBOX_BACKEND},
    )
    if created:
        record_event(
            sandbox, "created", "Sandbox created", progress=0, actor=Actor.USER, actor_user=user
        )
    return sandbox


def provision_sandbox(sandbox: Sandbox) -> None:
    """Bring a new sandbox up for the first time. Does nothing unless it is provisioning."""
    if sandbox.state != State.PROVISIONING:
        return
    from sandboxes import pool

    if pool.adopt(sandbox):  # a pre-started gateway of the warm pool, re-keyed for this user
        return
    get_backend(sandbox.backend).prepare_volume(sandbox.pk)  # a new agent: nothing to restore
    for _ in start_sandbox(sandbox):
        pass


def prepare_cold_boot(sandbox: Sandbox) -> str:
    """The side effects a cold boot needs before its spec is built, as a step of its own: the
    sandbox's volume with its directories (made by its backend, as root, following no link the
    sandbox left), and a fresh AI-gateway credential for this start (only its hash is stored;
    the previous one stops working at once). Return the credential's plaintext, which only the
    gateway's environment (or a warm-pool gateway's config) holds."""
    from sandboxes.openclaw import config

    get_backend(sandbox.backend).prepare_volume(sandbox.pk, config.SUBDIRS)
    return ai_keys.mint_key(sandbox)


def start_spec(
    sandbox: Sandbox, limits: SandboxLimits, image: RuntimeImage, ai_key: str
) -> SandboxSpec:
    """The spec to boot the sandbox: a value computed from the row, the owner's ``limits``,
    the runtime and the credential minted by :func:`prepare_cold_boot`. Writes nothing."""
    from sandboxes.openclaw import setup

    return setup.build_spec(sandbox, limits, image, ai_key=ai_key)


def start_sandbox(
    sandbox: Sandbox,
    *,
    actor: str = Actor.SYSTEM,
    actor_user: Any = None,
    explicit: bool = False,
    restoring: bool = False,
    keep_activity: bool = False,
) -> Iterator[Progress]:
    """Start the sandbox's gateway, yielding progress; end running, or failed with a reason.

    A sandbox held for a restore (``restoring``) is started only by the restore itself
    (``restoring=True``: the restore, and reconcile finishing one a dead worker left);
    anyone else gets TransitionRefused.

    Raises TransitionRefused if the sandbox cannot start from its current state (for example
    another worker is already starting it), OwnerInactive (a TransitionRefused) if its
    owner is deactivated, and CrashBackoff (a TransitionRefused) if it crashed repeatedly and
    this start is automatic, or ``explicit`` but too soon (staff starts are always explicit).
    Never leaves a half-started sandbox behind: the backend cleans up after itself on failure.
    A start after a crash, or with ``keep_activity`` (a restart nobody asked for, such as a plan
    change's), leaves ``last_activity_at`` alone: only use is activity.

    Before the spec is built (which makes the data dir), the start waits for a backup that is
    reading the data dir, and a missing data dir is restored from the latest snapshot; if it
    had snapshots that cannot be restored, the start fails instead of booting an empty agent.
    """
    from sandboxes.backups.actions import BackupFailed, restore_if_missing, wait_for_backup
    from sandboxes.backups.storage import StorageError

    if not restoring and (
        sandbox.state == State.RESTORING
        or Sandbox.objects.filter(pk=sandbox.pk, state=State.RESTORING).exists()
    ):
        raise TransitionRefused(RESTORING_MESSAGE)
    if not owner_is_active(sandbox):
        raise OwnerInactive(OWNER_INACTIVE_MESSAGE)
    if notice := suspension_notice(sandbox):
        raise OwnerSuspended(notice)
    check_crash_backoff(sandbox, explicit=explicit or actor == Actor.STAFF)
    after_crash = sandbox.state == State.FAILED and sandbox.crash_count > 0
    transition(
        sandbox,
        State.STARTING,
        actor=actor,
        actor_user=actor_user,
        message="Starting your agent",
        progress=5,
        error_message="",
        # Not moved to another host since it was read (a drain or a lost host reassigns it).
        guard={"host_id": sandbox.host_id},
    )
    try:
        wait_for_backup(sandbox)
        if restore_if_missing(sandbox):
            sleep.drop_checkpoint(sandbox, "the data was restored from a backup")
            yield Progress(10, "Restored your agent's data from its latest backup")
        image = _image_for(sandbox)
        yield from _wait_for_boot_slot(sandbox)
        try:
            if not (yield from _restore_checkpoint(sandbox, image)):
                yield from _cold_boot(sandbox, image)
        finally:
            bootqueue.release(sandbox)
    except (BackendError, runtime.RuntimeMissing, BackupFailed, StorageError, OSError) as exc:
        _fail(sandbox, str(exc) or exc.__class__.__name__)
        yield Progress(100, f"Failed: {exc}")
        return
    now = timezone.now()
    activity: dict[str, Any] = {} if after_crash or keep_activity else {"last_activity_at": now}
    transition(
        sandbox,
        State.RUNNING,
        message="Your agent is running",
        progress=100,
        started_at=now,
        restart_after=None,
        **activity,
    )
    yield Progress(100, "Your agent is running")


def _image_for(sandbox: Sandbox) -> RuntimeImage:
    """The runtime the sandbox starts on: the one staff pinned it to, else the current one."""
    if sandbox.runtime_pinned and sandbox.runtime_id is not None:
        pinned = RuntimeImage.objects.filter(
            pk=sandbox.runtime_id, status=RuntimeImage.Status.READY
        ).first()
        if pinned is not None:
            return pinned
    return runtime.current_image()


def _wait_for_boot_slot(sandbox: Sandbox) -> Iterator[Progress]:
    """Wait in this host's line for a boot slot, recording each new place ("2 ahead of you")
    for the dashboard; a repeated place is only shown."""
    last_message = ""
    for step in bootqueue.acquire(sandbox):
        if step.message != last_message:
            record_event(sandbox, "progress", step.message, progress=step.percent)
            last_message = step.message
        else:
            broadcast_progress(sandbox, step.percent, step.message)
        yield step


def _restore_checkpoint(sandbox: Sandbox, image: RuntimeImage) -> Generator[Progress, None, bool]:
    """Wake a hibernated sandbox from its checkpoint; return (as a generator's value) whether
    it worked. A checkpoint that cannot be restored is dropped and reported: the caller then
    boots the sandbox cold, which loses nothing."""
    found = sleep.take_checkpoint(sandbox, image)
    if found is None:
        return False
    limits = limits_for(sandbox.owner).resources()  # read before the spec: see started_with()
    try:
        yield from _run_backend(sandbox, sleep.restore_steps(sandbox, found, image), limits=limits)
    except BackendError as exc:
        why = str(exc).splitlines()[0] if str(exc) else "it failed"
        record_event(
            sandbox,
            "checkpoint",
            f"Could not resume from the checkpoint ({why}); starting your agent fresh instead",
        )
        return False
    return True


def _cold_boot(sandbox: Sandbox, image: RuntimeImage) -> Iterator[Progress]:
    """Boot the sandbox's gateway from scratch, trying again HERMIT_START_RETRIES times before
    the failure reaches the user (a start can fail on a machine busy with other boots)."""
    if sandbox.runtime_id != image.pk:
        Sandbox.objects.filter(pk=sandbox.pk).update(runtime=image)
        sandbox.runtime = image
    attempts = 1 + max(0, int(settings.HERMIT_START_RETRIES))
    shown = [0]  # the bar never goes back on a retry
    for attempt in range(1, attempts + 1):
        try:
            limits = limits_for(sandbox.owner)  # read before the spec: see started_with()
            spec = start_spec(sandbox, limits, image, prepare_cold_boot(sandbox))
            start = get_backend(sandbox.backend).start(spec)
            yield from _run_backend(sandbox, start, shown, limits=limits.resources())
            return
        except BackendError as exc:
            if attempt == attempts:
                raise
            why = str(exc).splitlines()[0] if str(exc) else "it failed"
            log.warning("sandbox %s: start attempt %d failed: %s", sandbox.pk, attempt, why)
            record_event(sandbox, "retry", f"The start did not work ({why}); trying again")


def _run_backend(
    sandbox: Sandbox,
    steps: Iterator[Progress],
    shown: list[int] | None = None,
    *,
    limits: ResourceTuple,
) -> Iterator[Progress]:
    """Follow a backend start or restore: persist its state (with the plan ``limits`` it was
    started with, see :func:`started_with`), record and show its steps. ``shown`` holds the
    highest percent shown so far (kept across a retry's steps)."""
    shown = shown if shown is not None else [0]
    last_message = ""
    renewed = time.monotonic()
    for step in steps:
        if time.monotonic() - renewed > BOOT_SLOT_RENEW_SECONDS:  # a long boot keeps its slot
            bootqueue.renew(sandbox)
            renewed = time.monotonic()
        if step.state is not None:
            state = {**step.state, "limits": list(limits)}
            Sandbox.objects.filter(pk=sandbox.pk).update(backend_state=state)
            sandbox.backend_state = state
        percent = shown[0] = max(shown[0], 10 + int(step.percent * 0.85))
        if step.message != last_message:  # a new step is history; a tick is only shown
            record_event(sandbox, "progress", step.message, progress=percent)
            last_message = step.message
        else:
            broadcast_progress(sandbox, percent, step.message)
        yield Progress(percent, step.message)


def fail(sandbox: Sandbox, reason: str) -> None:
    """Move the sandbox to failed with ``reason`` (if it may be), logging the first line."""
    _fail(sandbox, reason)


def _fail(sandbox: Sandbox, reason: str) -> None:
    log.warning("sandbox %s failed: %s", sandbox.pk, reason.splitlines()[0] if reason else "")
    sandbox.refresh_from_db(fields=["state"])
    if State.FAILED in ALLOWED[sandbox.state]:
        transition(sandbox, State.FAILED, message=reason, progress=100, error_message=reason)
        from sandboxes import alerts

        alerts.start_failed(sandbox)  # mails the operators at the third failed start in a row


def stop_sandbox(
    sandbox: Sandbox, *, actor: str = Actor.SYSTEM, actor_user: Any = None, to: str = State.STOPPED
) -> None:
    """Stop the gateway; the sandbox ends ``to`` (stopped, sleeping, or restoring for a
    restore). Idempotent. Once a stop or sleep has committed, a backup of it is queued."""
    if sandbox.state == to:
        return
    was_dozing = sandbox.state == State.DOZING
    transition(
        sandbox,
        State.STOPPING,
        actor=actor,
        actor_user=actor_user,
        message="Going to sleep" if to == State.SLEEPING else "Stopping",
    )
    backend = get_backend(sandbox.backend)
    try:
        if was_dozing:  # a frozen gateway cannot act on SIGTERM: let it shut down cleanly
            backend.thaw(spec_for(sandbox), sandbox.backend_state)
        backend.stop(spec_for(sandbox), sandbox.backend_state)
    except BackendError as exc:
        _fail(sandbox, str(exc))
        return
    messages: dict[str, str] = {State.SLEEPING: "Asleep", State.RESTORING: "Stopped for a restore"}
    transition(sandbox, to, message=messages.get(to, "Stopped"), backend_state={})
    if to in (State.STOPPED, State.SLEEPING):
        queue_backup(sandbox, "sleep" if to == State.SLEEPING else "stop")


def queue_backup(sandbox: Sandbox, trigger: str) -> None:
    """Queue a backup of the sandbox once the current transaction commits. A broker outage
    never fails the caller: the beat's scheduled backups catch up."""
    transaction.on_commit(partial(_send_backup, sandbox.pk, trigger))


def _send_backup(sandbox_id: int, trigger: str) -> None:
    from sandboxes.backups import tasks as backup_tasks

    try:
        backup_tasks.backup_sandbox.delay(sandbox_id, trigger)
    except Exception:
        log.warning("could not queue a %s backup of sandbox %s", trigger, sandbox_id)


def spec_for(sandbox: Sandbox) -> SandboxSpec:
    """The spec for stop / poll / exec / endpoint on a started sandbox.

    Built from the row alone: it writes no config and mints no credential (only a start does,
    since a new AI-gateway key would lock out the gateway that is running).
    """
    from sandboxes.openclaw import setup

    return setup.minimal_spec(sandbox)


def sleep_sandbox(sandbox: Sandbox, *, actor: str = Actor.SYSTEM) -> str:
    """Put a running or dozing sandbox to sleep with its memory freed, by a checkpoint where
    the backend can take one, else by a stop (see sandboxes.sleep); return which ("" if it
    was neither running nor dozing)."""
    return sleep.hibernate(sandbox, actor=actor)


def restart_sandbox(
    sandbox: Sandbox,
    *,
    actor: str = Actor.SYSTEM,
    actor_user: Any = None,
    keep_activity: bool = False,
) -> Iterator[Progress]:
    """Stop (if running, dozing or failed) and start again: an explicit start (see
    start_sandbox, also for ``keep_activity``)."""
    check_crash_backoff(sandbox, explicit=True)
    if sandbox.state in (State.RUNNING, State.DOZING, State.FAILED):
        stop_sandbox(sandbox, actor=actor, actor_user=actor_user)
    yield from start_sandbox(
        sandbox, actor=actor, actor_user=actor_user, explicit=True, keep_activity=keep_activity
    )


def started_with(sandbox: Sandbox, limits: ResourceTuple) -> bool:
    """Return True if the sandbox's gateway (running or dozing) was started with ``limits``
    (:meth:`~sandboxes.limits.SandboxLimits.resources`), as recorded in its backend state by the
    start or restore. A thaw keeps a gateway's cgroup and network, so one started with other
    limits keeps them until it is restarted. A start reads the plan before it builds the spec,
    so a plan changed meanwhile shows here as a difference, never as a match."""
    recorded = (sandbox.backend_state or {}).get("limits")
    return isinstance(recorded, list) and tuple(recorded) == tuple(limits)


def wake_sandbox(
    sandbox: Sandbox, *, actor: str = Actor.USER, actor_user: Any = None, timeout: float = 120
) -> Iterator[Progress]:
    """Make sure the sandbox is running, yielding progress. Safe to call from many places.

    Thaws it if it dozes (milliseconds); starts it if it is asleep (from its checkpoint where
    there is one), stopped or failed; if someone else is already starting it, follows that
    start through the database until it ends. Ends with the sandbox running, or raises
    BackendError with the reason (also when its owner is deactivated).
    """
    deadline = time.monotonic() + timeout
    longest = time.monotonic() + 10 * timeout  # however long the line for a boot slot
    while time.monotonic() < deadline:
        try:
            sandbox.refresh_from_db()
        except Sandbox.DoesNotExist:  # adopted a warm-pool gateway meanwhile: follow that one
            sandbox = Sandbox.objects.get(owner_id=sandbox.owner_id, name=sandbox.name)
        if sandbox.state == State.RUNNING:
            yield Progress(100, "Your agent is running")
            return
        if sandbox.state == State.DOZING:
            sleep.thaw(sandbox, actor=actor, actor_user=actor_user)
            continue
        if sandbox.state in (State.SLEEPING, State.STOPPED, State.FAILED, State.PROVISIONING):
            try:
                if sandbox.state == State.PROVISIONING:
                    get_backend(sandbox.backend).prepare_volume(sandbox.pk)
                yield from start_sandbox(sandbox, actor=actor, actor_user=actor_user)
            except (OwnerInactive, OwnerSuspended, CrashBackoff) as exc:
                raise BackendError(str(exc)) from exc
            except TransitionRefused:
                continue  # someone else moved first: follow them
            if sandbox.state != State.RUNNING:
                raise BackendError(sandbox.error_message or "The sandbox could not start.")
            return
        last = sandbox.events.filter(progress__isnull=False).first()
        yield Progress(last.progress or 0 if last else 0, last.message if last else "Waiting")
        if sandbox.boot_queued_at is not None:  # waiting in line for a boot slot: keep following
            deadline = min(longest, max(deadline, time.monotonic() + timeout))
        time.sleep(0.5)
    raise BackendError("Timed out waiting for the sandbox to start.")


def record_activity(sandbox: Sandbox) -> None:
    """Note that someone used the sandbox now. Writes at most once per 30 s per sandbox, and
    costs one cache lookup otherwise (no database query)."""
    note_activity(sandbox.pk)


def note_activity(sandbox_id: int) -> None:
    """:func:`record_activity` by primary key (the AI gateway knows only that)."""
    if not cache.add(f"hermit:activity:{sandbox_id}", 1, ACTIVITY_WRITE_INTERVAL.seconds):
        return
    now = timezone.now()
    Sandbox.objects.filter(
        pk=sandbox_id, last_activity_at__lt=now - ACTIVITY_WRITE_INTERVAL
    ).update(last_activity_at=now)


def gateway_endpoint(sandbox: Sandbox) -> tuple[str, int]:
    """Return (host, port) where the portal reaches the sandbox's gateway."""
    return get_backend(sandbox.backend).endpoint(spec_for(sandbox), sandbox.backend_state)


def mark_crashed(sandbox: Sandbox) -> bool:
    """If the database says running but the backend says the gateway is gone, record the crash,
    clear what is left of it and move the sandbox to failed; return True. Otherwise (still
    running, or not running according to the database) return False.

    Idempotent and race-safe: of several callers that saw the same crash (two chat tabs,
    reconcile), one claims the running → failed change; the others get False. The caller that
    got True starts the sandbox again (a chat through :func:`wake_sandbox`, reconcile directly)
    unless the crash put it in back-off (``restart_after``, see the module docstring): the crash
    count goes on while each gateway crashes within HERMIT_CRASH_WINDOW of its start, and starts
    again at 1 after one that ran longer.
    """
    sandbox.refresh_from_db()
    if sandbox.state != State.RUNNING:
        return False
    backend = get_backend(sandbox.backend)
    spec, seen = spec_for(sandbox), dict(sandbox.backend_state)
    result = backend.poll(spec, seen)
    if result.running:
        return False
    why = "ran out of memory" if result.oom_killed else (result.detail or "stopped")
    try:  # the claim: while it is stopping, other callers wait instead of starting it
        transition(sandbox, State.STOPPING, message=f"The gateway {why}")
    except TransitionRefused:
        return False
    now = timezone.now()
    window = timedelta(seconds=settings.HERMIT_CRASH_WINDOW)
    soon = sandbox.started_at is not None and now - sandbox.started_at < window
    crashes = sandbox.crash_count + 1 if soon else 1
    pause = crash_backoff(crashes)
    restart_after = now + pause if pause is not None else None
    error = f"The gateway {why}."
    if restart_after is None:
        record_event(sandbox, "crashed", f"The gateway {why}; restarting it")
    else:
        error = f"{error} {backoff_message(restart_after)}"
        record_event(sandbox, "crashed", f"The gateway {why} ({crashes} crashes in a row)")
    try:
        backend.stop(spec, seen)  # clear what is left of it (network helper, cgroup)
    except BackendError as exc:
        log.warning("sandbox %s: clearing a crashed gateway failed: %s", sandbox.pk, exc)
    transition(
        sandbox,
        State.FAILED,
        message="Crashed",
        error_message=error,
        backend_state={},
        crash_count=crashes,
        last_crash_at=now,
        restart_after=restart_after,
    )
    return True


def _reconcile_inactive_owner(sandbox: Sandbox, backend: Any) -> str:
    """A deactivated account's sandbox: stop whatever runs, never start anything."""
    if sandbox.state == State.RUNNING:
        stop_sandbox(sandbox, to=State.STOPPED)
        record_event(sandbox, "reconciled", "Account deactivated or suspended: stopped its agent")
        return "stopped-inactive"
    if _stop_stray(sandbox, backend, "Account deactivated or suspended: stopped its agent"):
        return "stopped-inactive"
    return "inactive"


def _stop_stray(sandbox: Sandbox, backend: Any, message: str) -> bool:
    """Stop a gateway that runs while the sandbox should not (sleeping, stopped or failed);
    return whether there was one."""
    if sandbox.state not in (State.SLEEPING, State.STOPPED, State.FAILED):
        return False
    if not sandbox.backend_state:
        return False
    spec = spec_for(sandbox)
    if not backend.poll(spec, sandbox.backend_state).running:
        return False
    backend.stop(spec, sandbox.backend_state)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend_state={})
    record_event(sandbox, "reconciled", message)
    return True


def stuck_after() -> timedelta:
    """How long a starting or stopping sandbox may make no progress before it counts as stuck
    (reconcile then fails it; the admin's fleet overview lists it)."""
    return timedelta(seconds=settings.HERMIT_START_TIMEOUT + settings.HERMIT_READY_TIMEOUT + 60)


def _stuck_for(sandbox: Sandbox) -> timedelta:
    """How long a starting or stopping sandbox has made no progress: since its last state
    change or recorded step, whichever is later; none while a backup, restore or export holds
    its lease (a start may restore its data first, or wait for a backup, for a long time)."""
    now = timezone.now()
    busy = BackupRepository.objects.filter(sandbox=sandbox, locked_until__gt=now)
    if busy.exclude(lock_token="").exists():
        return timedelta(0)
    last_step = sandbox.events.order_by("-created_at").values_list("created_at", flat=True)
    since = max(sandbox.updated_at, last_step.first() or sandbox.updated_at)
    return now - since


def reconcile_sandbox(sandbox: Sandbox) -> str:
    """Compare the wanted state with what the backend reports and repair it. Return what it did.

    owner deactivated: stop it if anything runs; start nothing (whatever its plan).
    running but not running: restart (a crashed gateway comes back by itself).
    sleeping or dozing on a plan that never sleeps (e.g. after a plan change): wake it.
    dozing but its processes gone: sleeping (it boots on its next wake).
    failed on a plan that never sleeps: start it again, at most every FAILED_RETRY_AFTER.
    crashed repeatedly (``restart_after`` ahead): start nothing until then ("backoff").
    sleeping / stopped / failed but running: stop the stray gateway.
    starting / stopping / provisioning: pending work; left alone unless stuck far too long.
    a backup or restore whose worker died (its lease expired): finished first, rolled forward
    or back (sandboxes.backups.actions.reconcile_backups); restoring: left to its restore while
    that holds its lease.
    """
    from sandboxes.backups.actions import reconcile_backups

    backend = get_backend(sandbox.backend)
    repaired = reconcile_backups(sandbox)  # what a dead backup or restore worker left
    if repaired is not None:
        return repaired
    if not owner_is_active(sandbox) or suspension_notice(sandbox):
        return _reconcile_inactive_owner(sandbox, backend)
    always_on = limits_for(sandbox.owner).sleeps_after() is None
    if always_on and sandbox.state in (State.SLEEPING, State.DOZING):
        record_event(sandbox, "reconciled", "Always-on plan: waking the agent")
        for _ in wake_sandbox(sandbox, actor=Actor.SYSTEM):
            pass
        return "woke"
    if (
        always_on
        and sandbox.state == State.FAILED
        and (timezone.now() - sandbox.updated_at >= FAILED_RETRY_AFTER)
    ):
        if sandbox.in_crash_backoff(timezone.now()):
            return "backoff"
        record_event(sandbox, "reconciled", "Always-on plan: trying to start the agent again")
        for _ in start_sandbox(sandbox):
            pass
        return "retried"
    if (
        sandbox.state == State.DOZING
        and not backend.poll(spec_for(sandbox), sandbox.backend_state).running
    ):
        # Its processes are gone (the host restarted, say): asleep, to boot on its next wake.
        transition(sandbox, State.STOPPING, message="A dozing agent's gateway was gone")
        transition(sandbox, State.SLEEPING, message="Asleep", backend_state={})
        return "dozing-gone"
    if sandbox.state == State.RUNNING:
        if not mark_crashed(sandbox):
            return "ok" if sandbox.state == State.RUNNING else "raced"
        if sandbox.in_crash_backoff(timezone.now()):
            return "backoff"
        for _ in start_sandbox(sandbox):
            pass
        return "restarted"
    if sandbox.state in (State.SLEEPING, State.STOPPED, State.FAILED) and sandbox.backend_state:
        if _stop_stray(sandbox, backend, "Stopped a gateway that should not be running"):
            return "stopped-stray"
        return "ok"
    if sandbox.state in (State.STARTING, State.STOPPING) and _stuck_for(sandbox) > stuck_after():
        spec = spec_for(sandbox)
        if sandbox.backend_state:
            backend.stop(spec, sandbox.backend_state)
        _fail(sandbox, f"Stuck while {sandbox.state}; stopped by reconcile")
        bootqueue.release(sandbox)  # a dead worker's boot slot is free at once
        return "failed-stuck"
    return "pending"

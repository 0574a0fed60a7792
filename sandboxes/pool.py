"""The warm pool: gateways started before anyone asks, so a confirmed sign-up runs in a second.

A pooled gateway is an ordinary Sandbox row (name ``pool-<hex>``) owned by the pool's own
account (``POOL_USERNAME``: active, unusable password, no email address, never a person),
started the usual way on the plan new accounts get, with a pool-only gateway token and AI
gateway credential. :func:`fill_pool` (a Celery task, run by beat and after each adoption) keeps
HERMIT_WARM_POOL_SIZE of them up and drops the ones that cannot be used (failed, stopped,
asleep, on an old runtime, over the size).

:func:`adopt` gives one to a sandbox that is being provisioned. A gateway's uid, data dir and
cgroups derive from its row's primary key, so the user's sandbox becomes the pool row: in one
transaction the user's provisioning row is locked, a running pool row is claimed
(``skip_locked``: two adoptions never get the same one), the user's events move to it, the
provisioning row is deleted, and the pool row is given the user, the name, a new gateway token
and a new AI credential (the pool's one stops working at once). Then, outside the transaction,
its backend rewrites the gateway's read-only config in place with the two new secrets (a pooled
gateway reads them from its config, see ``sandboxes.openclaw.config``); OpenClaw hot-applies
them in about a second without restarting, after which the pool's token is refused. The
adoption connects once with the new token and the portal's device key for this sandbox (the
pairing a first chat would do), and only then marks the sandbox running.

Nothing of another user can be on a pooled gateway: until it is adopted no user has reached
it (it is not any user's sandbox, and its token is known only to the portal), and it is
adopted once. If the re-key does not take, the gateway is never handed over as it is: it is
stopped and started cold with the user's own config and secrets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from asgiref.sync import async_to_sync
from celery import shared_task
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from sandboxes import hosts, runtime
from sandboxes.ai_keys import mint_key
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.events import event_payload, group_name, record_event
from sandboxes.limits import limits_for
from sandboxes.models import Sandbox, SandboxEvent

log = logging.getLogger(__name__)
State = Sandbox.State

# Not an address anyone can confirm (.invalid), and with an "@" in the username, which is never
# one made for a sign-up (usernames come from the local part of the address).
POOL_USERNAME = "warm-pool@hermit.invalid"
POOL_EMAIL = "pool@hermit.invalid"
NAME_PREFIX = "pool-"
REKEY_TIMEOUT = 15.0  # seconds for a running gateway to take its new secrets
STALE_PROVISIONING = 600  # seconds: a pool row never started (its worker died) is dropped
USABLE_STATES = (State.PROVISIONING, State.STARTING, State.RUNNING)
# What OpenClaw (2026.9.x) writes when it applied, or refused, an edited config.
RELOAD_APPLIED = "config hot reload applied"
RELOAD_REFUSED = "config reload skipped"


def pool_size() -> int:
    return max(0, int(getattr(settings, "HERMIT_WARM_POOL_SIZE", 1)))


def pool_user() -> Any:
    """Return the pool's account, creating it (with the default plan) the first time."""
    users = get_user_model().objects
    user = users.filter(username=POOL_USERNAME).first()
    if user is not None:
        return user
    with transaction.atomic():
        user, created = users.get_or_create(
            username=POOL_USERNAME, defaults={"email": POOL_EMAIL, "is_active": True}
        )
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
            Sandbox.objects.filter(owner=user).delete()  # the one every new account gets
    return user


def pool_user_id() -> int | None:
    pk: int | None = (
        get_user_model().objects.filter(username=POOL_USERNAME).values_list("pk", flat=True).first()
    )
    return pk


def is_pooled(sandbox: Sandbox) -> bool:
    """Return True if ``sandbox`` is a pooled gateway (no user's yet)."""
    owner = pool_user_id()
    return owner is not None and sandbox.owner_id == owner


def exclude_pooled(queryset: QuerySet[Sandbox]) -> QuerySet[Sandbox]:
    """Return ``queryset`` without pooled gateways (for sleep, doze and backup schedules)."""
    return queryset.exclude(owner__username=POOL_USERNAME)


# -- adoption ----------------------------------------------------------------------------------


class _Gone(Exception):
    """The provisioning row no longer exists (a concurrent adoption took it)."""


def adopt(sandbox: Sandbox) -> bool:
    """Put ``sandbox`` (provisioning) on a pooled gateway. Return True if that is done (it is
    running, or, if the re-key failed, it was started cold as usual), or if the row is gone (a
    concurrent adoption of it won): nothing is left for the caller to do. Return False when no
    pooled gateway fits (none running, another plan's limits, another runtime) or anything
    fails before the hand-over: the caller starts it cold, and nothing was changed."""
    if pool_size() <= 0 or sandbox.state != State.PROVISIONING:
        return False
    try:
        claimed = _claim(sandbox)
    except _Gone:
        return True
    except Exception:
        log.exception("sandbox %s: could not take a pooled gateway", sandbox.pk)
        return False
    if claimed is None:
        return False
    adopted, old_pk, token, ai_key = claimed
    try:
        _hand_over(adopted, old_pk, token, ai_key, time.monotonic())
    finally:
        _queue_fill()  # after the hand-over: a cold boot now would slow it down
    return True


def _hand_over(adopted: Sandbox, old_pk: int, token: str, ai_key: str, began: float) -> None:
    try:
        _rekey(adopted, token, ai_key)
    except Exception as exc:
        log.warning(
            "sandbox %s: a pooled gateway did not take its new secrets: %s", adopted.pk, exc
        )
        _start_cold(adopted, old_pk)
        return
    from sandboxes import actions

    try:
        actions.transition(
            adopted,
            State.RUNNING,
            message="Your agent is running",
            progress=100,
            last_activity_at=timezone.now(),
            restart_after=None,
        )
    except actions.TransitionRefused:
        return  # reconcile or a stop moved first: it is theirs now
    _tell_old_page(old_pk, adopted)
    log.info(
        "sandbox %s: adopted pooled gateway %s, re-keyed in %.2f s",
        old_pk,
        adopted.pk,
        time.monotonic() - began,
    )


def _claim(sandbox: Sandbox) -> tuple[Sandbox, int, str, str] | None:
    """In one transaction, make a running pool row the user's sandbox in place of ``sandbox``
    (see the module docstring). Return (the row, the old row's pk, its new gateway token, its
    new AI key), or None if there is no fitting one (nothing changed)."""
    from sandboxes import actions

    owner_id = pool_user_id()
    if owner_id is None:
        return None
    with transaction.atomic():
        mine = (
            Sandbox.objects.select_for_update(of=("self",))
            .select_related("owner")
            .filter(pk=sandbox.pk)
            .first()
        )
        if mine is None:
            raise _Gone
        if mine.state != State.PROVISIONING or not actions.owner_is_active(mine):
            return None
        pool_limits = limits_for(get_user_model().objects.get(pk=owner_id))
        if limits_for(mine.owner).resources() != pool_limits.resources():
            return None
        try:
            image = runtime.current_image()
        except runtime.RuntimeMissing:
            return None
        candidates = Sandbox.objects.select_for_update(skip_locked=True).filter(
            owner_id=owner_id, state=State.RUNNING, runtime=image, backend=mine.backend
        )
        if mine.host_id is not None:  # placed: only a gateway already running on that host
            candidates = candidates.filter(host_id=mine.host_id)
        pooled = candidates.order_by("started_at", "pk").first()
        if pooled is None:
            return None
        # The pool row's own history is nobody's; the user's comes with them.
        SandboxEvent.objects.filter(sandbox=pooled).delete()
        SandboxEvent.objects.filter(sandbox=mine).update(sandbox=pooled)
        old_pk, name, created_at, owner = mine.pk, mine.name, mine.created_at, mine.owner
        mine.delete()
        token = secrets.token_urlsafe(32)
        ai_key = mint_key(pooled)  # the pool's credential stops working here
        now = timezone.now()
        Sandbox.objects.filter(pk=pooled.pk).update(
            owner=owner,
            name=name,
            gateway_token=token,
            device_private_key="",
            device_token="",
            state=State.STARTING,
            error_message="",
            created_at=created_at,
            last_activity_at=now,
            updated_at=now,
        )
        adopted = Sandbox.objects.select_related("owner", "runtime").get(pk=pooled.pk)
        record_event(adopted, "state", "Starting your agent on a ready gateway", progress=50)
    _tell_old_page(old_pk, adopted)
    return adopted, old_pk, token, ai_key


def _rekey(sandbox: Sandbox, token: str, ai_key: str) -> None:
    """Give the running gateway its user's config and secrets, in place, and wait until it
    accepts the new token (connecting once as the portal's device for this sandbox).

    Raises BackendError if the backend cannot do this or the gateway did not take them."""
    from sandboxes import actions
    from sandboxes.backends.local import LOG_NAME
    from sandboxes.openclaw import setup
    from sandboxes.openclaw.config import CONFIG_PATH

    state = sandbox.backend_state or {}
    if sandbox.backend != "local":  # the wait below reads the local gateway's own log
        raise BackendError(f"The {sandbox.backend} backend cannot re-key a running gateway.")
    spec = actions.spec_for(sandbox)
    backend = get_backend(sandbox.backend)
    if not state.get("run_dir") or not backend.poll(spec, state).running:
        raise BackendError("The pooled gateway is not running.")
    log_path = Path(state["run_dir"]) / LOG_NAME
    offset = log_path.stat().st_size
    browser = limits_for(sandbox.owner).browser  # equal to the pool's: see adopt's check
    text = setup.config_text(sandbox, gateway_token=token, ai_key=ai_key, browser=browser)
    backend.write_files(spec, state, {CONFIG_PATH: text})  # in place: the gateway hot-applies it
    host, port = actions.gateway_endpoint(sandbox)
    _wait_for_token(sandbox, f"ws://{host}:{port}", token, log_path, offset)


def _log_since(path: Path, offset: int) -> str:
    """The gateway's output (root's file in the run dir) written after ``offset``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        return os.pread(fd, 1 << 20, offset).decode(errors="replace")
    finally:
        os.close(fd)


def _wait_for_token(sandbox: Sandbox, url: str, token: str, log_path: Path, offset: int) -> None:
    """Wait until the gateway says it applied its new config (OpenClaw lets an edit settle
    for ~0.5 s, then applies it in ~0.3 s), then connect with the new token. Should the log
    say nothing (another OpenClaw version's wording), connecting is tried every half second
    after a while all the same."""
    from sandboxes.consumers.chat import device_identity_for
    from sandboxes.openclaw.protocol import GatewayConnection, GatewayError

    identity = device_identity_for(sandbox)

    async def attempt() -> None:
        conn = await GatewayConnection.open(url, token=token, identity=identity, timeout=5)
        await conn.close()

    now = time.monotonic()
    deadline, next_try, last = now + REKEY_TIMEOUT, now + 3.0, "no answer"
    while time.monotonic() < deadline:
        output = _log_since(log_path, offset)
        if RELOAD_REFUSED in output:
            raise BackendError("The gateway refused its new config.")
        if RELOAD_APPLIED in output or time.monotonic() >= next_try:
            try:
                asyncio.run(attempt())
                return
            except GatewayError as exc:
                last, next_try = str(exc), time.monotonic() + 0.5
        time.sleep(0.02)
    raise BackendError(f"The gateway did not take its new token in {REKEY_TIMEOUT:.0f} s: {last}")


def _start_cold(sandbox: Sandbox, old_pk: int) -> None:
    """Stop a gateway that did not take its user's secrets and start it cold, as any start."""
    from sandboxes import actions

    try:
        get_backend(sandbox.backend).stop(actions.spec_for(sandbox), sandbox.backend_state)
    except BackendError as exc:
        log.warning("sandbox %s: stopping the pooled gateway failed: %s", sandbox.pk, exc)
    try:
        actions.transition(
            sandbox, State.FAILED, message="Starting your agent afresh", backend_state={}
        )
        for _ in actions.start_sandbox(sandbox):
            pass
    except actions.TransitionRefused:
        return
    _tell_old_page(old_pk, sandbox)


def _tell_old_page(old_pk: int, sandbox: Sandbox) -> None:
    """A dashboard opened before the adoption listens to the old row's group: send it the
    latest event, so it follows the state (and reloads onto the new row once it settles)."""
    event = sandbox.events.order_by("-created_at", "-id").first()
    layer = get_channel_layer()
    if event is None or layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_name(old_pk), event_payload(event))
    except Exception:
        log.warning("could not tell sandbox %s's page about its adoption", old_pk)


# -- filling -----------------------------------------------------------------------------------


def _queue_fill() -> None:
    try:
        fill_pool.delay()
    except Exception:
        log.warning("could not queue a refill of the warm pool")  # beat fills it later


@shared_task(acks_late=True)
def fill_pool() -> int:
    """Drop the pooled gateways that cannot be used, then start new ones until
    HERMIT_WARM_POOL_SIZE are running or starting. Return how many it started."""
    drain_pool()
    started = 0
    for sandbox in _new_places():
        if _start(sandbox):
            started += 1
    return started


def _new_places() -> list[Sandbox]:
    """Create the provisioning rows the pool lacks. The pool's account row is locked while it
    counts, so two fills running at once do not both add the same place."""
    size = pool_size()
    if size <= 0:
        return []
    user = pool_user()
    host = hosts.local_host()  # pooled gateways start on this machine
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=user.pk).first()
        have = Sandbox.objects.filter(owner=user, state__in=USABLE_STATES).count()
        return [
            Sandbox.objects.create(
                owner=user,
                name=f"{NAME_PREFIX}{secrets.token_hex(6)}",
                gateway_token=secrets.token_urlsafe(32),
                backend=settings.SANDBOX_BACKEND,
                host=host,
            )
            for _ in range(size - have)
        ]


def _start(sandbox: Sandbox) -> bool:
    from sandboxes import actions

    sandbox = Sandbox.objects.select_related("owner").get(pk=sandbox.pk)
    try:
        get_backend(sandbox.backend).prepare_volume(sandbox.pk)
        for _ in actions.start_sandbox(sandbox):
            pass
    except actions.TransitionRefused as exc:
        log.warning("pooled gateway %s did not start: %s", sandbox.pk, exc)
    if sandbox.state == State.RUNNING:
        return True
    discard(sandbox)
    return False


@shared_task(acks_late=True)
def drain_pool() -> int:
    """Drop pooled gateways that cannot be handed out: failed, stopped, asleep or dozing, never
    started, on a runtime that is no longer current, or more than HERMIT_WARM_POOL_SIZE.
    Return how many it dropped."""
    owner = pool_user_id()
    if owner is None:
        return 0
    rows = Sandbox.objects.select_related("owner").filter(owner_id=owner)
    current: int | None
    try:
        current = runtime.current_image().pk
    except runtime.RuntimeMissing:
        current = None
    stale = timezone.now().timestamp() - STALE_PROVISIONING
    keep = pool_size()
    dropped = 0
    for sandbox in rows.order_by("-started_at", "-pk"):
        if sandbox.state == State.RUNNING and sandbox.runtime_id == current and keep > 0:
            keep -= 1
            continue
        if sandbox.state in (State.STARTING, State.STOPPING):
            continue  # a start or stop in progress; the next fill sees how it ended
        if sandbox.state == State.PROVISIONING and sandbox.created_at.timestamp() > stale:
            continue  # a fill is about to start it
        if discard(sandbox):
            dropped += 1
    return dropped


def discard(sandbox: Sandbox) -> bool:
    """Stop a pooled gateway and delete its row, data dir and run dir. Return False if it is
    not (or no longer) a pooled one, or someone else moved it first."""
    from sandboxes import actions

    owner = pool_user_id()
    with transaction.atomic():
        row = (
            Sandbox.objects.select_for_update(skip_locked=True)
            .filter(pk=sandbox.pk, owner_id=owner)
            .first()
        )
        if row is None or row.state == State.STARTING:
            return False
        claimed = Sandbox.objects.filter(pk=row.pk, state=row.state).update(
            state=State.STOPPING, updated_at=timezone.now()
        )
    if not claimed:
        return False
    if row.backend_state:
        try:
            get_backend(row.backend).stop(actions.spec_for(row), row.backend_state)
        except BackendError as exc:
            log.warning("pooled gateway %s: stop failed: %s", row.pk, exc)
            Sandbox.objects.filter(pk=row.pk).update(state=State.FAILED)
            return False
    run_dir = (row.backend_state or {}).get("run_dir")
    backend, pk = get_backend(row.backend), row.pk
    row.delete()
    backend.remove_volume(pk)
    if run_dir and Path(run_dir).is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)  # root's own files
    return True

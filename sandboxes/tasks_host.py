"""Sandbox operations the portal's web processes ask of the privileged worker on the sandbox's host.

The web processes (daphne: the portal, chat and Control UI; uvicorn: the AI gateway) run as an
unprivileged user, so they never call the sandbox backend themselves. Whatever they need done
to a sandbox (wake it, thaw a doze, read its stats, processes and logs, talk to its gateway's
device API) is one of these Celery tasks, which take the sandbox's id as their first argument
(so a router can send them to the sandbox's host queue) and are safe to run twice.

Replies. A web process that waits for a task's outcome names a ``token`` (:func:`new_token`)
and waits with :func:`wait_reply` or :func:`await_reply`. The task puts its JSON-safe answer in
the cache under that token (REPLY_TTL seconds) and, if the caller gave its channel name, also
sends it there through the channel layer (``{"type": "host.reply", "token", "reply"}``), which
wakes an async caller at once. Progress of a wake reaches listeners as the sandbox's own events
(sandboxes.events: the per-sandbox group), as it always did. A caller that gets no reply within
its timeout says so; the task may still finish later, and its effects are the same then.

With ``CELERY_TASK_ALWAYS_EAGER`` (tests), ``delay`` runs the task in the caller's thread; the
reply is then in the cache before ``delay`` returns.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from celery import shared_task
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core.cache import cache

from sandboxes import actions, sleep, staff
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox
from sandboxes.openclaw import devices

log = logging.getLogger(__name__)

REPLY_TTL = 300
REPLY_TYPE = "host.reply"
Reply = dict[str, Any]


def new_token() -> str:
    """A fresh reply token (unguessable, so no one else's reply can be read with it)."""
    return secrets.token_urlsafe(16)


def _reply_key(token: str) -> str:
    return f"hermit:host-reply:{token}"


def send_reply(token: str, reply: Reply, channel: str = "") -> None:
    """Store ``reply`` under ``token`` and, with a ``channel``, send it there too. A channel
    layer outage never loses the reply: the caller also polls the cache."""
    cache.set(_reply_key(token), reply, REPLY_TTL)
    layer = get_channel_layer() if channel else None
    if layer is None:
        return
    try:
        async_to_sync(layer.send)(channel, {"type": REPLY_TYPE, "token": token, "reply": reply})
    except Exception:
        log.warning("could not send a reply to its channel; the caller reads it from the cache")


def take_reply(token: str) -> Reply | None:
    """The reply stored under ``token``, or None if there is none yet."""
    found = cache.get(_reply_key(token))
    return found if isinstance(found, dict) else None


def wait_reply(token: str, timeout: float, poll: float = 0.05) -> Reply | None:
    """Wait up to ``timeout`` s for the reply under ``token`` (sync callers); None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = take_reply(token)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(poll)


async def await_reply(token: str, timeout: float, poll: float = 0.2) -> Reply | None:
    """:func:`wait_reply` for async callers that do not listen on a channel."""
    from channels.db import database_sync_to_async

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await database_sync_to_async(take_reply, thread_sensitive=False)(token)
        if found is not None or loop.time() >= deadline:
            return found
        await asyncio.sleep(poll)


def _sandbox(sandbox_id: int) -> Sandbox | None:
    return Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()


def _user(user_id: int | None) -> Any:
    return get_user_model().objects.filter(pk=user_id).first() if user_id else None


# -- wake ------------------------------------------------------------------------------------


@shared_task(acks_late=True)
def wake(
    sandbox_id: int,
    user_id: int | None,
    token: str,
    channel: str = "",
    check_crash: bool = False,
) -> Reply:
    """A user's wake (chat, Control UI): make sure the sandbox runs; reply ``{"ok", "message"}``.

    With ``check_crash`` (a chat whose gateway went away), a sandbox the database says is
    running is first checked with the backend, and a dead gateway is marked crashed
    (:func:`sandboxes.actions.mark_crashed`) and started again. Progress goes out as the
    sandbox's events while the wake runs.
    """
    reply = _wake(sandbox_id, user_id, check_crash)
    send_reply(token, reply, channel)
    return reply


def _wake(sandbox_id: int, user_id: int | None, check_crash: bool) -> Reply:
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        return {"ok": False, "message": "Your agent no longer exists."}
    try:
        if check_crash and sandbox.state == Sandbox.State.RUNNING:
            actions.mark_crashed(sandbox)
        for _ in actions.wake_sandbox(sandbox, actor_user=_user(user_id)):
            pass
    except BackendError as exc:
        return {"ok": False, "message": f"Your agent could not start: {exc}"}
    except Exception:
        log.exception("waking sandbox %s failed", sandbox_id)
        return {"ok": False, "message": "Your agent could not start: something went wrong."}
    return {"ok": True, "message": "Your agent is running"}


@shared_task(acks_late=True)
def thaw(sandbox_id: int, user_id: int | None, token: str = "", channel: str = "") -> Reply:
    """Thaw the sandbox if it dozes (an open chat or Control UI got a frame); reply
    ``{"ok": True, "state"}`` with the state it is in after."""
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        reply: Reply = {"ok": False, "state": ""}
    else:
        sleep.wake_if_dozing(sandbox, actor_user=_user(user_id))
        sandbox.refresh_from_db(fields=["state"])
        reply = {"ok": True, "state": sandbox.state}
    if token:
        send_reply(token, reply, channel)
    return reply


# -- what staff see (sandboxes.admin) ---------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@shared_task(acks_late=True)
def look_inside(sandbox_id: int, token: str) -> Reply:
    """Read the sandbox's resource use, processes and log tail (sandboxes.staff.look_inside,
    bounded in time and redacted there); reply with its fields."""
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        reply: Reply = asdict(staff.Inside(problem="The sandbox no longer exists."))
    else:
        reply = asdict(staff.look_inside(sandbox))
    send_reply(token, reply)
    return reply


@shared_task(acks_late=True)
def device_call(sandbox_id: int, token: str, verb: str, target: str = "") -> Reply:
    """One device API request on the sandbox's gateway (sandboxes.openclaw.devices): ``list``,
    ``approve`` (``target`` a request id) or ``revoke`` (``target`` a device id). Reply
    ``{"ok": True, "result"}`` or ``{"ok": False, "error"}`` (a sentence for staff)."""
    reply = _device_call(sandbox_id, verb, target)
    send_reply(token, reply)
    return reply


def _device_call(sandbox_id: int, verb: str, target: str) -> Reply:
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        return {"ok": False, "error": "The sandbox no longer exists."}
    try:
        if verb == "list":
            result: Any = asdict(devices.list_devices(sandbox))
        elif verb == "approve":
            result = asdict(devices.approve(sandbox, target))
        elif verb == "revoke":
            devices.revoke(sandbox, target)
            result = None
        else:
            return {"ok": False, "error": f"Unknown device request {verb!r}."}
    except devices.DeviceError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "result": _json_safe(result)}

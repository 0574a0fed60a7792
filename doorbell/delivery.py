"""Hand one Telegram update to the agent's gateway, through OpenClaw's ``/hooks/agent``.

Why ``/hooks/agent`` and not OpenClaw's Telegram webhook mode: the portal reaches a sandbox's
gateway through exactly one forwarded port (the gateway's own), and ``/hooks/agent`` is served
on it; webhook mode's listener is a second server (``webhookHost:webhookPort``, 127.0.0.1:8787
inside the sandbox) that no forward reaches. ``/hooks/agent`` answers ``200 {"ok": true,
"runId"}`` once the run is admitted (our "accepted" boundary), takes an ``idempotencyKey`` that
it uses to drop replays, and delivers the agent's answer itself through its Telegram channel
(``deliver``, ``channel: "telegram"``, ``to: <chat id>``).

Exactly once. A row is marked delivered in the same transaction that sent it, after the
gateway's 200. A worker that dies after the 200 and before the commit leaves the row pending,
and the next delivery sends it again with the same ``idempotencyKey``
(``telegram:<webhook id>:<update_id>``), which OpenClaw answers as a replay of the run it
already has, without running it again (shown on a real gateway in test_telegram_e2e.py).
OpenClaw keeps that replay record in memory: while the run is pending or running, and for
5 minutes after it ends; a gateway restart forgets it. So the exact window for a double answer
is: a worker dies in that gap, *and* the re-delivery comes more than 5 minutes after the run
ended or after the gateway restarted (a cold stop and boot; a checkpoint keeps its memory).
Beat re-queues a row left pending for HERMIT_TELEGRAM_REQUEUE_AFTER (60 s) every 30 s, so a
re-delivery normally comes well inside the 5 minutes.

What is sent: the message text (or a photo's caption), in a persistent session per chat
(``hook:telegram:<chat id>``), so a conversation continues from message to message. Updates
with no text (stickers, voice, service messages) are marked delivered with a note and skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from doorbell.models import TelegramLink, TelegramUpdate
from sandboxes import actions as sandbox_actions
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

log = logging.getLogger(__name__)
TIMEOUT = 30.0  # OpenClaw admits a run within 15 s or answers 503
AGENT_ID = "main"
SESSION_PREFIX = "hook:telegram:"


@dataclass(frozen=True)
class Result:
    accepted: bool  # the row is done (delivered, or skipped for good)
    error: str = ""


def message_of(update: dict[str, Any]) -> dict[str, Any] | None:
    found = update.get("message") or update.get("edited_message")
    return found if isinstance(found, dict) else None


def hook_payload(link: TelegramLink, update: dict[str, Any]) -> dict[str, Any] | None:
    """The ``/hooks/agent`` body for ``update``, or None if it carries no text for the agent."""
    message = message_of(update)
    if message is None:
        return None
    text = message.get("text") or message.get("caption")
    chat = message.get("chat") or {}
    if not isinstance(text, str) or not text.strip() or "id" not in chat:
        return None
    return {
        "message": text,
        "name": "Telegram",
        "agentId": AGENT_ID,
        "sessionKey": f"{SESSION_PREFIX}{chat['id']}",
        "sessionMode": "persistent",
        "deliver": True,
        "channel": "telegram",
        "to": str(chat["id"]),
        "idempotencyKey": f"telegram:{link.webhook_id}:{update['update_id']}",
    }


def deliver(sandbox: Sandbox, link: TelegramLink, row: TelegramUpdate) -> Result:
    """POST ``row``'s update to the sandbox's gateway. Never raises: a failure is a Result
    with ``accepted`` False (retry later) and a reason without secrets."""
    payload = hook_payload(link, row.payload)
    if payload is None:
        return Result(True, "skipped: no text for the agent")
    try:
        host, port = sandbox_actions.gateway_endpoint(sandbox)
    except BackendError as exc:
        return Result(False, f"the agent is not reachable: {exc}")
    try:
        response = httpx.post(
            f"http://{host}:{port}/hooks/agent",
            json=payload,
            headers={"Authorization": f"Bearer {link.hook_token}"},
            timeout=TIMEOUT,
        )
    except httpx.HTTPError as exc:
        return Result(False, f"the gateway did not answer: {exc.__class__.__name__}")
    if response.status_code == 200:
        return Result(True)
    error = f"the gateway answered {response.status_code}: {response.text[:200]}"
    log.warning("sandbox %s: Telegram update %s: %s", sandbox.pk, row.update_id, error)
    if response.status_code == 400:  # this payload will never be admitted: do not block the rest
        return Result(True, f"refused: {error}")
    return Result(False, error)

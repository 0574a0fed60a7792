"""Recording sandbox events and pushing them to live listeners (dashboard, chat)."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from sandboxes.models import Sandbox, SandboxEvent

log = logging.getLogger(__name__)


def group_name(sandbox_id: int) -> str:
    return f"sandbox.{sandbox_id}"


def record_event(
    sandbox: Sandbox,
    kind: str,
    message: str = "",
    *,
    progress: int | None = None,
    actor: str = SandboxEvent.Actor.SYSTEM,
    actor_user: Any = None,
) -> SandboxEvent:
    """Store one event and broadcast it to the sandbox's channel-layer group."""
    event = SandboxEvent.objects.create(
        sandbox=sandbox,
        kind=kind,
        message=message,
        progress=progress,
        actor=actor,
        actor_user=actor_user,
        state=sandbox.state,
    )
    broadcast(event)
    return event


def event_payload(event: SandboxEvent) -> dict[str, Any]:
    return {
        "type": "sandbox.event",
        "id": event.pk,
        "kind": event.kind,
        "message": event.message,
        "progress": event.progress,
        "state": event.state,
        "created_at": event.created_at.isoformat(),
    }


def broadcast(event: SandboxEvent) -> None:
    """Send the event to listeners; a channel layer outage never breaks the action itself."""
    _send(event.sandbox_id, event_payload(event))


def broadcast_progress(sandbox: Sandbox, percent: int, message: str) -> None:
    """Show a progress tick to live listeners without storing it as an event."""
    _send(
        sandbox.pk,
        {
            "type": "sandbox.event",
            "id": None,
            "kind": "progress",
            "message": message,
            "progress": percent,
            "state": sandbox.state,
            "created_at": timezone.now().isoformat(),
        },
    )


def _send(sandbox_id: int, payload: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_name(sandbox_id), payload)
    except Exception:
        log.warning("could not broadcast %s for sandbox %s", payload["kind"], sandbox_id)

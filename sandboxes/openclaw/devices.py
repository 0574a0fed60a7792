"""The devices paired with a sandbox's gateway, through OpenClaw's device API (protocol v4).

A device (a browser's Control UI, a CLI, a phone app) holds an Ed25519 key; a new one that
the gateway does not approve by itself (anything not on its loopback with the shared token,
say a client sent from a browser page) waits as a *pending* request until an operator
approves it. Staff do that from the admin, as OpenClaw's ``openclaw devices approve`` does:

- :func:`list_devices`: ``device.pair.list`` → pending requests and paired devices;
- :func:`approve`: ``device.pair.approve {requestId}``;
- :func:`revoke`: ``device.token.revoke {deviceId, role}``: the device's token for that role
  stops working at once (it must pair again).

Each call opens its own connection as the portal's own device for that sandbox (the key the
chat uses, sandboxes.consumers.chat.device_identity_for), with the shared gateway token and the
``operator.pairing`` and ``operator.admin`` scopes, and closes it. Every failure (the sandbox
is not running, the gateway refuses or does not answer within TIMEOUT) raises DeviceError
with a sentence for staff; no secret (token, key) is ever in it.

These calls run in the privileged worker on the sandbox's host (sandboxes.tasks_host
``device_call``); the admin, an unprivileged web process, uses :func:`ask`, which queues that
task and waits for its reply (ASK_TIMEOUT), raising DeviceError if none comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import async_to_sync

from sandboxes import actions
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox
from sandboxes.openclaw.protocol import (
    ClientInfo,
    DeviceIdentity,
    GatewayConnection,
    GatewayError,
    GatewayUnavailable,
)

TIMEOUT = 5.0
ASK_TIMEOUT = 3 * TIMEOUT  # a connect and a request, plus the queue
SCOPES = ("operator.read", "operator.write", "operator.pairing", "operator.admin")


class DeviceError(Exception):
    """The device API could not be reached or refused the request (the message says why)."""


@dataclass(frozen=True)
class PendingDevice:
    request_id: str
    device_id: str
    client: str
    platform: str
    role: str
    scopes: tuple[str, ...]
    requested_at: datetime | None


@dataclass(frozen=True)
class PairedDevice:
    device_id: str
    client: str
    platform: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    approved_via: str
    approved_at: datetime | None
    last_seen_at: datetime | None
    connected: bool
    active_roles: tuple[str, ...]  # roles whose token is not revoked


@dataclass(frozen=True)
class Devices:
    pending: list[PendingDevice]
    paired: list[PairedDevice]


def _when(ms: Any) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if isinstance(ms, int | float) else None


def _client(entry: dict[str, Any]) -> str:
    return " / ".join(str(entry[k]) for k in ("clientId", "clientMode") if entry.get(k))


def parse(payload: dict[str, Any]) -> Devices:
    """Return the devices in a ``device.pair.list`` answer."""
    pending = [
        PendingDevice(
            request_id=str(p.get("requestId", "")),
            device_id=str(p.get("deviceId", "")),
            client=_client(p),
            platform=str(p.get("platform", "")),
            role=str(p.get("role", "")),
            scopes=tuple(p.get("scopes") or ()),
            requested_at=_when(p.get("ts")),
        )
        for p in payload.get("pending") or ()
    ]
    paired = [
        PairedDevice(
            device_id=str(d.get("deviceId", "")),
            client=_client(d),
            platform=str(d.get("platform", "")),
            roles=tuple(d.get("roles") or ([d["role"]] if d.get("role") else [])),
            scopes=tuple(d.get("scopes") or ()),
            approved_via=str(d.get("approvedVia", "")),
            approved_at=_when(d.get("approvedAtMs")),
            last_seen_at=_when(d.get("lastSeenAtMs")),
            connected=bool(d.get("connected")),
            active_roles=tuple(
                str(t.get("role"))
                for t in d.get("tokens") or ()
                if t.get("role") and not t.get("revokedAtMs")
            ),
        )
        for d in payload.get("paired") or ()
    ]
    return Devices(pending, paired)


async def _call(
    url: str, token: str, identity: DeviceIdentity, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    conn = await GatewayConnection.open(
        url,
        token=token,
        identity=identity,
        info=ClientInfo(scopes=SCOPES),
        timeout=TIMEOUT,
    )
    try:
        return await conn.request(method, params, timeout=TIMEOUT)
    finally:
        await conn.close()


def call(sandbox: Sandbox, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one device API request on the sandbox's gateway; raise DeviceError on failure."""
    if sandbox.state != Sandbox.State.RUNNING:
        raise DeviceError(f"The agent is {sandbox.state}: devices are read from its gateway.")
    from sandboxes.consumers.chat import device_identity_for  # the portal's key for this sandbox

    try:
        host, port = actions.gateway_endpoint(sandbox)
        identity = device_identity_for(sandbox)
        url, token = f"ws://{host}:{port}", sandbox.gateway_token
        return async_to_sync(_call)(url, token, identity, method, params)
    except BackendError as exc:
        raise DeviceError(f"The gateway cannot be reached: {exc}") from exc
    except GatewayUnavailable as exc:
        raise DeviceError(f"The gateway did not answer: {exc.message}") from exc
    except GatewayError as exc:
        raise DeviceError(f"The gateway refused {method}: {exc.message}") from exc


def list_devices(sandbox: Sandbox) -> Devices:
    return parse(call(sandbox, "device.pair.list", {}))


def approve(sandbox: Sandbox, request_id: str) -> PairedDevice:
    """Approve the pending request ``request_id``; return the device as now paired."""
    answer = call(sandbox, "device.pair.approve", {"requestId": request_id})
    return parse({"paired": [answer.get("device") or {}]}).paired[0]


def revoke(sandbox: Sandbox, device_id: str, role: str = "operator") -> None:
    """Revoke the device's token for ``role``."""
    call(sandbox, "device.token.revoke", {"deviceId": device_id, "role": role})


# -- from the web process, through the worker -------------------------------------------------


def _datetime(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def pending_from(data: dict[str, Any]) -> PendingDevice:
    """A PendingDevice back from its JSON form (dataclasses.asdict, datetimes as ISO text)."""
    return PendingDevice(
        **{**data, "scopes": tuple(data["scopes"]), "requested_at": _datetime(data["requested_at"])}
    )


def paired_from(data: dict[str, Any]) -> PairedDevice:
    """A PairedDevice back from its JSON form (see :func:`pending_from`)."""
    return PairedDevice(
        **{
            **data,
            "roles": tuple(data["roles"]),
            "scopes": tuple(data["scopes"]),
            "active_roles": tuple(data["active_roles"]),
            "approved_at": _datetime(data["approved_at"]),
            "last_seen_at": _datetime(data["last_seen_at"]),
        }
    )


def ask(sandbox: Sandbox, verb: str, target: str = "", timeout: float = ASK_TIMEOUT) -> Any:
    """Run ``list``, ``approve`` or ``revoke`` in the worker on the sandbox's host and return
    its JSON result; raise DeviceError with the worker's sentence, or if it did not answer."""
    from sandboxes import tasks_host

    token = tasks_host.new_token()
    tasks_host.device_call.delay(sandbox.pk, token, verb, target)
    reply = tasks_host.wait_reply(token, timeout)
    if reply is None:
        raise DeviceError(f"The sandbox's host could not report within {timeout:g} s.")
    if not reply.get("ok"):
        raise DeviceError(str(reply.get("error") or "The device request failed."))
    return reply.get("result")


def ask_list(sandbox: Sandbox) -> Devices:
    """:func:`list_devices`, through the worker (see :func:`ask`)."""
    if sandbox.state != Sandbox.State.RUNNING:  # no need to ask: say so at once
        raise DeviceError(f"The agent is {sandbox.state}: devices are read from its gateway.")
    found = ask(sandbox, "list")
    return Devices(
        [pending_from(p) for p in found["pending"]], [paired_from(p) for p in found["paired"]]
    )


def ask_approve(sandbox: Sandbox, request_id: str) -> PairedDevice:
    """:func:`approve`, through the worker (see :func:`ask`)."""
    return paired_from(ask(sandbox, "approve", request_id))


def ask_revoke(sandbox: Sandbox, device_id: str) -> None:
    """:func:`revoke`, through the worker (see :func:`ask`)."""
    ask(sandbox, "revoke", device_id)

"""Suspending and deleting a user, end to end, on a real OpenClaw gateway in a real sandbox
(the session's pooled one, tests/fixtures/sandboxes.py): staff act in the admin, the queued
Celery tasks run, and the gateway, the AI gateway and the chat consumer all follow. The suspend
and delete tests stop that gateway for good, so they run at the end of the session."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from unittest import mock

import httpx
import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from ai_gateway.credentials import authenticate, rotate_credential
from portal.asgi import application
from sandboxes import actions, tasks
from sandboxes.backends import get_backend
from sandboxes.models import AccountDeletion, Sandbox, Suspension
from sandboxes.openclaw import devices
from sandboxes.openclaw.protocol import ClientInfo, DeviceIdentity, GatewayConnection, GatewayError
from tests.fixtures.backend import volume_of
from tests.fixtures.chat import session_cookie

EMAIL = "alice@chat.test"
USERS = "admin:auth_user_changelist"


def gateway_runs(sandbox: Sandbox) -> bool:
    backend = get_backend(sandbox.backend)
    return backend.poll(actions.spec_for(sandbox), sandbox.backend_state).running


def model_call(ai_gateway_server: Any, key: str) -> httpx.Response:
    return httpx.post(
        f"{ai_gateway_server.url}/ai/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


async def first_chat_status(cookie: str) -> dict[str, Any]:
    """Open a chat as the cookie's user; return the first status frame that is not
    "connecting"."""
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver"),
               (b"cookie", cookie.encode())]  # fmt: skip
    comm = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await comm.connect(timeout=10)
    assert connected
    try:
        while True:
            frame = json.loads(await comm.receive_from(timeout=30))
            if frame["type"] == "status" and frame["state"] != "connecting":
                return frame
    finally:
        await comm.disconnect()


@pytest.fixture
def alice_sandbox(sandbox_for: Callable[..., Sandbox]) -> Sandbox:
    """The pooled sandbox, restored before any other row is made (staff's among them)."""
    return sandbox_for(EMAIL)


def run_stops(delay: mock.MagicMock) -> None:
    # The tasks run here, eagerly: their results are ready, so get() never waits (it must not
    # refuse because of what an earlier test left in Celery's process-wide "inside a task" flag).
    for call in delay.call_args_list:
        tasks.stop_sandbox.apply(args=call.args).get(disable_sync_subtasks=False)


async def ask_to_pair(sandbox: Sandbox, identity: DeviceIdentity) -> str:
    """Connect as a new device from a browser page (not approved by itself); return the id of
    the pairing request it leaves, or "" if it was let in."""
    host, port = await database_sync_to_async(actions.gateway_endpoint)(sandbox)
    try:
        conn = await GatewayConnection.open(
            f"ws://{host}:{port}", token=sandbox.gateway_token, identity=identity,
            info=ClientInfo(client_id="cli", mode="cli"), origin=settings.SITE_URL,
        )  # fmt: skip
    except GatewayError as exc:
        assert exc.code == "NOT_PAIRED", exc
        return str(exc.details["requestId"])
    await conn.close()
    return ""


def test_it_approves_and_revokes_a_paired_device(
    alice_sandbox: Sandbox, staff: Any, client: Client
) -> None:
    sandbox = alice_sandbox
    phone = DeviceIdentity.generate()
    request_id = async_to_sync(ask_to_pair)(sandbox, phone)
    assert request_id
    client.force_login(staff)
    page_url = reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk])
    page = client.get(page_url).content.decode()
    assert f'name="request_id" value="{request_id}"' in page
    approve = reverse("admin:sandboxes_sandbox_device", args=[sandbox.pk, "approve"])
    assert f'formaction="{approve}"' in page

    response = client.post(approve, {"request_id": request_id}, follow=True)
    assert f"Staff approved device {phone.device_id[:12]}" in response.content.decode()
    event = sandbox.events.get(kind="device-approved")
    assert (event.actor, event.actor_user) == ("staff", staff)
    found = devices.list_devices(sandbox)
    assert request_id not in {p.request_id for p in found.pending}
    paired = {d.device_id: d for d in found.paired}
    assert paired[phone.device_id].active_roles == ("operator",)
    assert async_to_sync(ask_to_pair)(sandbox, phone) == ""  # now it is let in

    revoke = reverse("admin:sandboxes_sandbox_device", args=[sandbox.pk, "revoke"])
    client.post(revoke, {"device_id": phone.device_id})
    assert sandbox.events.get(kind="device-revoked").actor_user == staff
    paired = {d.device_id: d for d in devices.list_devices(sandbox).paired}
    assert paired[phone.device_id].active_roles == ()  # its token is revoked
    assert async_to_sync(ask_to_pair)(sandbox, phone) not in ("", request_id)  # pairs again


def test_it_suspends_a_user_on_a_real_gateway(
    alice_sandbox: Sandbox, staff: Any, client: Client, ai_gateway_server: Any
) -> None:
    sandbox = alice_sandbox
    alice = sandbox.owner
    assert gateway_runs(sandbox)
    key = rotate_credential(sandbox)  # the gateway stops anyway; this key stands in for its own
    client.force_login(staff)
    with mock.patch.object(tasks.stop_sandbox, "delay") as delay:
        data = {"action": "suspend", "_selected_action": [alice.pk], "apply": "yes",
                "reason": "Abuse report 42"}  # fmt: skip
        client.post(reverse(USERS), data)
    assert Suspension.objects.filter(user=alice, suspended_by=staff).exists()
    run_stops(delay)
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED
    stopped = Sandbox.objects.get(pk=sandbox.pk)
    assert not gateway_runs(stopped) and not stopped.backend_state

    refused = model_call(ai_gateway_server, key)
    assert refused.status_code == 403
    assert "suspended" in refused.text

    status = async_to_sync(first_chat_status)(session_cookie(alice))
    assert status["state"] == "failed"
    assert "Your account is suspended" in status["message"]
    assert "Abuse report 42" in status["message"]
    tasks.start_sandbox.apply(args=[sandbox.pk]).get(disable_sync_subtasks=False)
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED
    event = sandbox.events.get(kind="suspended")
    assert (event.actor, event.actor_user) == ("staff", staff)


def test_it_deletes_an_account_on_a_real_gateway(
    alice_sandbox: Sandbox, staff: Any, client: Client, ai_gateway_server: Any, settings: Any
) -> None:
    settings.HERMIT_DELETE_GRACE_DAYS = 0
    sandbox = alice_sandbox
    alice = sandbox.owner
    data_dir = volume_of(sandbox)
    assert gateway_runs(sandbox) and any(data_dir.iterdir())
    key = rotate_credential(sandbox)
    client.force_login(staff)
    with (
        mock.patch.object(tasks.stop_sandbox, "delay") as stop,
        mock.patch.object(tasks.purge_account, "delay") as purge,
    ):
        data = {"action": "delete_account", "_selected_action": [alice.pk], "apply": "yes",
                "confirm": "on"}  # fmt: skip
        client.post(reverse(USERS), data)
    deletion = AccountDeletion.objects.get(user=alice)
    assert deletion.requested_by == staff
    run_stops(stop)
    assert not gateway_runs(Sandbox.objects.get(pk=sandbox.pk))
    assert model_call(ai_gateway_server, key).status_code == 403

    purge.assert_called_once_with(deletion.pk)
    assert tasks.purge_account.apply(args=[deletion.pk]).get(disable_sync_subtasks=False) is True
    assert not data_dir.exists()
    assert not get_user_model().objects.filter(pk=alice.pk).exists()
    assert authenticate(key) is None
    assert model_call(ai_gateway_server, key).status_code == 401
    deletion.refresh_from_db()
    assert deletion.purged_at is not None and deletion.email == EMAIL

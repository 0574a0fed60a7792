"""Tenancy: alice sees only her sandbox and events; bob and anonymous users see nothing of hers."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator
from django.http import Http404
from django.test import Client
from django.urls import reverse

from portal.asgi import application
from sandboxes.access import get_sandbox_for_user
from sandboxes.events import record_event
from sandboxes.models import Sandbox, SandboxEvent

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def charlie(db: None) -> object:
    """A signed-up user with no sandbox at all (say staff deleted it)."""
    from tests.factories import make_user

    user = make_user("charlie@example.com")
    Sandbox.objects.filter(owner=user).delete()
    return user


def test_it_gives_each_user_only_their_own_sandbox(alice: object, bob: object) -> None:
    assert get_sandbox_for_user(alice).owner == alice
    assert get_sandbox_for_user(bob).owner == bob
    with pytest.raises(Http404):
        get_sandbox_for_user(bob, name="alices-other")


def test_it_refuses_bob_alices_sandbox_by_its_name(alice: object, bob: object) -> None:
    research = Sandbox.objects.create(owner=alice, name="research")
    assert get_sandbox_for_user(alice, name="research") == research
    with pytest.raises(Http404):
        get_sandbox_for_user(bob, name="research")  # exists, but is alice's
    assert get_sandbox_for_user(bob, name="default").owner == bob


def test_it_refuses_a_user_with_no_sandbox_on_every_page(client: Client, charlie: object) -> None:
    with pytest.raises(Http404):
        get_sandbox_for_user(charlie)
    client.force_login(charlie)  # type: ignore[arg-type]
    for name in ("dashboard", "chat", "controlui-open"):
        assert client.get(reverse(name)).status_code == 404, name
    assert client.post(reverse("sandbox-start")).status_code == 404
    assert not Sandbox.objects.filter(owner=charlie).exists()  # nothing made on the way


@pytest.mark.parametrize("path", ["/ws/sandbox/progress/", "/ws/chat/"])
async def test_it_closes_every_socket_of_a_user_with_no_sandbox(charlie: object, path: str) -> None:
    ws = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://127.0.0.1:8000")])
    ws.scope["user"] = charlie
    connected, code = await ws.connect()
    assert (connected, code) == (False, 4404)
    await ws.disconnect()


def test_it_refuses_anonymous_users() -> None:
    from django.contrib.auth.models import AnonymousUser

    with pytest.raises(Http404):
        get_sandbox_for_user(AnonymousUser())


def test_it_shows_bob_none_of_alices_events(client: Client, alice: object, bob: object) -> None:
    alices = Sandbox.objects.get(owner=alice)
    record_event(alices, "progress", "alice-secret-step", progress=42)
    client.force_login(bob)  # type: ignore[arg-type]
    page = client.get(reverse("dashboard")).content.decode()
    assert "alice-secret-step" not in page
    client.force_login(alice)  # type: ignore[arg-type]
    assert "alice-secret-step" in client.get(reverse("dashboard")).content.decode()


def test_it_redirects_anonymous_dashboard_visits(client: Client) -> None:
    response = client.get(reverse("dashboard"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("account_login"))


async def _connect(user: object | None) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(
        application, "/ws/sandbox/progress/", headers=[(b"origin", b"http://127.0.0.1:8000")]
    )
    if user is not None:
        communicator.scope["user"] = user
    return communicator


async def test_it_streams_progress_only_to_the_owner(alice: object, bob: object) -> None:
    from asgiref.sync import sync_to_async

    alices = await Sandbox.objects.aget(owner=alice)
    alice_ws = await _connect(alice)
    bob_ws = await _connect(bob)
    try:
        assert (await alice_ws.connect())[0]
        assert (await bob_ws.connect())[0]
        await sync_to_async(record_event)(alices, "progress", "halfway", progress=50)
        event = await alice_ws.receive_json_from(timeout=5)
        assert (event["message"], event["progress"]) == ("halfway", 50)
        assert await bob_ws.receive_nothing(timeout=0.5)
    finally:
        await alice_ws.disconnect()
        await bob_ws.disconnect()


async def test_it_closes_progress_for_anonymous_users() -> None:
    ws = await _connect(None)
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


async def test_it_streams_progress_written_by_another_process_without_redis(
    alice: object, settings: object
) -> None:
    """The embedded default has no shared channel layer: the worker's events still arrive."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}  # type: ignore[attr-defined]
    alices = await Sandbox.objects.aget(owner=alice)
    ws = await _connect(alice)
    try:
        assert (await ws.connect())[0]
        # Written straight to the database, as a Celery worker process would: no broadcast.
        await SandboxEvent.objects.acreate(
            sandbox=alices, kind="progress", message="from the worker", progress=60
        )
        event = await ws.receive_json_from(timeout=5)
        assert (event["message"], event["progress"]) == ("from the worker", 60)
    finally:
        await ws.disconnect()

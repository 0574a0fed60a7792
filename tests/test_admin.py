"""Staff pages load, search and filter; staff actions are recorded as events."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from sandboxes.models import Sandbox

pytestmark = pytest.mark.django_db

PAGES = [
    "admin:index",
    "admin:auth_user_changelist",
    "admin:billing_plan_changelist",
    "admin:billing_account_changelist",
    "admin:sandboxes_sandbox_changelist",
    "admin:sandboxes_sandboxevent_changelist",
    "admin:sandboxes_runtimeimage_changelist",
    "admin:django_celery_beat_periodictask_changelist",
]


@pytest.mark.parametrize("name", PAGES)
def test_it_loads_admin_pages(client: Client, staff: object, alice: object, name: str) -> None:
    client.force_login(staff)  # type: ignore[arg-type]
    assert client.get(reverse(name)).status_code == 200
    assert client.get(reverse(name), {"q": "alice"}).status_code == 200


def test_it_loads_sandbox_and_plan_change_pages(
    client: Client, staff: object, alice: object
) -> None:
    client.force_login(staff)  # type: ignore[arg-type]
    sandbox = Sandbox.objects.get(owner=alice)
    page = client.get(reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk]))
    assert page.status_code == 200
    assert sandbox.gateway_token not in page.content.decode()
    plan_page = client.get(reverse("admin:billing_plan_change", args=[1]))
    assert plan_page.status_code == 200


def test_it_filters_sandboxes_by_state(client: Client, staff: object, alice: object) -> None:
    client.force_login(staff)  # type: ignore[arg-type]
    url = reverse("admin:sandboxes_sandbox_changelist")
    assert "alice" in client.get(url, {"state": "provisioning"}).content.decode()
    assert "alice@" not in client.get(url, {"state": "running"}).content.decode()


def test_it_refuses_non_staff(client: Client, alice: object) -> None:
    client.force_login(alice)  # type: ignore[arg-type]
    response = client.get(reverse("admin:sandboxes_sandbox_changelist"))
    assert response.status_code == 302


def test_it_records_staff_actions(client: Client, staff: object, alice: object, settings) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    sandbox = Sandbox.objects.get(owner=alice)
    client.force_login(staff)  # type: ignore[arg-type]
    from unittest import mock

    with mock.patch("sandboxes.tasks.stop_sandbox.delay") as delay:
        client.post(
            reverse("admin:sandboxes_sandbox_changelist"),
            {"action": "stop", "_selected_action": [sandbox.pk]},
        )
    delay.assert_called_once_with(sandbox.pk)
    event = sandbox.events.first()
    assert event is not None
    assert (event.actor, event.actor_user, event.message) == (
        "staff",
        staff,
        "Staff requested stop",
    )

"""Staff pages load, search and filter; staff actions are recorded as events and need a
permission beyond viewing; the admin is reached only through allauth's login with TOTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import SECRET_SESSION_KEY
from allauth.mfa.utils import decrypt
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from sandboxes.models import RuntimeImage, Sandbox
from tests.factories import PASSWORD, make_user
from tests.mfa import enroll_totp, totp_now

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


# --- Signing in: through allauth, with TOTP required -------------------------------------------


def _admin_login_redirect(client: Client) -> str:
    """Follow /admin/ to wherever its login sends this client; return that URL."""
    response = client.get(reverse("admin:index"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    response = client.get(response["Location"])
    assert response.status_code == 302, "the admin's own login form must not be served"
    return str(response["Location"])


def test_it_sends_the_admin_login_to_allauth(client: Client) -> None:
    target = _admin_login_redirect(client)
    assert target == f"{reverse('account_login')}?next=%2Fadmin%2F"


def test_it_takes_no_password_at_the_admin_login(client: Client, staff: object) -> None:
    response = client.post(
        f"{reverse('admin:login')}?next=/admin/",
        {"username": "staff", "password": PASSWORD, "next": "/admin/"},
    )
    assert response.status_code == 302
    assert "_auth_user_id" not in client.session
    assert client.get(reverse("admin:index")).status_code == 302


def test_it_rate_limits_admin_sign_in(client: Client) -> None:
    make_user("ops@example.com", is_staff=True, is_superuser=True)
    admin_login = f"{reverse('admin:login')}?next=/admin/"
    for _ in range(5):  # the admin's login form took any number of these
        client.post(admin_login, {"username": "ops", "password": "wrong", "next": "/admin/"})
    login = _admin_login_redirect(client)
    for _ in range(5):
        client.post(login, {"login": "ops@example.com", "password": "wrong"})
    response = client.post(login, {"login": "ops@example.com", "password": PASSWORD})
    assert response.status_code in (200, 429)
    assert "_auth_user_id" not in client.session  # even the right password is refused now


def test_it_needs_the_totp_code_of_an_enrolled_superuser(client: Client) -> None:
    user = make_user("root@example.com", is_staff=True, is_superuser=True)
    secret = enroll_totp(user)
    login = _admin_login_redirect(client)
    response = client.post(login, {"login": "root@example.com", "password": PASSWORD})
    assert response["Location"] == reverse("mfa_authenticate")
    assert client.get(reverse("admin:index")).status_code == 302  # the password alone: no
    client.post(reverse("mfa_authenticate"), {"code": "000000"})
    assert client.get(reverse("admin:index")).status_code == 302
    response = client.post(reverse("mfa_authenticate"), {"code": totp_now(secret)})
    assert response["Location"] == reverse("admin:index")
    assert client.get(reverse("admin:index")).status_code == 200


def test_it_sends_staff_without_totp_to_set_it_up(client: Client) -> None:
    make_user("new-staff@example.com", is_staff=True)
    login = _admin_login_redirect(client)
    client.post(login, {"login": "new-staff@example.com", "password": PASSWORD})
    assert client.get(reverse("dashboard")).status_code == 200  # signed in as a user
    setup = _admin_login_redirect(client)
    assert setup == f"{reverse('mfa_activate_totp')}?next=%2Fadmin%2F"
    page = client.get(setup, follow=True)  # allauth asks for the password again first
    assert "The admin needs two-factor authentication" in page.content.decode()
    assert page.redirect_chain[-1][0].startswith(reverse("account_reauthenticate"))
    client.post(page.redirect_chain[-1][0], {"password": PASSWORD})
    assert client.get(setup).status_code == 200
    response = client.post(
        reverse("mfa_activate_totp"), {"code": totp_now(client.session[SECRET_SESSION_KEY])}
    )
    assert response.status_code == 302
    # Set up, then asked for a code once in this session, and in.
    check = _admin_login_redirect(client)
    assert check == f"{reverse('mfa_reauthenticate')}?next=%2Fadmin%2F"
    secret = decrypt(Authenticator.objects.get(type="totp").data["secret"])
    response = client.post(check, {"code": totp_now(secret)})
    assert response["Location"] == "/admin/"
    assert client.get(reverse("admin:index")).status_code == 200


def test_it_asks_a_session_without_a_second_factor_for_one(staff: object) -> None:
    plain = Client()  # force_login without the TOTP step
    plain.force_login(staff)  # type: ignore[arg-type]
    assert plain.get(reverse("admin:index")).status_code == 302
    assert _admin_login_redirect(plain).startswith(reverse("mfa_reauthenticate"))


def test_it_refuses_the_admin_login_to_signed_in_users(client: Client, alice: object) -> None:
    client.force_login(alice)  # type: ignore[arg-type]
    assert client.get(reverse("admin:login")).status_code == 403


# --- Actions need more than the view permission ------------------------------------------------


def _staff_with(*codenames: str) -> Any:
    user = make_user("helpdesk@example.com", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    enroll_totp(user)
    return user


@pytest.mark.parametrize("can_operate", [False, True])
def test_it_runs_sandbox_actions_only_for_operators(
    client: Client, alice: object, settings, can_operate: bool
) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    perms = ["view_sandbox", "operate_sandbox"] if can_operate else ["view_sandbox"]
    client.force_login(_staff_with(*perms))
    sandbox = Sandbox.objects.get(owner=alice)
    url = reverse("admin:sandboxes_sandbox_changelist")
    page = client.get(url).content.decode()
    for action in ("start", "stop", "restart"):
        assert (f'value="{action}"' in page) is can_operate
    with mock.patch("sandboxes.tasks.stop_sandbox.delay") as delay:
        client.post(url, {"action": "stop", "_selected_action": [sandbox.pk]})
    assert delay.called is can_operate
    assert sandbox.events.filter(actor="staff").exists() is can_operate


@pytest.mark.parametrize("can_change", [False, True])
def test_it_makes_a_runtime_current_only_for_staff_who_may_change_it(
    client: Client, tmp_path: Path, can_change: bool
) -> None:
    perms = ["view_runtimeimage", "change_runtimeimage"] if can_change else ["view_runtimeimage"]
    client.force_login(_staff_with(*perms))
    (tmp_path / "new").mkdir()
    new = RuntimeImage.objects.create(
        openclaw_version="2026.10.1", node_version="24.21.0", path=str(tmp_path / "new"),
        status=RuntimeImage.Status.READY,
    )  # fmt: skip
    url = reverse("admin:sandboxes_runtimeimage_changelist")
    assert ('value="make_current"' in client.get(url).content.decode()) is can_change
    client.post(url, {"action": "make_current", "_selected_action": [new.pk]})
    new.refresh_from_db()
    assert new.is_current is can_change

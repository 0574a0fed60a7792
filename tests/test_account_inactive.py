"""Signing in to an account that is not active says why: a deleted account, when it was deleted,
when its data goes, and that support can undo it until then; any other, a generic note."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from sandboxes import accounts
from tests.factories import PASSWORD, make_user

pytestmark = pytest.mark.django_db
DELETED = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)


def sign_in(client: Client, email: str, password: str = PASSWORD) -> tuple[str, str]:
    """Return the page signing in ends on, and its path."""
    response = client.post(
        reverse("account_login"), {"login": email, "password": password}, follow=True
    )
    assert response.status_code == 200
    return response.content.decode(), response.request["PATH_INFO"]


def test_it_tells_a_deleted_user_the_dates_and_that_support_can_undo_it(
    client: Client, settings: Any
) -> None:
    settings.HERMIT_DELETE_GRACE_DAYS = 14
    settings.DEFAULT_FROM_EMAIL = "Hermit Support <help@hermit.test>"
    alice = make_user("alice@example.com")
    with time_machine.travel(DELETED, tick=False):
        accounts.request_deletion(alice, by=alice)
    with time_machine.travel(DELETED + timedelta(days=2), tick=False):
        page, path = sign_in(client, "alice@example.com")
    assert path == reverse("account_inactive")
    assert "_auth_user_id" not in client.session
    assert "This account was deleted on <time" in page and "6 December 2026</time>" in page
    assert "will be removed on" in page and "20 December 2026, 09:30 UTC" in page
    assert "support can undo the deletion" in page
    assert 'href="mailto:help@hermit.test"' in page
    assert "This account is inactive." not in page


def test_it_says_a_deletion_can_no_longer_be_undone_once_its_grace_is_over(
    client: Client,
) -> None:
    alice = make_user("alice@example.com")
    with time_machine.travel(DELETED, tick=False):
        deletion = accounts.request_deletion(alice, by=alice)
    with time_machine.travel(deletion.purge_after + timedelta(minutes=1), tick=False):
        page, _ = sign_in(client, "alice@example.com")
    assert "This account was deleted on" in page
    assert "can no longer be undone" in page and "support can undo" not in page


def test_it_gives_a_deactivated_user_a_generic_note(client: Client, settings: Any) -> None:
    settings.DEFAULT_FROM_EMAIL = "Hermit <help@hermit.test>"
    bob = make_user("bob@example.com")
    get_user_model().objects.filter(pk=bob.pk).update(is_active=False)
    page, path = sign_in(client, "bob@example.com")
    assert path == reverse("account_inactive")
    assert "This account is deactivated" in page and "help@hermit.test" in page
    assert "deleted" not in page


def test_it_tells_nothing_to_whoever_has_the_wrong_password(client: Client) -> None:
    alice = make_user("alice@example.com")
    accounts.request_deletion(alice, by=alice)
    page, path = sign_in(client, "alice@example.com", "wrong")
    assert path == reverse("account_login")
    assert "deleted" not in page
    page = client.get(reverse("account_inactive")).content.decode()
    assert "This account is deactivated" in page and "deleted on" not in page


def test_it_tells_the_user_who_signed_in_last_in_the_session(client: Client) -> None:
    alice, bob = make_user("alice@example.com"), make_user("bob@example.com")
    accounts.request_deletion(alice, by=alice)
    get_user_model().objects.filter(pk=bob.pk).update(is_active=False)
    assert "deleted on" in sign_in(client, "alice@example.com")[0]
    page, _ = sign_in(client, "bob@example.com")
    assert "This account is deactivated" in page and "deleted on" not in page

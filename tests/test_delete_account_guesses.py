"""Deleting one's account asks for the password, and wrong passwords are limited as at sign-in:
five within five minutes per user, then every password is refused until the window is over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.test import Client
from django.urls import reverse

from sandboxes.models import AccountDeletion
from sandboxes.views_account import GUESS_WINDOW, GUESSES
from tests.factories import PASSWORD, make_user

pytestmark = pytest.mark.django_db
START = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def guess(client: Client, password: str) -> tuple[int, str]:
    response = client.post(reverse("account-delete"), {"password": password})
    return response.status_code, response.content.decode()


def test_it_refuses_every_password_after_five_wrong_ones_until_the_window_ends(
    client: Client,
) -> None:
    alice = make_user("alice@example.com")
    client.force_login(alice)
    with time_machine.travel(START, tick=False) as traveller:
        for _ in range(GUESSES):
            status, page = guess(client, "wrong")
            assert status == 200 and "That is not your password." in page
        status, page = guess(client, "wrong")
        assert status == 429 and "Too many wrong passwords. Wait 5 minutes" in page
        status, page = guess(client, PASSWORD)  # the right one is refused too, unchecked
        assert status == 429 and "Too many wrong passwords." in page
        assert not AccountDeletion.objects.exists()
        traveller.shift(timedelta(seconds=GUESS_WINDOW - 1))
        assert guess(client, PASSWORD)[0] == 429
        traveller.shift(timedelta(seconds=2))
        response = client.post(reverse("account-delete"), {"password": PASSWORD})
    assert response.status_code == 302
    assert AccountDeletion.objects.get().user == alice


def test_it_counts_wrong_passwords_per_user(client: Client) -> None:
    alice, bob = make_user("alice@example.com"), make_user("bob@example.com")
    with time_machine.travel(START, tick=False):
        client.force_login(alice)
        for _ in range(GUESSES):
            guess(client, "wrong")
        assert guess(client, "wrong")[0] == 429
        client.force_login(bob)
        status, page = guess(client, "wrong")
        assert status == 200 and "That is not your password." in page


def test_it_does_not_count_the_right_password_or_an_empty_form(client: Client) -> None:
    alice = make_user("alice@example.com")
    client.force_login(alice)
    with time_machine.travel(START, tick=False):
        for _ in range(GUESSES - 1):
            guess(client, "wrong")
        for _ in range(3):
            status, page = guess(client, "")
            assert status == 200 and "This field is required." in page
        assert guess(client, PASSWORD)[0] == 302
    assert AccountDeletion.objects.filter(user=alice).exists()

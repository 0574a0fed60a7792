"""The delete-account page and the dashboard's way to it: destructive-looking buttons (class
``danger``, which hermit.css styles red; tests/test_mobile_layout.py checks the colour in
Chromium) and a wrong-password error that the password field points at."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from tests.factories import make_user

pytestmark = pytest.mark.django_db


def test_it_marks_the_delete_buttons_as_dangerous(client: Client) -> None:
    client.force_login(make_user("alice@example.com"))
    dashboard = client.get(reverse("dashboard")).content.decode()
    assert re.search(r'<a class="button danger" id="delete-account-link"', dashboard)
    page = client.get(reverse("account-delete")).content.decode()
    assert re.search(r'<button type="submit" class="danger" id="delete-account-submit"', page)


def test_it_points_the_password_field_at_its_error(client: Client) -> None:
    client.force_login(make_user("alice@example.com"))
    page = client.post(reverse("account-delete"), {"password": "wrong"}).content.decode()
    described = re.search(r'<input type="password"[^>]* aria-describedby="([^"]+)"', page)
    assert described is not None
    error = re.search(rf'<p class="message error" id="{described[1]}">([^<]*)</p>', page)
    assert error is not None and error[1] == "That is not your password."
    assert 'aria-invalid="true"' in page

"""A page someone may not open answers 403 in the site's look (templates/403.html), with a way
back, whether DEBUG is on or off."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.factories import make_user

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("debug", [True, False])
def test_it_answers_a_non_staff_user_on_the_admin_with_the_sites_403_page(
    client: Client, settings: Any, debug: bool
) -> None:
    settings.DEBUG = debug
    client.force_login(make_user("alice@example.com"))
    response = client.get("/admin/", follow=True)
    page = response.content.decode()
    assert response.status_code == 403
    assert response.redirect_chain == [("/admin/login/?next=/admin/", 302)]
    assert '<header class="topbar">' in page and "/static/css/hermit.css" in page
    assert "You can't open this page" in page
    assert '<a class="button" id="forbidden-back" href="/dashboard/">Back to your dashboard' in page
    assert "Log out" in page

"""Plain make_* helpers for tests (no JSON fixtures)."""

from __future__ import annotations

from typing import Any

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model

PASSWORD = "correct horse battery staple"


def make_user(email: str, password: str = PASSWORD, **extra: Any) -> Any:
    """Create a user with a verified primary email address; their sandbox row comes with them."""
    user = get_user_model().objects.create_user(
        username=email.split("@")[0], email=email, password=password, **extra
    )
    EmailAddress.objects.create(user=user, email=email, primary=True, verified=True)
    return user

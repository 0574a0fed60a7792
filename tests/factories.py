"""Plain make_* helpers for tests (no JSON fixtures)."""

from __future__ import annotations

from typing import Any

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher

PASSWORD = "correct horse battery staple"


class QuickPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """Django's PBKDF2 hasher with few iterations, so that each user a test makes or logs in
    costs milliseconds, not a third of a second (the tests hash a few hundred passwords).

    Its hashes are ordinary ``pbkdf2_sha256$<iterations>$...`` ones: the servers the tests
    start (with the production hasher list) check them too."""

    iterations = 1000


def make_user(email: str, password: str = PASSWORD, **extra: Any) -> Any:
    """Create a user with a verified primary email address; their sandbox row comes with them."""
    user = get_user_model().objects.create_user(
        username=email.split("@")[0], email=email, password=password, **extra
    )
    EmailAddress.objects.create(user=user, email=email, primary=True, verified=True)
    return user

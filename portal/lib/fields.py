"""Model fields for secrets: stored encrypted, read back as plain strings."""

from __future__ import annotations

from typing import Any

from django.db import models

from portal.lib import crypto


class EncryptedTextField(models.TextField):  # type: ignore[type-arg,unused-ignore]
    """A text field whose value is Fernet-encrypted in the database. Empty stays empty."""

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if not value:
            return value
        return crypto.decrypt(value)

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if not value:
            return value
        return crypto.encrypt(str(value))

"""A user's Telegram bot linked to their sandbox, and the updates Telegram sent it.

The bot token, the webhook secret and the gateway hook token are encrypted at rest
(:class:`portal.lib.fields.EncryptedTextField`). ``webhook_id`` is the opaque, random part of
the webhook URL (``/channels/telegram/<webhook_id>/``): it names the link without saying whose
it is. A bot is public (anyone can find it and write to it), so only the Telegram accounts that
sent ``/start <pairing_code>`` reach the agent (``allowed_user_ids``); the owner gets the code
on the Channels page. ``token_hash`` (SHA-256 of the bot token) lets the egress relay recognise
a linked bot without decrypting every row.

An update is stored once per (link, update_id): Telegram re-sends an update it got no 200 for,
and the unique constraint drops the copy (``INSERT ... ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.db import models
from django.utils import timezone

from portal.lib.fields import EncryptedTextField
from sandboxes.models import Sandbox


def new_webhook_id() -> str:
    return secrets.token_urlsafe(24)


def new_secret() -> str:
    # Telegram's secret_token: 1-256 characters of A-Z, a-z, 0-9, _ and -.
    return secrets.token_urlsafe(32)


def new_pairing_code() -> str:
    # A /start deep-link parameter: up to 64 characters of A-Z, a-z, 0-9, _ and -.
    return secrets.token_urlsafe(12)


def token_hash(bot_token: str) -> str:
    return hashlib.sha256(bot_token.encode()).hexdigest()


class TelegramLink(models.Model):
    """One sandbox's Telegram bot."""

    sandbox = models.OneToOneField(Sandbox, on_delete=models.CASCADE, related_name="telegram_link")
    bot_token = EncryptedTextField()
    token_hash = models.CharField(max_length=64, db_index=True)
    bot_id = models.BigIntegerField()
    bot_username = models.CharField(max_length=64)
    webhook_id = models.CharField(max_length=64, unique=True, default=new_webhook_id)
    secret = EncryptedTextField(default=new_secret)
    hook_token = EncryptedTextField(default=new_secret)  # the gateway's hooks.token
    # Who may reach the agent: Telegram user ids that sent "/start <pairing_code>".
    pairing_code = models.CharField(max_length=64, default=new_pairing_code)
    allowed_user_ids = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    webhook_set_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"@{self.bot_username} → sandbox {self.sandbox_id}"

    @property
    def pairing_link(self) -> str:
        return f"https://t.me/{self.bot_username}?start={self.pairing_code}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.token_hash = token_hash(self.bot_token)
        super().save(*args, **kwargs)


class TelegramUpdate(models.Model):
    """One update Telegram posted to a link's webhook, kept until the agent's gateway took it."""

    link = models.ForeignKey(TelegramLink, on_delete=models.CASCADE, related_name="updates")
    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="+")
    update_id = models.BigIntegerField()
    payload = models.JSONField()
    received_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["link", "update_id"], name="telegram_update_once")
        ]
        indexes = [
            models.Index(
                fields=["link", "update_id"],
                name="telegram_update_pending",
                condition=models.Q(delivered_at__isnull=True),
            )
        ]

    def __str__(self) -> str:
        return f"update {self.update_id} of link {self.link_id}"

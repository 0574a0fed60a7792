from __future__ import annotations

from django.apps import AppConfig


class DoorbellConfig(AppConfig):
    """Messenger channels (Telegram) that reach an agent even while it sleeps."""

    name = "doorbell"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from doorbell import gateway_config
        from sandboxes import channel_config

        channel_config.register_provider(gateway_config.for_sandbox)

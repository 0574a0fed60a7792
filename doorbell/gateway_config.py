"""The OpenClaw config a sandbox with a linked Telegram bot gets (registered with
:mod:`sandboxes.channel_config` at app-ready).

* ``hooks``: on, with a per-link token, so the portal can hand updates to ``/hooks/agent``
  (:mod:`doorbell.delivery`), in sessions whose keys start with ``hook:``.
* ``channels.telegram``: the bot, for the agent's replies (``sendMessage``). Its ``apiRoot`` is
  the portal's egress relay on the one host port a sandbox reaches (:mod:`doorbell.relay`), so
  plans without internet can answer too. It is in webhook mode with the portal's own webhook
  URL and secret: OpenClaw then never polls (``getUpdates``, which Telegram refuses while a
  webhook is set) and the ``setWebhook`` it sends at start is answered by the relay without
  reaching Telegram, so the portal stays the bot's only webhook.

The secrets are ``${VAR}`` references; their values travel in the gateway's environment only.
"""

from __future__ import annotations

from django.conf import settings

from doorbell.models import TelegramLink
from sandboxes.channel_config import ChannelConfig
from sandboxes.models import Sandbox

BOT_TOKEN_ENV = "HERMIT_TELEGRAM_BOT_TOKEN"
SECRET_ENV = "HERMIT_TELEGRAM_WEBHOOK_SECRET"
HOOKS_TOKEN_ENV = "HERMIT_HOOKS_TOKEN"


def relay_root() -> str:
    return f"http://127.0.0.1:{settings.HERMIT_AI_GATEWAY_PORT}/telegram"


def for_sandbox(sandbox: Sandbox) -> ChannelConfig:
    from doorbell.actions import webhook_url

    link = TelegramLink.objects.filter(sandbox=sandbox).first()
    if link is None:
        return ChannelConfig()
    config = {
        "hooks": {
            "enabled": True,
            "token": f"${{{HOOKS_TOKEN_ENV}}}",
            "path": "/hooks",
            "allowedAgentIds": ["main"],
            "allowRequestSessionKey": True,
            "allowedSessionKeyPrefixes": ["hook:"],
        },
        "channels": {
            "telegram": {
                "enabled": True,
                "botToken": f"${{{BOT_TOKEN_ENV}}}",
                "apiRoot": relay_root(),
                "webhookUrl": webhook_url(link),
                "webhookSecret": f"${{{SECRET_ENV}}}",
            }
        },
    }
    env = {
        BOT_TOKEN_ENV: link.bot_token,
        SECRET_ENV: link.secret,
        HOOKS_TOKEN_ENV: link.hook_token,
    }
    return ChannelConfig(config, env)

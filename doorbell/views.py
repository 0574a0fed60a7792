"""The Channels page (link a Telegram bot) and Telegram's webhook.

The webhook answers Telegram at once, whatever state the agent is in: it checks the secret
token (constant time), stores the update (a duplicate is dropped) and queues its delivery.
Only updates from paired Telegram accounts are kept (see ``actions.accept_update``); others get
a 200 all the same, so that Telegram does not send them again. Telegram gets 404 for an
unknown link, 403 for a wrong or missing secret, 400 for a body that is not an update.
Telegram re-sends an update until it gets a 2xx, and the 200 comes only after the row is
committed, so nothing it sent is lost.
"""

from __future__ import annotations

import hmac
import json
import logging

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from doorbell import actions, telegram
from doorbell.models import TelegramLink
from sandboxes.access import get_sandbox_for_user

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


class BotTokenForm(forms.Form):
    token = forms.CharField(
        label="Bot token (from @BotFather)",
        max_length=200,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
    )

    def clean_token(self) -> str:
        token = str(self.cleaned_data["token"])
        if not telegram.valid_token(token):
            raise forms.ValidationError(
                "That does not look like a bot token: @BotFather gives one like 123456:ABC-DEF..."
            )
        return token


@login_required
def channels_page(request: HttpRequest) -> HttpResponse:
    """GET: the user's linked bot, or a form. POST: link a bot, or unlink with
    action=disconnect."""
    sandbox = get_sandbox_for_user(request.user)
    link = TelegramLink.objects.filter(sandbox=sandbox).first()
    form = BotTokenForm()
    if request.method == "POST":
        if request.POST.get("action") == "disconnect":
            if link is not None:
                actions.disconnect(link)
                messages.success(request, "Telegram bot disconnected.")
            return redirect("channels")
        form = BotTokenForm(request.POST)
        if form.is_valid():
            try:
                link = actions.connect(sandbox, form.cleaned_data["token"])
            except telegram.TelegramError as exc:
                form.add_error("token", f"Telegram refused it: {exc}")
            else:
                messages.success(
                    request, f"@{link.bot_username} is connected: message it on Telegram."
                )
                return redirect("channels")
    pending = link.updates.filter(delivered_at=None).count() if link else 0
    return render(
        request, "doorbell/channels.html", {"form": form, "link": link, "pending": pending}
    )


@csrf_exempt
@require_POST
def telegram_webhook(request: HttpRequest, webhook_id: str) -> HttpResponse:
    link = TelegramLink.objects.filter(webhook_id=webhook_id).first()
    if link is None:
        return JsonResponse({"ok": False, "error": "unknown webhook"}, status=404)
    presented = request.headers.get(SECRET_HEADER, "")
    if not hmac.compare_digest(presented.encode(), link.secret.encode()):
        log.warning("Telegram webhook %s: wrong or missing secret token", link.pk)
        return JsonResponse({"ok": False, "error": "bad secret token"}, status=403)
    try:
        update = json.loads(request.body)
    except ValueError:
        update = None
    if (
        not isinstance(update, dict)
        or not isinstance(update.get("update_id"), int)
        or isinstance(update.get("update_id"), bool)
    ):
        return JsonResponse({"ok": False, "error": "not a Telegram update"}, status=400)
    actions.accept_update(link, update)
    return JsonResponse({"ok": True})

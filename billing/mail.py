"""Mail about a user's plan and payments, from templates under templates/billing/email/.

``send_billing_mail(user, kind, context)`` renders ``<kind>_subject.txt`` and ``<kind>.txt``
with the context plus ``user``, ``site_url`` and ``default_plan`` (the plan a dropped account
moves to). Kinds: payment_failed, plan_dropped, plan_ended, upgraded, cancel_scheduled,
duplicate_cancelled (a second subscription was cancelled), subscription_cancelled (the account
is being deleted). A mail
that cannot be rendered or sent is logged (without its content), never raises, and never
undoes the change it reports.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.template.loader import render_to_string

from billing.models import default_plan

log = logging.getLogger(__name__)

KINDS = frozenset(
    {
        "payment_failed",
        "plan_dropped",
        "plan_ended",
        "upgraded",
        "cancel_scheduled",
        "duplicate_cancelled",
        "subscription_cancelled",
    }
)


def send_billing_mail(user: Any, kind: str, context: dict[str, Any]) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown billing mail {kind!r}")
    if not user.email:
        return
    try:  # a template or a send that fails must not stop the caller (a beat task's loop)
        context = {
            **context,
            "user": user,
            "site_url": settings.SITE_URL,
            "default_plan": default_plan(),
        }
        subject = render_to_string(f"billing/email/{kind}_subject.txt", context).strip()
        body = render_to_string(f"billing/email/{kind}.txt", context)
        send_mail(
            f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}{subject}",
            body,
            settings.DEFAULT_FROM_EMAIL,
            [user.email],
        )
    except Exception:
        log.exception("could not send the %s mail to user %s", kind, user.pk)

"""Stripe's webhook: ``POST /billing/stripe/webhook/``.

A request whose ``Stripe-Signature`` does not verify gets a 400 and changes nothing. A verified
event is applied at most once (billing.subscriptions.handle_event) and acknowledged with a 200,
also when its type is one Hermit does not act on. If Stripe cannot be read back meanwhile, the
answer is a 503, nothing is recorded, and Stripe sends the event again later.
"""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing import stripe_client, subscriptions

log = logging.getLogger(__name__)


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> HttpResponse:
    try:
        event = stripe_client.verify_event(request.body, request.headers.get("Stripe-Signature"))
    except stripe_client.BadSignature as exc:
        log.warning("Stripe webhook refused: %s", exc)
        return JsonResponse({"error": str(exc)}, status=400)
    try:
        outcome = subscriptions.handle_event(event)
    except stripe_client.BillingUnavailable:
        return JsonResponse({"error": "Stripe could not be read; send it again."}, status=503)
    log.info("Stripe event %s (%s): %s", event.get("id"), event.get("type"), outcome)
    return JsonResponse({"received": True, "outcome": outcome})

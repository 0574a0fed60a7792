"""The public pricing page, and the buttons that send a user to Stripe: upgrade (Checkout) and
manage billing (the customer portal). Nothing here changes a plan: Stripe's webhook does,
once it confirms a payment (see billing.subscriptions)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing import pricing, stripe_client, subscriptions
from billing.models import Plan, default_plan

NOT_SET_UP = "Billing is not set up on this site yet: plans can only be changed by staff."


def pricing_page(request: HttpRequest) -> HttpResponse:
    """Every public plan, side by side, with an upgrade button where one can be bought."""
    signed_in = request.user.is_authenticated
    account = subscriptions.current_account(request.user) if signed_in else None  # no write
    current_plan = account.plan if account is not None else default_plan() if signed_in else None
    plans = [
        (facts, subscriptions.for_sale(facts.plan))
        for facts in map(pricing.describe, pricing.public_plans())
    ]
    context = {
        "plans": plans,
        "account": account,
        "current_plan_id": current_plan.pk if current_plan is not None else None,
        "billing_ready": stripe_client.is_configured(),
        "subscribed": account is not None and subscriptions.has_live_subscription(account),
        "cancelled": request.GET.get("checkout") == "cancelled",
    }
    return render(request, "billing/pricing.html", context)


@login_required
@require_POST
def upgrade(request: HttpRequest) -> HttpResponse:
    """Send the user to Stripe Checkout for the plan they chose."""
    plan = get_object_or_404(Plan, slug=request.POST.get("plan", ""), public=True)
    try:
        url = subscriptions.start_checkout(
            request.user,
            plan,
            success_url=request.build_absolute_uri(reverse("dashboard")) + "?checkout=success",
            cancel_url=request.build_absolute_uri(reverse("pricing")) + "?checkout=cancelled",
        )
    except stripe_client.BillingNotConfigured:
        messages.error(request, NOT_SET_UP)
        return redirect("pricing")
    except subscriptions.AlreadySubscribed as exc:
        messages.info(request, str(exc))
        return redirect("dashboard")
    except (subscriptions.PlanNotForSale, stripe_client.BillingUnavailable) as exc:
        messages.error(request, _user_message(exc))
        return redirect("pricing")
    return HttpResponseRedirect(url)


@login_required
@require_POST
def manage_billing(request: HttpRequest) -> HttpResponse:
    """Send the user to the Stripe customer portal (card, invoices, cancel)."""
    try:
        url = subscriptions.open_portal(
            request.user, return_url=request.build_absolute_uri(reverse("dashboard"))
        )
    except stripe_client.BillingNotConfigured:
        messages.error(request, NOT_SET_UP)
        return redirect("dashboard")
    except (subscriptions.NoBillingAccount, stripe_client.BillingUnavailable) as exc:
        messages.error(request, _user_message(exc, charging=False))
        return redirect("dashboard")
    return HttpResponseRedirect(url)


def _user_message(exc: Exception, *, charging: bool = True) -> str:
    """What the user is told; "Nothing was charged" only where a charge could have begun."""
    if isinstance(exc, stripe_client.BillingUnavailable):
        if charging:
            return "Stripe could not be reached just now. Nothing was charged; please try again."
        return "Stripe could not be reached just now; please try again in a moment."
    return str(exc)


def billing_context(request: HttpRequest) -> dict[str, object]:
    """What the dashboard's plan card shows about billing: the account (grace, cancellation),
    the plan's memory and CPU as the pricing page words them, whether Stripe is set up, and
    whether the user just came back from Checkout."""
    account = subscriptions.account_for(request.user)
    return {
        "account": account,
        # The plan's limits in the pricing page's words ("1.5 GB", "1 core").
        "plan_memory": pricing.memory(account.plan.memory_mb),
        "plan_cpu": pricing.cpu(account.plan.cpu_millis),
        "in_grace": account.in_grace(timezone.now()),
        "default_plan": default_plan(),
        "billing_ready": stripe_client.is_configured(),
        "checkout_done": request.GET.get("checkout") == "success",
    }

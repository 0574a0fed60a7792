"""Billing's URLs under /billing/: Upgrade (to Stripe Checkout) and Manage billing (to the
Stripe customer portal), both POST-only and CSRF-checked, and Stripe's webhook, which is
CSRF-exempt and authenticated by its signature instead (billing.views_stripe). The pricing
page is /pricing/ (portal.urls)."""

from __future__ import annotations

from django.urls import path

from billing import views_plans, views_stripe

urlpatterns = [
    path("upgrade/", views_plans.upgrade, name="billing-upgrade"),
    path("manage/", views_plans.manage_billing, name="billing-manage"),
    path("stripe/webhook/", views_stripe.stripe_webhook, name="stripe-webhook"),
]

"""Billing in the Django admin: plans, accounts, and the records of plan changes and Stripe
events.

Contract: staff edit plans, and move a user who has no live Stripe subscription to another
plan (through :func:`billing.subscriptions.change_plan`, recorded as a PlanChange naming
them); a subscriber's plan is changed in Stripe, and the form says so. Stripe's side of an
account (customer, subscription, status, period, grace) is shown read-only: only Stripe's
events write it. PlanChange and StripeEvent rows are never edited here. An account is never
deleted here, its user never reassigned, and its plan is never blank.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.forms import ModelForm
from django.http import HttpRequest

from billing.models import Account, Plan, PlanChange, StripeEvent
from billing.subscriptions import change_plan, has_live_subscription


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin[Plan]):
    list_display = (
        "name",
        "slug",
        "public",
        "price_monthly",
        "stripe_price_id",
        "is_default",
        "sleeps",
        "sleep_after",
        "monthly_token_quota",
        "requests_per_minute",
        "memory_mb",
        "cpu_millis",
        "internet",
        "browser",
    )
    list_filter = ("public", "sleeps", "internet", "browser", "is_default")
    search_fields = ("name", "slug", "stripe_price_id")


class PlanChangeInline(admin.TabularInline[PlanChange, Account]):
    model = PlanChange
    fk_name = "account"
    extra = 0
    can_delete = False
    fields = ("created_at", "from_plan", "to_plan", "source", "actor", "reason", "stripe_event_id")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AccountAdminForm(forms.ModelForm[Account]):
    """Refuses a plan change for a user who pays through Stripe: the webhook would put the
    plan back at the subscription's next event, and the user would be billed for a plan they
    are not on. Such a change is made in Stripe (the subscription's price), which then tells
    Hermit."""

    class Meta:
        model = Account
        fields = "__all__"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "plan" in self.fields:  # every account is on a plan: no blank choice
            plan_field = self.fields["plan"]
            assert isinstance(plan_field, forms.ModelChoiceField)
            plan_field.empty_label = None
            plan_field.required = True

    def clean_plan(self) -> Plan:
        plan: Plan = self.cleaned_data["plan"]
        account = self.instance
        if account.pk and plan.pk != account.plan_id and has_live_subscription(account):
            raise forms.ValidationError(
                f"This user pays through Stripe (subscription {account.stripe_subscription_id}, "
                f"{account.subscription_status}): change it in Stripe, and the plan follows."
            )
        return plan


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin[Account]):
    """Staff may move a user without a live subscription to another plan here; the change goes
    through ``change_plan`` and is recorded as a PlanChange naming them. Stripe's side is
    shown, never edited: Stripe's events write it, and a subscriber's plan is changed in
    Stripe (see AccountAdminForm)."""

    form = AccountAdminForm

    list_display = ("user", "plan", "subscription_status", "grace_until", "created_at")
    list_filter = ("plan", "subscription_status")
    search_fields = ("user__email", "user__username", "stripe_customer_id")
    autocomplete_fields = ("user",)
    list_select_related = ("user", "plan")
    readonly_fields = (
        "stripe_customer_id",
        "stripe_subscription_id",
        "subscription_status",
        "current_period_end",
        "cancel_at_period_end",
        "grace_until",
        "checkout_session_id",
        "cancel_requested_at",
    )
    inlines = [PlanChangeInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        """An account belongs to its user for good: the user is shown, not reassigned."""
        fields = tuple(super().get_readonly_fields(request, obj))
        return ("user", *fields) if obj is not None else fields

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Never deleted here: that would erase its plan changes and its Stripe customer link
        (an account goes with its user, through the account deletion)."""
        return False

    def save_model(
        self, request: HttpRequest, obj: Account, form: ModelForm[Account], change: bool
    ) -> None:
        if not change or "plan" not in form.changed_data:
            super().save_model(request, obj, form, change)
            return
        new_plan = obj.plan
        obj.plan = Account.objects.get(pk=obj.pk).plan  # the other fields first, then the plan
        super().save_model(request, obj, form, change)
        change_plan(
            obj,
            new_plan,
            source=PlanChange.Source.STAFF,
            actor=request.user,
            reason="Changed in the admin",
        )


@admin.register(PlanChange)
class PlanChangeAdmin(admin.ModelAdmin[PlanChange]):
    list_display = ("created_at", "account", "from_plan", "to_plan", "source", "actor", "reason")
    list_filter = ("source", "to_plan")
    search_fields = ("account__user__email", "stripe_event_id")
    list_select_related = ("account__user", "from_plan", "to_plan", "actor")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(StripeEvent)
class StripeEventAdmin(admin.ModelAdmin[StripeEvent]):
    list_display = ("id", "type", "received_at")
    list_filter = ("type",)
    search_fields = ("id",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

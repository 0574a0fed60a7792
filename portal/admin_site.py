"""Hermit's admin site: staff sign in through allauth, and only with a second factor.

Contract: the admin serves a request only if its user is active staff, has an activated TOTP
authenticator, and passed a second-factor step (allauth's TOTP or recovery code, at login or on
reauthentication) in this very session. The admin's own password form is gone: /admin/login/
sends the browser on to allauth (its rate limits, its TOTP step), to TOTP set-up, or to a
second-factor check, and then back. See portal.views.admin_login.

Secrets: staff without ``sandboxes.view_secrets`` (the "support" group, sandboxes.roles) never
see one. Every model admin registered here, and its inlines, leave the model's encrypted
fields (portal.lib.fields.EncryptedTextField) and the fields named in SECRET_FIELDS out of
their forms, pages and lists for such staff (:class:`HidesSecrets`).

Guarded fields: a field named in GUARDED_FIELDS is read-only for staff without the permission
named with it (plans' prices need ``billing.change_plan_price``, which the "operator" group
does not have), whatever else they may change (:class:`GuardsFields`).

The index shows the fleet overview (portal.fleet) to staff who may view sandboxes.
"""

from __future__ import annotations

from typing import Any

from allauth.account.authentication import get_authentication_records
from allauth.mfa.models import Authenticator
from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest, HttpResponse

from portal.lib.fields import EncryptedTextField

# Fields that hold secrets without being encrypted by us: (app label, model name): names.
SECRET_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("mfa", "authenticator"): ("data",),  # TOTP secret, recovery codes' seed
    ("account", "emailconfirmation"): ("key",),
}
VIEW_SECRETS = "sandboxes.view_secrets"
# Fields only staff with a permission may change: (app label, model name): (permission, names).
GUARDED_FIELDS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("billing", "plan"): ("billing.change_plan_price", ("price_monthly", "stripe_price_id")),
}


def has_totp(user: Any) -> bool:
    """Return True if user has an activated TOTP authenticator."""
    return Authenticator.objects.filter(user=user, type=Authenticator.Type.TOTP).exists()


def passed_second_factor(request: HttpRequest) -> bool:
    """Return True if this session's user passed an allauth second-factor step in it."""
    records = get_authentication_records(request, request.user)
    return any(record.get("method") == "mfa" for record in records)


def may_use_admin(request: HttpRequest) -> bool:
    user = request.user
    return user.is_active and user.is_staff and has_totp(user) and passed_second_factor(request)


def secret_fields(model: type[Model]) -> frozenset[str]:
    """Return the names of ``model``'s fields that hold a secret."""
    meta = model._meta
    encrypted = {f.name for f in meta.get_fields() if isinstance(f, EncryptedTextField)}
    return frozenset(
        encrypted | set(SECRET_FIELDS.get((meta.app_label, meta.model_name or ""), ()))
    )


def _without(names: Any, hidden: frozenset[str]) -> list[Any]:
    return [n for n in names if not (isinstance(n, str) and n in hidden)]


class HidesSecrets:
    """Mixed into every model admin and inline of the site: for staff who may not view
    secrets, the model's secret fields are in no form, page, list or search."""

    model: type[Model]

    def _hidden(self, request: HttpRequest) -> frozenset[str]:
        if request.user.has_perm(VIEW_SECRETS):
            return frozenset()
        return secret_fields(self.model)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return _without(super().get_fields(request, obj), self._hidden(request))  # type: ignore[misc]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        hidden = self._hidden(request)
        fieldsets = super().get_fieldsets(request, obj)  # type: ignore[misc]
        if not hidden:
            return fieldsets
        return [
            (name, {**options, "fields": _strip(options.get("fields", ()), hidden)})
            for name, options in fieldsets
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return _without(super().get_readonly_fields(request, obj), self._hidden(request))  # type: ignore[misc]

    def get_exclude(self, request: HttpRequest, obj: Any = None) -> Any:
        exclude = list(super().get_exclude(request, obj) or ())  # type: ignore[misc]
        return exclude + sorted(self._hidden(request) - set(exclude)) or None

    def get_list_display(self, request: HttpRequest) -> Any:
        return _without(super().get_list_display(request), self._hidden(request))  # type: ignore[misc]

    def get_search_fields(self, request: HttpRequest) -> Any:
        return _without(super().get_search_fields(request), self._hidden(request))  # type: ignore[misc]

    def get_inline_instances(self, request: HttpRequest, obj: Any = None) -> Any:
        instances = super().get_inline_instances(request, obj)  # type: ignore[misc]
        for inline in instances:
            if not isinstance(inline, HidesSecrets):
                inline.__class__ = type(
                    f"Hiding{type(inline).__name__}", (HidesSecrets, type(inline)), {}
                )
        return instances


class GuardsFields:
    """Mixed into every model admin of the site: GUARDED_FIELDS are read-only for staff
    without their permission."""

    model: type[Model]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        readonly = list(super().get_readonly_fields(request, obj))  # type: ignore[misc]
        meta = self.model._meta
        guard = GUARDED_FIELDS.get((meta.app_label, meta.model_name or ""))
        if guard is None or request.user.has_perm(guard[0]):
            return readonly
        return readonly + [name for name in guard[1] if name not in readonly]


def _strip(fields: Any, hidden: frozenset[str]) -> list[Any]:
    """Remove hidden names from a fieldset's fields (which may hold tuples of names)."""
    kept: list[Any] = []
    for entry in fields:
        if isinstance(entry, list | tuple):
            inner = _without(entry, hidden)
            if inner:
                kept.append(tuple(inner))
        elif not (isinstance(entry, str) and entry in hidden):
            kept.append(entry)
    return kept


class HermitAdminSite(admin.AdminSite):
    site_header = "Hermit administration"
    site_title = "Hermit admin"
    index_title = "Users, plans, sandboxes and the AI gateway"

    index_template = "admin/hermit_index.html"

    def has_permission(self, request: HttpRequest) -> bool:
        return may_use_admin(request)

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        """The app list, with the fleet overview (portal.fleet) above it for staff who may
        view sandboxes."""
        from portal.fleet import overview

        context = dict(extra_context or {})
        if request.user.has_perm("sandboxes.view_sandbox"):
            context["fleet"] = overview()
        return super().index(request, context)

    def register(self, model_or_iterable: Any, admin_class: Any = None, **options: Any) -> None:
        """Register as usual, with :class:`HidesSecrets` and :class:`GuardsFields` mixed into
        the model admin."""
        base = admin_class or admin.ModelAdmin
        if not issubclass(base, HidesSecrets):
            mixins = (HidesSecrets, GuardsFields, base)
            base = type(base.__name__, mixins, {"__module__": base.__module__})
        super().register(model_or_iterable, base, **options)

    def login(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        from portal.views import admin_login

        return admin_login(request)

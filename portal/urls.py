from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from ai_gateway import views_keys
from billing import views_plans
from portal import views
from portal.views_metrics import metrics_view
from sandboxes import views_account, views_chat, views_controlui

urlpatterns = [
    path("", views.home, name="home"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("sandbox/start/", views.sandbox_start, name="sandbox-start"),
    path("sandbox/", include("sandboxes.urls_backups")),
    path("chat/", views_chat.chat, name="chat"),
    path("sandbox/control-ui/", views_controlui.open_control_ui, name="controlui-open"),
    path("account/delete/", views_account.delete_account, name="account-delete"),
    path("accounts/", include("allauth.urls")),
    path("admin/", admin.site.urls),
    path("ai/", include("ai_gateway.urls")),
    path("settings/keys/", views_keys.provider_keys, name="provider-keys"),
    path("usage/", include("metering.urls")),
    path("pricing/", views_plans.pricing_page, name="pricing"),
    path("billing/", include("billing.urls")),
    path("channels/", include("doorbell.urls")),
    path("metrics", metrics_view, name="metrics"),
]

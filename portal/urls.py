from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from portal import views

urlpatterns = [
    path("", views.home, name="home"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("sandbox/start/", views.sandbox_start, name="sandbox-start"),
    path("accounts/", include("allauth.urls")),
    path("admin/", admin.site.urls),
]

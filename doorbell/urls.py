from __future__ import annotations

from django.urls import path

from doorbell import views

urlpatterns = [
    path("", views.channels_page, name="channels"),
    path("telegram/<str:webhook_id>/", views.telegram_webhook, name="telegram-webhook"),
]

"""The gateway's routes, relative to its mount point (``/ai/`` in both URLconfs)."""

from __future__ import annotations

from django.urls import path

from ai_gateway import views

app_name = "ai_gateway"

urlpatterns = [
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/messages", views.messages, name="messages"),
    path("v1/models", views.models, name="models"),
]

from __future__ import annotations

from django.urls import path

from doorbell import relay

urlpatterns = [path("bot<str:token>/<str:method>", relay.relay, name="telegram-relay")]

from django.urls import path

from metering import views

urlpatterns = [path("", views.usage, name="usage")]

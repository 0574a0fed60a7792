"""The user's usage page, mounted at ``/usage/`` (portal.urls): ``usage`` shows the signed-in
user's month (``?month=YYYY-MM``, default this month; a bad month is a 400). Staff's cost table
is not here: it lives in the admin (metering.admin), behind ``metering.view_costs``."""

from django.urls import path

from metering import views

urlpatterns = [path("", views.usage, name="usage")]

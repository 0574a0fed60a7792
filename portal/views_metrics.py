"""``/metrics``: Prometheus' scrape of portal.metrics, for a bearer of HERMIT_METRICS_TOKEN.

No token configured: 404 (the endpoint does not exist). No bearer token: 401 with a
``WWW-Authenticate: Bearer`` challenge. A wrong token: 403. The token is compared in constant
time. Only GET (and HEAD) are answered.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.http import require_safe

from portal import metrics


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    expected = settings.HERMIT_METRICS_TOKEN
    if not expected:
        raise Http404("Metrics are not enabled (HERMIT_METRICS_TOKEN is not set).")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        response = HttpResponse("A bearer token is required.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return HttpResponse("Wrong token.\n", status=403)
    return HttpResponse(metrics.render(), content_type=metrics.CONTENT_TYPE)

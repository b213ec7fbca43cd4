"""The app's URLs plus the two baselines.

The app's URLconf is included only if it imports: while the pipeline is being written a
broken import must not take the baselines down with it. The harness then finds the webhook
URL answering 404, reports the pipeline as unavailable and shows this warning from the log.
"""

import logging

from django.urls import include, path

from bench import baseline_views

urlpatterns = [
    path("bench/bare/", baseline_views.bare),
    path("bench/minimal/", baseline_views.minimal),
]

try:
    urlpatterns.append(path("", include("config.urls")))
except Exception as exc:  # noqa: BLE001 - any import error of the app under construction
    logging.getLogger(__name__).warning("config.urls not included: %s: %s", type(exc).__name__, exc)

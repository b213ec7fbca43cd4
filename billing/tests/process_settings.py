"""Settings of the servers and workers that the fault tests start (``billing.tests.processes``).

The app's own settings, read from the same environment, with three changes that serve the
tests and change nothing the tests check:

* ``bench.urls``: the app's URLs plus ``/bench/bare/``, which ``bench.server.serve`` polls to
  know that every gunicorn worker is up.
* The beat sends its sweeps (owed e-mails, unresolved payments) every ``FAULTS_SWEEP_SECONDS``
  (2 s) instead of 30 s and 5 minutes, so that a test waits seconds, not minutes, for what only
  a sweep can deliver.
* With ``FAULTS_MAIL_HOLD`` set, e-mails go through ``HeldFileBackend`` (Django's file backend
  that a test can hold mid-send).
"""

from datetime import timedelta

from config.settings import *  # noqa: F403
from config.settings import CELERY_BEAT_SCHEDULE, LOGGING, env

ROOT_URLCONF = "bench.urls"
CELERY_BEAT_SCHEDULE = {
    name: {**entry, "schedule": timedelta(seconds=env.float("FAULTS_SWEEP_SECONDS", default=2.0))}
    for name, entry in CELERY_BEAT_SCHEDULE.items()
}
if env.str("FAULTS_MAIL_HOLD", default=""):
    EMAIL_BACKEND = "billing.tests.processes.HeldFileBackend"
LOGGING = {**LOGGING, "root": {**LOGGING["root"], "level": env.str("LOG_LEVEL", default="WARNING")}}

"""Settings of the benchmark server: the app's own settings, plus what keeps the figures honest.

* ``bench.urls`` adds the baselines beside the real endpoint (same middleware for all three).
* Logging at WARNING: a log line per request would be measured as part of the pipeline.
* E-mail goes nowhere: the benchmark measures the webhook, not an SMTP or console write
  (in production a Celery worker sends it, out of the request).
"""

from bench import WEBHOOK_SECRET
from config.settings import *  # noqa: F401,F403
from config.settings import LOGGING, env

ROOT_URLCONF = "bench.urls"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
STRIPE_WEBHOOK_SECRETS = env.list("STRIPE_WEBHOOK_SECRETS", default=[WEBHOOK_SECRET])
EMAIL_BACKEND = "django.core.mail.backends.dummy.EmailBackend"

LOGGING = {**LOGGING, "root": {**LOGGING["root"], "level": "WARNING"}}

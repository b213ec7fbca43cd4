"""Settings, read from the environment (django-environ).

Every setting that an operator may change is listed in README.rst. Defaults are chosen so that
``make run`` works on a fresh machine (SQLite, no broker, e-mail to the console) and so that
production must opt in to nothing unsafe: DEBUG is off unless ``DJANGO_DEBUG`` says otherwise.
"""

import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# Development values that every command of README.rst needs in any shell (DJANGO_DEBUG, a
# generated DJANGO_SECRET_KEY, the dev webhook secret): ``make run`` writes them once to this
# git-ignored file. A variable set in the environment wins over the file. What the tests prove
# and the benchmarks measure must not depend on a developer's .env, so it is read only when
# this module is the settings module (not under bench.settings, which builds on it with values
# of its own) and never in a pytest session (pytest sets PYTEST_VERSION for the whole session,
# and the processes a test starts inherit it).
DOT_ENV_FILE = BASE_DIR / ".env"
if (
    DOT_ENV_FILE.is_file()
    and os.environ.get("DJANGO_SETTINGS_MODULE") == __name__
    and "PYTEST_VERSION" not in os.environ
):
    environ.Env.read_env(DOT_ENV_FILE)

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY",
    default="insecure-dev-key-change-me" if DEBUG else environ.Env.NOTSET,
)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc served from static files: /api/docs/ works offline
    "simple_history",
    "provisioning",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.RejectNulBytesMiddleware",  # a NUL byte in a URL or form: 400, never the database
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "simple_history.middleware.HistoryRequestMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
# Keep connections between requests: the webhook's cost is dominated by round trips.
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DJANGO_CONN_MAX_AGE", default=60))
# A health check is a round trip per request. Off by default: after a database restart the
# first webhook of each worker answers 503 (Stripe retries it) and the broken connection is
# dropped at the end of that request.
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", env.bool("DJANGO_CONN_HEALTH_CHECKS", default=False))
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Server-side binding lets psycopg prepare the statements every event repeats (after
    # ``prepare_threshold`` uses), so PostgreSQL parses and plans them once per connection.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault(
        "server_side_binding", env.bool("DJANGO_DB_SERVER_SIDE_BINDING", default=True)
    )
    DATABASES["default"]["OPTIONS"].setdefault("prepare_threshold", env.int("DJANGO_DB_PREPARE_THRESHOLD", default=5))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- E-mail ------------------------------------------------------------------------------
EMAIL_URL = env.str("EMAIL_URL", default="consolemail://")
vars().update(env.email_url_config(EMAIL_URL))
if EMAIL_URL.startswith("filemail:"):
    # django-environ drops the leading slash of ``filemail:///srv/mail`` (the e-mails would land
    # in a relative ``srv/mail``); the README's form names an absolute directory.
    EMAIL_FILE_PATH = urlsplit(EMAIL_URL).path
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="billing@localhost")
# Without a broker, e-mails are sent in the web process after commit: never wait long on SMTP.
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)

# --- Stripe ------------------------------------------------------------------------------
STRIPE_API_KEY = env.str("STRIPE_API_KEY", default="")
# Where stripe-python sends API calls; only tests and offline demos change it.
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="https://api.stripe.com")
STRIPE_WEBHOOK_SECRETS = env.list("STRIPE_WEBHOOK_SECRETS", default=[])
STRIPE_WEBHOOK_TOLERANCE = env.int("STRIPE_WEBHOOK_TOLERANCE", default=300)
STRIPE_WEBHOOK_MAX_BYTES = env.int("STRIPE_WEBHOOK_MAX_BYTES", default=1024 * 1024)
# The API version of calls to Stripe (the one stripe-python 16 is built for). Events of any
# version are stored and read by ``billing.stripe_payloads``, which knows the older layouts.
STRIPE_API_VERSION = env.str("STRIPE_API_VERSION", default="2026-10-28.endive")

# --- Celery ------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE = {
    "sweep-owed-emails": {
        "task": "billing.tasks.sweep_owed_emails",
        "schedule": timedelta(seconds=30),
    },
    # Asks Stripe again for the invoice of refunded payments whose look-up was lost (billing.tasks).
    "sweep-unresolved-payments": {
        "task": "billing.tasks.sweep_unresolved_payments",
        "schedule": timedelta(minutes=5),
    },
}
# Owed e-mails older than this are picked up by the sweep (the on-commit task normally wins).
BILLING_OUTBOX_SWEEP_AFTER = timedelta(seconds=env.int("BILLING_OUTBOX_SWEEP_AFTER_SECONDS", default=20))
BILLING_OUTBOX_SWEEP_INTERVAL = env.int("BILLING_OUTBOX_SWEEP_INTERVAL_SECONDS", default=30)
# With a broker: how long a web process collects committed e-mails before publishing them as one task.
BILLING_OUTBOX_PUBLISH_WINDOW = env.float("BILLING_OUTBOX_PUBLISH_WINDOW_SECONDS", default=0.2)
# An owed e-mail with nobody to send it to yet waits this long for an address, then is given up
# (Stripe retries an event for up to 3 days; see billing.tasks).
BILLING_OUTBOX_RECIPIENT_WAIT = timedelta(hours=env.int("BILLING_OUTBOX_RECIPIENT_WAIT_HOURS", default=72))
# Without a broker the web process runs the sweep in a daemon thread (see billing.outbox).
BILLING_INPROCESS_SWEEP = env.bool("BILLING_INPROCESS_SWEEP", default=not CELERY_BROKER_URL)

# --- REST API ----------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: a request without credentials is answered 401 with ``WWW-Authenticate: Token``
    # (DRF takes that header from the first class; SessionAuthentication has none, hence 403).
    # Session auth (the login page at LOGIN_URL) still checks CSRF on unsafe methods.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Billing API",
    "DESCRIPTION": "Invoices and subscription of the caller's account.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,  # /api/schema/ is not an operation of the API it describes
    # Swagger UI and ReDoc from drf-spectacular-sidecar's static files, not from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No badge from swagger.io's online validator: the page asks no host but this one.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}
# Account owners sign in at /accounts/login/ (no admin access needed) and land on their billing page.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "billing:my-billing"
LOGOUT_REDIRECT_URL = "login"

# --- Logging -----------------------------------------------------------------------------
# Never log payloads, secrets or signatures: handlers log ids and types only.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "stripe": {"level": "WARNING"}},
}
if not CELERY_BROKER_URL:
    # No broker: tasks run in-process. For each one Celery still takes a producer from kombu's
    # pool (only to serialise the arguments; it never connects), and kombu warns "No hostname
    # was supplied" about a broker nobody configured. With a broker its warnings are kept.
    LOGGING["loggers"]["kombu.connection"] = {"level": "ERROR"}

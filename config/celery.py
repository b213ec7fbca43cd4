"""The Celery application.

With ``CELERY_BROKER_URL`` unset, tasks run eagerly in the web process; callers enqueue them
with ``transaction.on_commit`` so that "eagerly" still means "after the commit that asked for
them". With a broker set (e.g. ``redis://127.0.0.1:6379/0``) a real worker runs them.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("billing_sync")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

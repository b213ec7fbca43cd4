"""What the log says about a webhook: an expected retry is a warning, a bug an error, once each.

A prerequisite that has not arrived yet (``PrerequisiteMissing``: Stripe delivered an invoice
before its subscription) is answered 500 so that Stripe retries: that is the design working, so
it is one WARNING naming the event, without a traceback. A handler's bug is one ERROR with its
traceback. Neither is logged a second time by Django's request logger. Without a broker the
tasks run in-process and kombu has nothing to warn about.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from billing.models import StripeEvent
from billing.webhook import registry

from .conftest import DAY, T0, first_invoice_paid_event, subscription_event, trial_subscription

ROOT = Path(__file__).resolve().parents[2]
BUG = "handler bug for the logging test"

pytestmark = pytest.mark.django_db


def broken_handler(event):
    """Test-only handler: a bug."""
    raise RuntimeError(BUG)


@pytest.fixture
def broken_subscription_handler():
    """``customer.subscription.created`` handled by ``broken_handler``; the real one restored after."""
    event_type = "customer.subscription.created"
    real = registry.path_for(event_type)
    registry.unregister(event_type)
    registry.register("billing.tests.test_webhook_logging:broken_handler", event_type)
    yield
    registry.unregister(event_type)
    registry.register(real, event_type)


def records_at_or_above(caplog, level):
    return [record for record in caplog.records if record.levelno >= level]


def test_an_expected_retry_is_one_warning_with_the_event_id_and_no_traceback(post_event, caplog):
    caplog.set_level(logging.INFO)
    paid = first_invoice_paid_event(
        "in_logged_early", sub_id="sub_logged_late", customer="cus_logged", start=T0, end=T0 + 30 * DAY, created=T0
    )

    response = post_event(paid)

    assert response.status_code == 500  # Stripe retries
    assert StripeEvent.objects.get(pk=paid["id"]).status == StripeEvent.Status.FAILED
    [warning] = records_at_or_above(caplog, logging.WARNING)
    assert (warning.name, warning.levelno) == ("billing.webhook.inbox", logging.WARNING)
    assert paid["id"] in warning.getMessage() and "to be retried" in warning.getMessage()
    assert "sub_logged_late" in warning.getMessage()  # what it waits for
    assert warning.exc_info is None and warning.exc_text is None and warning.stack_info is None


def test_a_handler_bug_is_one_error_with_its_traceback(post_event, caplog, broken_subscription_handler):
    caplog.set_level(logging.INFO)
    created = subscription_event(
        "customer.subscription.created", trial_subscription("sub_logged_bug", "cus_logged_bug"), created=T0
    )

    response = post_event(created)

    assert response.status_code == 500
    [error] = records_at_or_above(caplog, logging.WARNING)
    assert (error.name, error.levelno) == ("billing.webhook.inbox", logging.ERROR)
    assert created["id"] in error.getMessage()
    assert error.exc_info is not None and error.exc_info[0] is RuntimeError and BUG in str(error.exc_info[1])


def test_a_rejected_stale_delivery_says_so_in_the_log(post_event, caplog):
    caplog.set_level(logging.INFO)
    created = subscription_event("customer.subscription.created", trial_subscription("sub_st", "cus_st"), created=T0)

    response = post_event(created, timestamp=1_000_000_000)

    assert response.status_code == 400
    assert any(
        "timestamp outside the tolerance" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )


# --- No broker ---------------------------------------------------------------------------------

RUN_A_TASK = """
import logging
import django
django.setup()
from celery.contrib.testing.tasks import ping
from config.celery import app
print("eager" if app.conf.task_always_eager else "broker", logging.getLogger("kombu.connection").level)
if app.conf.task_always_eager:
    print(ping.delay().get())
"""


def run_a_task(**environment) -> subprocess.CompletedProcess:
    """A fresh process (kombu warns once per process) that sends a task as the app would."""
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    env.update(DJANGO_SETTINGS_MODULE="config.settings", DJANGO_SECRET_KEY="test", **environment)
    return subprocess.run(
        [sys.executable, "-c", RUN_A_TASK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_without_a_broker_a_task_runs_in_process_and_kombu_warns_of_nothing():
    done = run_a_task()

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["eager", str(logging.ERROR), "pong"]
    assert "succeeded" in done.stderr  # the log is there, and it ran in this process
    assert "kombu" not in done.stderr and "No hostname" not in done.stderr, done.stderr


def test_with_a_broker_kombu_warnings_are_kept():
    done = run_a_task(CELERY_BROKER_URL=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["broker", str(logging.NOTSET)]

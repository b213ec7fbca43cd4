"""What every webhook test shares: the endpoint's secrets, Stripe's real signing, Stripe-shaped events.

Deliveries are signed with stripe-python's own ``WebhookSignature.generate_signature_header``
and posted to the real URL; nothing in the signature check is patched. Payloads come from
``billing.simulation.objects`` (Stripe's published shapes, API version basil and later).

The plain functions here (``deliver``, ``row_counts``, the event builders) are imported by
``provisioning/tests`` too; the fixtures wrap them for the tests in this package.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import threading
import time
import urllib.parse
from datetime import UTC, datetime

import kombu.pools
import pytest
import stripe
from celery.contrib.testing.worker import start_worker
from django.apps import apps

from billing.simulation.objects import event_object, invoice_line_object, invoice_object, subscription_object
from billing.tests.stripe_server import FakeStripe
from config.celery import app as celery_app

WEBHOOK_URL = "/billing/stripe/webhook/"
# The endpoint's current secret, and the one being rolled in (both accepted at once).
SECRET = "whsec_test_current_Zq81nB4vW0yLk2"
ROLLED_SECRET = "whsec_test_rolled_Hc39tP7mDx5aJ6"
TOLERANCE = 300

DAY = 24 * 3600
# A fixed story clock (Stripe's ``created`` of events); independent of the signing time.
T0 = int(datetime(2026, 2, 2, 9, 30, tzinfo=UTC).timestamp())


def as_datetime(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


# --- Signing and posting ---------------------------------------------------------------------


def body_of(payload) -> str | bytes:
    """The raw body Stripe would post: dicts and lists as JSON, strings and bytes as they are."""
    return payload if isinstance(payload, (str, bytes)) else json.dumps(payload)


def sign(body: str, secret: str = SECRET, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header computed by stripe-python, as Stripe computes it."""
    return stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)


def sign_bytes(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    """A valid header for any raw body: stripe-python's helper (``sign``) for text; for bytes that
    are not UTF-8 (which that helper cannot take) the same v1 scheme by hand, HMAC-SHA256 of
    ``{t}.{body}`` (https://docs.stripe.com/webhooks#verify-manually)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    try:
        return sign(body.decode("utf-8"), secret, timestamp)
    except UnicodeDecodeError:
        digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={digest}"


def deliver(client, payload, *, secret: str = SECRET, timestamp: int | None = None, header: str | None = None):
    """POST ``payload`` to the webhook, signed with ``secret`` unless an explicit ``header`` is given.

    ``header=""`` sends no ``Stripe-Signature`` at all.
    """
    body = body_of(payload)
    if header is None:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        header = sign(text, secret, timestamp)
    headers = {"Stripe-Signature": header} if header else {}
    return client.post(WEBHOOK_URL, data=body, content_type="application/json", headers=headers)


def post_all_at_once(url: str, payloads: list[dict]) -> list[tuple[int, dict]]:
    """POST every payload (signed) from its own thread and connection, all released at once.

    The connections are opened one by one before the threads start: the test server's listen
    backlog is small (10), and 24 simultaneous connects would test the kernel, not the app.
    Once connected, every thread waits at the barrier and sends its request at the same instant.
    """
    target = urllib.parse.urlsplit(url)
    connections = [http.client.HTTPConnection(target.hostname, target.port, timeout=120) for _ in payloads]
    for connection in connections:
        connection.connect()
    barrier = threading.Barrier(len(payloads))
    answers: list[tuple[int, dict] | BaseException | None] = [None] * len(payloads)

    def post(index: int, payload: dict) -> None:
        body = body_of(payload)
        headers = {"Content-Type": "application/json", "Stripe-Signature": sign(body)}
        connection = connections[index]
        try:
            barrier.wait(timeout=30)
            connection.request("POST", target.path, body=body.encode(), headers=headers)
            response = connection.getresponse()
            answers[index] = (response.status, json.loads(response.read() or b"{}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            answers[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(i, p)) for i, p in enumerate(payloads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    failures = [a for a in answers if not isinstance(a, tuple)]
    assert not failures, failures
    return answers  # type: ignore[return-value]


def database_state() -> dict[str, list[tuple]]:
    """Every row of every model of billing and provisioning (history included), field by field."""
    return {
        model._meta.label: sorted(
            model.objects.values_list(*[field.attname for field in model._meta.concrete_fields]), key=repr
        )
        for label in ("billing", "provisioning")
        for model in apps.get_app_config(label).get_models()
    }


def row_counts() -> dict[str, int]:
    """Rows of every model of billing and provisioning, history tables included."""
    return {
        model._meta.label: model.objects.count()
        for label in ("billing", "provisioning")
        for model in apps.get_app_config(label).get_models()
    }


# --- Stripe-shaped events --------------------------------------------------------------------


def subscription_event(type: str, subscription: dict, *, created: int, event_id: str | None = None) -> dict:
    """A ``customer.subscription.*`` event whose snapshot is ``subscription_object(**subscription)``."""
    return event_object(type=type, obj=subscription_object(**subscription), created=created, id=event_id)


def trial_subscription(sub_id: str, customer: str, *, start: int = T0, days: int = 14, quantity: int = 1) -> dict:
    """The arguments of a trialing subscription (for ``subscription_object``)."""
    return dict(
        id=sub_id,
        customer=customer,
        status="trialing",
        quantity=quantity,
        created=start,
        trial_start=start,
        trial_end=start + days * DAY,
        current_period_start=start,
        current_period_end=start + days * DAY,
    )


def active_subscription(sub_id: str, customer: str, *, start: int = T0, quantity: int = 1) -> dict:
    """The arguments of a subscription without trial, in its first monthly period."""
    return dict(
        id=sub_id,
        customer=customer,
        status="active",
        quantity=quantity,
        created=start,
        current_period_start=start,
        current_period_end=start + 30 * DAY,
    )


def first_invoice_paid_event(
    invoice_id: str, *, sub_id: str, customer: str, start: int, end: int, created: int, quantity: int = 1
) -> dict:
    """``invoice.paid`` for a subscription's first invoice (``subscription_create``, no trial)."""
    line = invoice_line_object(
        id=f"il_{invoice_id}",
        invoice=invoice_id,
        amount=2000 * quantity,
        quantity=quantity,
        period_start=start,
        period_end=end,
        subscription=sub_id,
    )
    invoice = invoice_object(
        id=invoice_id,
        customer=customer,
        status="paid",
        billing_reason="subscription_create",
        lines=[line],
        subscription=sub_id,
        number=f"NUM-{invoice_id[-6:]}",
        created=start,
        finalized_at=start + 1,
        paid_at=created,
        customer_email="payer@example.com",
        attempt_count=1,
    )
    return event_object(type="invoice.paid", obj=invoice, created=created)


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture
def webhook_settings(settings):
    """The endpoint configured with one secret, Stripe's tolerance and the default size limit."""
    settings.STRIPE_WEBHOOK_SECRETS = [SECRET]
    settings.STRIPE_WEBHOOK_TOLERANCE = TOLERANCE
    settings.STRIPE_WEBHOOK_MAX_BYTES = 1024 * 1024
    return settings


@pytest.fixture
def post_event(client, webhook_settings):
    """``post_event(payload, *, secret=..., timestamp=..., header=...)``: one signed delivery."""

    def post(payload, *, secret: str = SECRET, timestamp: int | None = None, header: str | None = None):
        return deliver(client, payload, secret=secret, timestamp=timestamp, header=header)

    return post


@pytest.fixture
def fake_stripe(settings):
    """Stripe's API for stripe-python: a local server in Stripe's shape (``stripe_server.FakeStripe``)."""
    with FakeStripe() as server:
        settings.STRIPE_API_KEY = server.api_key
        settings.STRIPE_API_BASE = server.url
        yield server


@pytest.fixture
def story(client, webhook_settings):
    """One customer's billing story, delivered through the webhook (``support_story``)."""
    from billing.tests.support_story import deliver_story  # support_story builds on this module

    return deliver_story(client)


@pytest.fixture
def support_member():
    """A plain staff user in the "Billing support" group."""
    from billing.tests.support_story import support_user  # support_story builds on this module

    return support_user()


@pytest.fixture
def support(client, support_member):
    """The test client, logged in as ``support_member``."""
    client.force_login(support_member)
    return client


# --- A real Celery worker on Redis ---------------------------------------------------------


def _drop_broker_connections(app) -> None:
    """Forget the app's broker and result connections, so the next use follows its configuration."""
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    kombu.pools.reset()
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


@pytest.fixture
def redis_worker():
    """The project's Celery app on Redis with a real worker, in a thread of this process.

    The worker's thread opens its own connection to the same test database (Django's
    connections are per thread; the test runner has already pointed the settings at the test
    database), and Celery's Django fix-up closes it after every task. Tests using it need
    ``django_db(transaction=True)``: the worker cannot see what a test's transaction has not
    committed, and the fix-up also closes this thread's connection when the worker starts,
    which would end the transaction a plain ``django_db`` test runs in.
    """
    import celery.contrib.testing.tasks  # noqa: F401 - registers celery.ping for start_worker's check

    url = os.environ["TEST_REDIS_URL"]
    on_redis = {
        "broker_url": url,
        "result_backend": url,
        "task_always_eager": False,
        "worker_hijack_root_logger": False,  # leave pytest's log capture alone
    }
    saved = {name: celery_app.conf[name] for name in on_redis}
    celery_app.conf.update(on_redis)
    _drop_broker_connections(celery_app)
    try:
        celery_app.control.purge()  # left over by an interrupted run
        with start_worker(celery_app, loglevel="WARNING", shutdown_timeout=30) as worker:
            yield worker
        celery_app.control.purge()  # retries the worker still held go back to the queue when it stops
    finally:
        celery_app.conf.update(saved)
        _drop_broker_connections(celery_app)


def runs_of(task) -> int:
    from celery.worker import state

    return state.total_count.get(task.name, 0)

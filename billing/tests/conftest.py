"""What every webhook test shares: the endpoint's secrets, Stripe's real signing, Stripe-shaped events.

Deliveries are signed with stripe-python's own ``WebhookSignature.generate_signature_header``
and posted to the real URL; nothing in the signature check is patched. Payloads come from
``billing.simulation.objects`` (Stripe's published shapes, API version basil and later).

The plain functions here (``deliver``, ``row_counts``, the event builders) are imported by
``provisioning/tests`` too; the fixtures wrap them for the tests in this package.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import stripe
from django.apps import apps

from billing.simulation.objects import event_object, invoice_line_object, invoice_object, subscription_object

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

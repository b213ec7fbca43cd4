"""Calls to Stripe's API, in one place (handlers never make them: they run inside a transaction).

stripe-python's ``StripeClient`` is configured from settings; ``STRIPE_API_BASE`` only changes
in tests and offline demos, where a local server answers in Stripe's shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import NamedTuple

import stripe
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from .stripe_fields import reference


def client() -> stripe.StripeClient:
    if not settings.STRIPE_API_KEY:
        raise ImproperlyConfigured("STRIPE_API_KEY is not set: the Stripe API cannot be called.")
    return stripe.StripeClient(
        settings.STRIPE_API_KEY,
        base_addresses={"api": settings.STRIPE_API_BASE},
        stripe_version=settings.STRIPE_API_VERSION,
        max_network_retries=2,
    )


def iter_events(*, created_gte: datetime | None = None, types: list[str] | None = None) -> Iterator[dict]:
    """Events from the Events API (newest first, 30 days of history), as plain JSON dicts.

    https://docs.stripe.com/api/events/list
    """
    params: dict = {"limit": 100}
    if created_gte is not None:
        params["created"] = {"gte": int(created_gte.timestamp())}
    if types:
        params["types"] = types
    for event in client().v1.events.list(params).auto_paging_iter():
        yield event.to_dict(recursive=True, for_json=True)


def invoice_for_payment_intent(payment_intent_id: str) -> str | None:
    """The invoice a PaymentIntent paid, from the InvoicePayments API (basil and later).

    https://docs.stripe.com/api/invoice-payment/list
    """
    page = client().v1.invoice_payments.list(
        {"payment": {"type": "payment_intent", "payment_intent": payment_intent_id}, "limit": 1}
    )
    for payment in page.data:
        return reference(payment.to_dict(), "invoice") or None
    return None


class Fetched(NamedTuple):
    """An object as Stripe's API answered it, and when and by which request it answered."""

    obj: dict  # the JSON object exactly as Stripe sent it
    answered_at: datetime  # Stripe's clock (the response's ``Date``), to the second
    request_id: str  # Stripe's ``Request-Id`` (req_...), to find the call in Stripe's logs


def retrieve_subscription(stripe_id: str) -> Fetched:
    """``GET /v1/subscriptions/<id>``: https://docs.stripe.com/api/subscriptions/retrieve"""
    return _fetched(client().v1.subscriptions.retrieve(stripe_id))


def retrieve_invoice(stripe_id: str) -> Fetched:
    """``GET /v1/invoices/<id>``: https://docs.stripe.com/api/invoices/retrieve"""
    return _fetched(client().v1.invoices.retrieve(stripe_id))


def _fetched(obj: stripe.StripeObject) -> Fetched:
    response = obj.last_response
    try:
        answered_at = parsedate_to_datetime(response.headers["date"])
    except (KeyError, TypeError, ValueError):
        answered_at = timezone.now().replace(microsecond=0)  # no usable Date header: our clock
    return Fetched(json.loads(response.body), answered_at, response.request_id or "")

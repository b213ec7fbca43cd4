"""Stripe objects as plain dicts, in the layout of API version 2025-03-31.basil and later.

Every key emitted here exists in the same resource of Stripe's published ``fixtures3.json``
(checked by ``billing/tests/test_payload_shapes.py``), except two optional keys that the
fixtures leave out and stripe-python's typed classes declare: ``event.data.previous_attributes``
and ``invoice_payment.payment.payment_intent``. Fields the app never reads are present anyway
(mostly null), so a reader that relies on a key Stripe does not send fails here first.

Layout rules, with where they come from:

* A subscription's period and quantity live on ``items.data[]``; top-level ``plan``,
  ``quantity`` and ``current_period_*`` are gone.
  https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end
* An invoice names its subscription in ``parent.subscription_details``; a line item says what
  it bills in ``parent`` (``subscription_item_details`` or ``invoice_item_details``) and its
  price in ``pricing``.
  https://docs.stripe.com/changelog/basil/2025-03-31/adds-new-parent-field-to-invoicing-objects
* A charge no longer names its invoice; an ``invoice_payment`` ties the invoice to its
  PaymentIntent.
  https://docs.stripe.com/changelog/basil/2025-03-31/add-support-for-multiple-partial-payments-on-invoices
* A charge's ``refunds`` list is not included unless expanded (since 2022-11-15).
  https://docs.stripe.com/changelog/2022-11-15

The functions are pure: the same arguments give the same dict. Ids are the caller's; use
``new_id`` with a seeded ``random.Random`` for reproducible runs.
"""

from __future__ import annotations

import hashlib
import random
import string
from decimal import Decimal

API_VERSION = "2025-10-29.clover"

# The Stripe account the simulated objects belong to (it appears in hosted invoice URLs).
ACCOUNT_ID = "acct_1SimuLatedSaaS00"
# When the simulated price was created: any fixed instant before the simulated lifecycles.
PRICE_CREATED = 1735689600  # 2025-01-01T00:00:00Z

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, rng: random.Random | None = None, length: int = 24) -> str:
    """A Stripe-like id (``sub_1Pgc6r...``): deterministic when given a seeded ``rng``."""
    rng = rng or random.Random()
    return f"{prefix}_{''.join(rng.choices(_ID_ALPHABET, k=length))}"


def _derived(prefix: str, source: str, length: int = 24) -> str:
    """An id of another kind that is always the same for ``source`` (keeps builders pure)."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    return f"{prefix}_{digest[:length]}"


def subscription_item_id(subscription_id: str) -> str:
    """The id of a simulated subscription's single item: derived, so lines can name it too."""
    return _derived("si", subscription_id, 14)


def _decimal_string(value: Decimal) -> str:
    """Stripe's ``*_decimal`` fields: a string with at most 12 decimal places."""
    return format(value.quantize(Decimal("1.000000000000")).normalize(), "f")


# --- Prices and subscriptions ------------------------------------------------------------------


def price_object(*, id: str, unit_amount: int, currency: str = "usd", livemode: bool = False) -> dict:
    """A licensed, monthly, per-seat price (https://docs.stripe.com/api/prices/object)."""
    return {
        "id": id,
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": PRICE_CREATED,
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": livemode,
        "lookup_key": None,
        "metadata": {},
        "nickname": None,
        "product": "prod_" + id.removeprefix("price_"),
        "recurring": {
            "interval": "month",
            "interval_count": 1,
            "meter": None,
            "usage_type": "licensed",
            "trial_period_days": None,
        },
        "tax_behavior": "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": unit_amount,
        "unit_amount_decimal": str(unit_amount),
    }


def subscription_object(
    *,
    id: str,
    customer: str,
    status: str,
    quantity: int = 1,
    price: str = "price_standard",
    unit_amount: int = 2000,
    currency: str = "usd",
    current_period_start: int,
    current_period_end: int,
    trial_start: int | None = None,
    trial_end: int | None = None,
    cancel_at_period_end: bool = False,
    cancel_at: int | None = None,
    canceled_at: int | None = None,
    ended_at: int | None = None,
    created: int,
    livemode: bool = False,
    latest_invoice: str | None = None,
    default_payment_method: str | None = None,
) -> dict:
    """A subscription with one item (https://docs.stripe.com/api/subscriptions/object).

    Period and quantity are on the item only, as in every API version since basil.
    """
    item = {
        "id": subscription_item_id(id),
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": created,
        "current_period_end": current_period_end,
        "current_period_start": current_period_start,
        "discounts": [],
        "metadata": {},
        "price": price_object(id=price, unit_amount=unit_amount, currency=currency, livemode=livemode),
        "quantity": quantity,
        "subscription": id,
        "tax_rates": [],
    }
    return {
        "id": id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        # The day the monthly cycle is anchored to: the end of the trial, or the start.
        "billing_cycle_anchor": trial_end or created,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"type": "classic"},
        "billing_thresholds": None,
        "cancel_at": cancel_at,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "cancellation_details": {
            "comment": None,
            "feedback": None,
            "reason": "cancellation_requested" if canceled_at else None,
        },
        "collection_method": "charge_automatically",
        "created": created,
        "currency": currency,
        "customer": customer,
        "customer_account": None,
        "days_until_due": None,
        "default_payment_method": default_payment_method,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "ended_at": ended_at,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {
            "object": "list",
            "data": [item],
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={id}",
        },
        "latest_invoice": latest_invoice,
        "livemode": livemode,
        "metadata": {},
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": created,
        "status": status,
        "test_clock": None,
        "transfer_data": None,
        "trial_end": trial_end,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": trial_start,
    }


# --- Invoices ------------------------------------------------------------------------------------


def invoice_line_object(
    *,
    id: str,
    invoice: str,
    amount: int,
    currency: str = "usd",
    quantity: int = 1,
    period_start: int,
    period_end: int,
    subscription: str | None = None,
    subscription_item: str | None = None,
    price: str = "price_standard",
    proration: bool = False,
    description: str = "",
    invoice_item: str | None = None,
    livemode: bool = False,
) -> dict:
    """One invoice line (https://docs.stripe.com/api/invoice-line-item/object).

    ``parent.type`` says where the line comes from: ``subscription_item_details`` when a
    subscription item is billed, ``invoice_item_details`` for an invoice item. Pass
    ``invoice_item`` for the latter with a subscription: that is how prorations from a
    mid-period change reach the next invoice (pending invoice items of the subscription,
    https://docs.stripe.com/billing/subscriptions/prorations).

    ``pricing.price_details`` (price and product) is left out: fixtures3 does not show it, so
    the app's readers must not rely on it. ``price`` is accepted for the callers' sake.
    """
    credited = {"credited_items": None}
    if subscription and not invoice_item:
        parent = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": proration,
                "proration_details": credited,
                "subscription": subscription,
                "subscription_item": subscription_item or subscription_item_id(subscription),
            },
        }
    else:
        parent = {
            "type": "invoice_item_details",
            "invoice_item_details": {
                "invoice_item": invoice_item or _derived("ii", id),
                "proration": proration,
                "proration_details": credited,
                "subscription": subscription,
            },
            "subscription_item_details": None,
        }
    unit = Decimal(amount) / Decimal(quantity) if quantity else Decimal(amount)
    return {
        "id": id,
        "object": "line_item",
        "amount": amount,
        "currency": currency,
        "description": description or None,
        "discount_amounts": [],
        "discountable": not proration,
        "discounts": [],
        "invoice": invoice,
        "livemode": livemode,
        "metadata": {},
        "parent": parent,
        "period": {"end": period_end, "start": period_start},
        "pretax_credit_amounts": [],
        "pricing": {"type": "price_details", "unit_amount_decimal": _decimal_string(unit)},
        "quantity": quantity,
        "subscription": subscription,
        "subtotal": amount,
        "taxes": [],
    }


def _hosted_urls(invoice_id: str) -> tuple[str, str]:
    token = _derived("test", invoice_id, 32)
    return (
        f"https://invoice.stripe.com/i/{ACCOUNT_ID}/{token}?s=ap",
        f"https://pay.stripe.com/invoice/{ACCOUNT_ID}/{token}/pdf?s=ap",
    )


def invoice_object(
    *,
    id: str,
    customer: str,
    status: str,
    billing_reason: str,
    lines: list[dict],
    currency: str = "usd",
    subscription: str | None = None,
    number: str | None = None,
    created: int,
    finalized_at: int | None = None,
    paid_at: int | None = None,
    voided_at: int | None = None,
    marked_uncollectible_at: int | None = None,
    customer_email: str = "",
    customer_name: str = "",
    attempt_count: int = 0,
    livemode: bool = False,
    period_start: int | None = None,
    period_end: int | None = None,
) -> dict:
    """An invoice (https://docs.stripe.com/api/invoices/object), totals derived from its lines.

    ``number``, ``hosted_invoice_url`` and ``invoice_pdf`` exist only once the invoice is
    finalized (https://docs.stripe.com/invoicing/integration/workflow-transitions).
    ``period_start``/``period_end`` are Stripe's *invoice* period (when its items were
    collected: for a renewal, the period that just ended), not the service period of its
    subscription line; both default to ``created``, as for a first or one-off invoice.
    """
    total = sum(line["amount"] for line in lines)
    amount_due = max(total, 0)
    amount_paid = amount_due if status == "paid" else 0
    finalized = status != "draft"
    hosted_url, pdf_url = _hosted_urls(id) if finalized else (None, None)
    parent = None
    if subscription:
        parent = {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription},
        }
    return {
        "id": id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Simulated SaaS",
        "account_tax_ids": None,
        "amount_due": amount_due,
        "amount_overpaid": 0,
        "amount_paid": amount_paid,
        "amount_remaining": amount_due - amount_paid if status in ("draft", "open", "uncollectible") else 0,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": attempt_count,
        "attempted": attempt_count > 0 or status == "paid",
        "auto_advance": status in ("draft", "open"),
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": False,
            "liability": None,
            "provider": None,
            "status": None,
        },
        # Stripe finalizes an automatically collected draft about an hour after creating it.
        "automatically_finalizes_at": created + 3600 if status == "draft" else None,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "created": created,
        "currency": currency,
        "custom_fields": None,
        "customer": customer,
        "customer_account": None,
        "customer_address": None,
        "customer_email": customer_email or None,
        "customer_name": customer_name or None,
        "customer_phone": None,
        "customer_shipping": None,
        "customer_tax_exempt": "none",
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": finalized_at,
        "ending_balance": 0 if finalized else None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": hosted_url,
        "invoice_pdf": pdf_url,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": {"object": "list", "data": list(lines), "has_more": False, "url": f"/v1/invoices/{id}/lines"},
        "livemode": livemode,
        "metadata": {},
        "next_payment_attempt": None,
        "number": number if finalized else None,
        "on_behalf_of": None,
        "parent": parent,
        "payment_settings": {"default_mandate": None, "payment_method_options": None, "payment_method_types": None},
        "period_end": period_end if period_end is not None else created,
        "period_start": period_start if period_start is not None else created,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": status,
        "status_transitions": {
            "finalized_at": finalized_at,
            "marked_uncollectible_at": marked_uncollectible_at,
            "paid_at": paid_at,
            "voided_at": voided_at,
        },
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "test_clock": None,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": created if finalized else None,
    }


def invoice_payment_object(
    *,
    id: str,
    invoice: str,
    payment_intent: str,
    amount_paid: int,
    currency: str = "usd",
    created: int,
    status: str = "paid",
    livemode: bool = False,
) -> dict:
    """What ties an invoice to the PaymentIntent that paid it (https://docs.stripe.com/api/invoice-payment/object)."""
    paid = status == "paid"
    return {
        "id": id,
        "object": "invoice_payment",
        "amount_paid": amount_paid if paid else None,
        "amount_requested": amount_paid,
        "created": created,
        "currency": currency,
        "invoice": invoice,
        "is_default": True,
        "livemode": livemode,
        "payment": {"type": "payment_intent", "payment_intent": payment_intent},
        "status": status,
        "status_transitions": {"canceled_at": None, "paid_at": created if paid else None},
    }


# --- Events ------------------------------------------------------------------------------------------


def event_object(
    *,
    type: str,
    obj: dict,
    created: int,
    id: str | None = None,
    previous_attributes: dict | None = None,
    api_version: str = API_VERSION,
    livemode: bool = False,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> dict:
    """The envelope Stripe posts to a webhook endpoint (https://docs.stripe.com/api/events/object).

    ``previous_attributes`` (``*.updated`` events only) holds the old values of the fields
    that changed. ``request`` names the API request that caused the event; both of its fields
    are null when Stripe acted on its own (a renewal, a retry).
    """
    data: dict = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": id or new_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": created,
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": type,
    }


# Payments, refunds, disputes, checkout and setup live in their own module; named here too.
from .payment_objects import (  # noqa: E402
    charge_object,  # noqa: F401
    checkout_session_object,  # noqa: F401
    customer_object,  # noqa: F401
    dispute_object,  # noqa: F401
    refund_object,  # noqa: F401
    setup_intent_object,  # noqa: F401
)

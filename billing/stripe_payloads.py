"""Reading Stripe payloads: the one place that knows where a field lives in each API version.

Handlers never dig through nested dicts; they ask this module. Layout notes:

* Since 2025-03-31.basil a subscription's period and quantity live on its items
  (``items.data[].current_period_start/end``, ``items.data[].quantity``); the top-level
  ``current_period_*``, ``plan`` and ``quantity`` are legacy and read only as a fallback for
  events created under older API versions (an event keeps the layout of its ``api_version``).
  https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end
* Since basil an invoice names its subscription in
  ``parent.subscription_details.subscription`` (the top-level ``subscription`` is legacy), and
  a line item's subscription and proration flag live in ``parent.subscription_item_details``.
  https://docs.stripe.com/changelog/basil/2025-03-31/adds-new-parent-field-to-invoicing-objects
* Since basil a charge no longer names its invoice; an ``invoice_payment`` ties an invoice to
  its PaymentIntent. https://docs.stripe.com/changelog/basil/2025-03-31/add-support-for-multiple-partial-payments-on-invoices

Snapshots are named tuples (``NamedTuple``): immutable like frozen dataclasses, and built several times
faster (a frozen dataclass sets each field through ``object.__setattr__``); every webhook
builds a few, and the renewal backfill one per stored invoice event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple


class PayloadError(ValueError):
    """The payload lacks something this app needs; the event fails with this message."""


_UTC = UTC


def ts(value: Any) -> datetime | None:
    """A Stripe unix timestamp as an aware UTC datetime (None stays None)."""
    if value is None:
        return None
    return datetime.fromtimestamp(int(value), _UTC)  # positional tz: measurably cheaper than tz=


def object_id(value: Any) -> str:
    """The id of an expandable field, whether Stripe sent the id or the expanded object."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return value.get("id") or ""
    return str(value)


def require(obj: dict, key: str) -> Any:
    value = obj.get(key)
    if value in (None, ""):
        raise PayloadError(f"{obj.get('object', 'object')} {obj.get('id', '?')} has no {key}")
    return value


# --- Events --------------------------------------------------------------------------------


class Event(NamedTuple):
    """The parts of an event envelope that handlers use."""

    id: str
    type: str
    created: datetime
    api_version: str
    livemode: bool
    obj: dict
    previous_attributes: dict

    @classmethod
    def from_payload(cls, payload: dict) -> Event:
        data = payload.get("data") or {}
        return cls(
            id=payload["id"],
            type=payload["type"],
            created=ts(payload.get("created")) or datetime.now(UTC),
            api_version=payload.get("api_version") or "",
            livemode=bool(payload.get("livemode")),
            obj=data.get("object") or {},
            previous_attributes=data.get("previous_attributes") or {},
        )


_LAST_UNIX_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the last instant a datetime can hold


def envelope_problem(payload: Any) -> str | None:
    """Why a parsed body is not a Stripe event envelope, or None if it is one."""
    if not isinstance(payload, dict):
        return "the body is not a JSON object"
    for key in ("id", "type"):
        if not isinstance(payload.get(key), str) or not payload.get(key):
            return f"the event has no {key}"
    if len(payload["id"]) > 255 or len(payload["type"]) > 255:
        return "the event id or type is too long"
    created = payload.get("created")
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created <= _LAST_UNIX_SECOND:
        return "the event's created is not a unix timestamp"
    if not isinstance(payload.get("api_version"), (str, type(None))):
        return "the event's api_version is not a string"
    if not isinstance(payload.get("livemode", False), bool):
        return "the event's livemode is not a boolean"
    data = payload.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        return "the event has no data.object"
    return None


# --- Customers -----------------------------------------------------------------------------


class CustomerRef(NamedTuple):
    """Who an object belongs to, and what we know of them to name a new account."""

    customer_id: str
    name: str = ""
    email: str = ""


def customer_of(obj: dict) -> CustomerRef:
    customer = obj.get("customer")
    cid = object_id(customer)
    if not cid:
        raise PayloadError(f"{obj.get('object', 'object')} {obj.get('id', '?')} names no customer")
    name = email = ""
    if isinstance(customer, dict):
        name, email = customer.get("name") or "", customer.get("email") or ""
    details = obj.get("customer_details") or {}
    name = name or obj.get("customer_name") or details.get("name") or ""
    email = email or obj.get("customer_email") or details.get("email") or ""
    return CustomerRef(cid, name, email)


# --- Subscriptions -------------------------------------------------------------------------


class SubscriptionSnapshot(NamedTuple):
    stripe_id: str
    customer: CustomerRef
    status: str
    quantity: int
    price_id: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    trial_start: datetime | None
    trial_end: datetime | None
    cancel_at_period_end: bool
    cancel_at: datetime | None
    canceled_at: datetime | None
    ended_at: datetime | None
    created: datetime | None


def _primary_item(sub: dict) -> dict:
    items = (sub.get("items") or {}).get("data") or []
    return items[0] if items else {}


def read_subscription(sub: dict) -> SubscriptionSnapshot:
    item = _primary_item(sub)
    # Current layout first (items), legacy top-level fields for events of older API versions.
    period_start = item.get("current_period_start", sub.get("current_period_start"))
    period_end = item.get("current_period_end", sub.get("current_period_end"))
    quantity = item.get("quantity", sub.get("quantity"))
    price = item.get("price") or item.get("plan") or sub.get("plan") or {}
    return SubscriptionSnapshot(
        stripe_id=require(sub, "id"),
        customer=customer_of(sub),
        status=require(sub, "status"),
        quantity=int(quantity) if quantity is not None else 1,
        price_id=object_id(price),
        current_period_start=ts(period_start),
        current_period_end=ts(period_end),
        trial_start=ts(sub.get("trial_start")),
        trial_end=ts(sub.get("trial_end")),
        cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
        cancel_at=ts(sub.get("cancel_at")),
        canceled_at=ts(sub.get("canceled_at")),
        ended_at=ts(sub.get("ended_at")),
        created=ts(sub.get("created")),
    )


# --- Invoices ------------------------------------------------------------------------------


class LineSnapshot(NamedTuple):
    stripe_id: str
    description: str
    currency: str
    amount: int
    quantity: int | None
    period_start: datetime | None
    period_end: datetime | None
    parent_type: str
    subscription_id: str
    price_id: str
    proration: bool

    @property
    def is_subscription_period(self) -> bool:
        """A regular (non-proration) line for a subscription item: it carries the service period."""
        return self.parent_type == "subscription_item_details" and not self.proration


class InvoiceSnapshot(NamedTuple):
    stripe_id: str
    customer: CustomerRef
    subscription_id: str
    status: str
    number: str
    billing_reason: str
    currency: str
    total: int
    amount_due: int
    amount_paid: int
    amount_remaining: int
    customer_email: str
    hosted_invoice_url: str
    invoice_pdf: str
    paid_at: datetime | None
    created: datetime | None
    attempt_count: int
    lines: tuple[LineSnapshot, ...]

    @property
    def subscription_line(self) -> LineSnapshot | None:
        """The line whose period is the invoice's service period: the latest regular subscription line."""
        candidates = [line for line in self.lines if line.is_subscription_period and line.period_start]
        return max(candidates, key=lambda line: line.period_start) if candidates else None


def _read_line(line: dict, currency: str) -> LineSnapshot:
    parent = line.get("parent") or {}
    parent_type = parent.get("type") or ""
    details = parent.get(parent_type) or {} if parent_type else {}
    if parent:
        subscription_id = object_id(details.get("subscription"))
        proration = bool(details.get("proration"))
        pricing = line.get("pricing") or {}
        price_id = object_id((pricing.get("price_details") or {}).get("price"))
    else:
        # Before basil: line.type was "subscription"/"invoiceitem", with top-level fields.
        parent_type = {"subscription": "subscription_item_details", "invoiceitem": "invoice_item_details"}.get(
            line.get("type") or "", ""
        )
        subscription_id = object_id(line.get("subscription"))
        proration = bool(line.get("proration"))
        price_id = object_id(line.get("price") or line.get("plan"))
    period = line.get("period") or {}
    quantity = line.get("quantity")
    return LineSnapshot(
        stripe_id=require(line, "id"),
        description=line.get("description") or "",
        currency=(line.get("currency") or currency or "").lower(),
        amount=int(line.get("amount") or 0),
        quantity=int(quantity) if quantity is not None else None,
        period_start=ts(period.get("start")),
        period_end=ts(period.get("end")),
        parent_type=parent_type,
        subscription_id=subscription_id,
        price_id=price_id,
        proration=proration,
    )


def invoice_subscription_id(inv: dict) -> str:
    parent = inv.get("parent") or {}
    details = parent.get("subscription_details") or {}
    return object_id(details.get("subscription")) or object_id(inv.get("subscription"))


def read_invoice(inv: dict) -> InvoiceSnapshot:
    currency = (require(inv, "currency") or "").lower()
    transitions = inv.get("status_transitions") or {}
    lines = tuple(_read_line(line, currency) for line in ((inv.get("lines") or {}).get("data") or []))
    return InvoiceSnapshot(
        stripe_id=require(inv, "id"),
        customer=customer_of(inv),
        subscription_id=invoice_subscription_id(inv),
        status=require(inv, "status"),
        number=inv.get("number") or "",
        billing_reason=inv.get("billing_reason") or "",
        currency=currency,
        total=int(inv.get("total") or 0),
        amount_due=int(inv.get("amount_due") or 0),
        amount_paid=int(inv.get("amount_paid") or 0),
        amount_remaining=int(inv.get("amount_remaining") or 0),
        customer_email=inv.get("customer_email") or "",
        hosted_invoice_url=inv.get("hosted_invoice_url") or "",
        invoice_pdf=inv.get("invoice_pdf") or "",
        paid_at=ts(transitions.get("paid_at")),
        created=ts(inv.get("created")),
        attempt_count=int(inv.get("attempt_count") or 0),
        lines=lines,
    )


# --- Payments and refunds ------------------------------------------------------------------


class InvoicePaymentSnapshot(NamedTuple):
    invoice_id: str
    payment_intent_id: str
    charge_id: str
    status: str


def read_invoice_payment(obj: dict) -> InvoicePaymentSnapshot:
    payment = obj.get("payment") or {}
    return InvoicePaymentSnapshot(
        invoice_id=object_id(require(obj, "invoice")),
        payment_intent_id=object_id(payment.get("payment_intent")),
        charge_id=object_id(payment.get("charge")),
        status=obj.get("status") or "",
    )


class ChargeSnapshot(NamedTuple):
    stripe_id: str
    payment_intent_id: str
    currency: str
    amount_refunded: int
    invoice_id: str  # only in pre-basil payloads


def read_charge(obj: dict) -> ChargeSnapshot:
    return ChargeSnapshot(
        stripe_id=require(obj, "id"),
        payment_intent_id=object_id(obj.get("payment_intent")),
        currency=(obj.get("currency") or "").lower(),
        amount_refunded=int(obj.get("amount_refunded") or 0),
        invoice_id=object_id(obj.get("invoice")),
    )


class RefundSnapshot(NamedTuple):
    stripe_id: str
    charge_id: str
    payment_intent_id: str
    amount: int
    currency: str
    status: str


def read_refund(obj: dict) -> RefundSnapshot:
    return RefundSnapshot(
        stripe_id=require(obj, "id"),
        charge_id=object_id(obj.get("charge")),
        payment_intent_id=object_id(obj.get("payment_intent")),
        amount=int(obj.get("amount") or 0),
        currency=(obj.get("currency") or "").lower(),
        status=obj.get("status") or "",
    )


# --- Disputes ------------------------------------------------------------------------------


class DisputeSnapshot(NamedTuple):
    stripe_id: str
    charge_id: str
    payment_intent_id: str  # "" for a charge made without a PaymentIntent
    amount: int
    currency: str
    reason: str
    status: str
    evidence_due_by: datetime | None
    is_charge_refundable: bool
    created: datetime | None


def read_dispute(obj: dict) -> DisputeSnapshot:
    """A dispute (``charge.dispute.*`` events): https://docs.stripe.com/api/disputes/object

    A dispute names its charge and PaymentIntent, never a customer or an invoice: those are
    reached through the payment (``billing.models.DisputeQuerySet``). ``evidence_details.due_by``
    is 0 when the card network allows no response; that is read as "no deadline" (None).
    """
    due_by = (obj.get("evidence_details") or {}).get("due_by")
    return DisputeSnapshot(
        stripe_id=require(obj, "id"),
        charge_id=object_id(require(obj, "charge")),
        payment_intent_id=object_id(obj.get("payment_intent")),
        amount=int(obj.get("amount") or 0),
        currency=(require(obj, "currency") or "").lower(),
        reason=obj.get("reason") or "",
        status=require(obj, "status"),
        evidence_due_by=ts(due_by) if due_by else None,
        is_charge_refundable=bool(obj.get("is_charge_refundable")),
        created=ts(obj.get("created")),
    )


# --- Checkout and setup --------------------------------------------------------------------


class CheckoutSnapshot(NamedTuple):
    stripe_id: str
    mode: str
    client_reference_id: str
    customer: CustomerRef | None
    subscription_id: str


def read_checkout_session(obj: dict) -> CheckoutSnapshot:
    customer = customer_of(obj) if obj.get("customer") else None
    return CheckoutSnapshot(
        stripe_id=require(obj, "id"),
        mode=obj.get("mode") or "",
        client_reference_id=obj.get("client_reference_id") or "",
        customer=customer,
        subscription_id=object_id(obj.get("subscription")),
    )


class SetupIntentSnapshot(NamedTuple):
    stripe_id: str
    customer_id: str
    payment_method_id: str
    status: str


def read_setup_intent(obj: dict) -> SetupIntentSnapshot:
    return SetupIntentSnapshot(
        stripe_id=require(obj, "id"),
        customer_id=object_id(obj.get("customer")),
        payment_method_id=object_id(obj.get("payment_method")),
        status=obj.get("status") or "",
    )

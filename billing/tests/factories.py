"""factory-boy factories for billing's rows: the Stripe mirror, the inbox and the owed e-mails.

Defaults are realistic and minimal: each row is valid and unique on its own, shaped like what
the webhook would have mirrored (Stripe's id formats, money as an integer in the currency's
minor unit beside its currency, aware UTC datetimes), and nothing more. A test passes the fields
it depends on explicitly, even when they equal a default.

    subscription = SubscriptionFactory(account=account, quantity=3)
    invoice = InvoiceFactory(subscription=subscription)   # its account and stripe_subscription_id follow
    InvoiceFactory(account=account, status=Invoice.Status.OPEN, total=5000)   # one-off, unpaid
    OwedEmailFactory(invoice=invoice)                     # the receipt owed for it
    StripeEventFactory(type="invoice.paid", object_id=invoice.stripe_id)

Rows are written with ``Model.objects.create`` (history included), never through the webhook:
tests about what the webhook writes deliver signed events instead.
"""

from datetime import timedelta

import factory
from django.conf import settings
from factory.django import DjangoModelFactory

from billing.models import (
    Dispute,
    Invoice,
    InvoiceLineItem,
    OwedEmail,
    Payment,
    Refund,
    Renewal,
    StripeEvent,
    Subscription,
)
from provisioning.tests.factories import AccountFactory, now, stripe_id_sequence


class SubscriptionFactory(DjangoModelFactory):
    """An active subscription of one seat, in the first month of its current period.

    ``SubscriptionFactory(trialing=True)``: a 14-day trial that started now.
    """

    class Meta:
        model = Subscription

    stripe_id = stripe_id_sequence("sub")
    account = factory.SubFactory(AccountFactory)
    status = Subscription.Status.ACTIVE
    quantity = 1
    current_period_start = factory.LazyFunction(now)
    current_period_end = factory.LazyAttribute(lambda o: o.current_period_start + timedelta(days=30))

    class Params:
        trialing = factory.Trait(
            status=Subscription.Status.TRIALING,
            trial_start=factory.SelfAttribute("current_period_start"),
            trial_end=factory.LazyAttribute(lambda o: o.current_period_start + timedelta(days=14)),
            current_period_end=factory.SelfAttribute("trial_end"),
        )


class InvoiceFactory(DjangoModelFactory):
    """A paid invoice of 20.00 USD.

    One-off (no subscription) unless ``subscription=`` is given; then its account and
    ``stripe_subscription_id`` are the subscription's. Amounts follow ``total`` and ``status``
    (paid: paid in full; otherwise nothing paid yet); a draft has no number yet.
    """

    class Meta:
        model = Invoice

    stripe_id = stripe_id_sequence("in")
    subscription = None
    account = factory.Maybe(
        "subscription",
        yes_declaration=factory.SelfAttribute("subscription.account"),
        no_declaration=factory.SubFactory(AccountFactory),
    )
    stripe_subscription_id = factory.Maybe(
        "subscription", yes_declaration=factory.SelfAttribute("subscription.stripe_id"), no_declaration=""
    )
    billing_reason = factory.Maybe("subscription", yes_declaration="subscription_cycle", no_declaration="manual")
    number = factory.LazyAttributeSequence(lambda o, n: "" if o.status == Invoice.Status.DRAFT else f"TEST-{n:04d}")
    status = Invoice.Status.PAID
    currency = "usd"
    total = 2000
    amount_due = factory.SelfAttribute("total")
    amount_paid = factory.LazyAttribute(lambda o: o.amount_due if o.status == Invoice.Status.PAID else 0)
    amount_remaining = factory.LazyAttribute(lambda o: o.amount_due - o.amount_paid)
    paid_at = factory.LazyAttribute(lambda o: now() if o.status == Invoice.Status.PAID else None)


class InvoiceLineItemFactory(DjangoModelFactory):
    """One line of one unit that makes up its invoice's whole total."""

    class Meta:
        model = InvoiceLineItem

    invoice = factory.SubFactory(InvoiceFactory)
    stripe_id = stripe_id_sequence("il")
    currency = factory.SelfAttribute("invoice.currency")
    amount = factory.SelfAttribute("invoice.total")
    quantity = 1
    stripe_subscription_id = factory.SelfAttribute("invoice.stripe_subscription_id")
    parent_type = factory.LazyAttribute(
        lambda o: "subscription_item_details" if o.stripe_subscription_id else "invoice_item_details"
    )


class RenewalFactory(DjangoModelFactory):
    """A planned renewal, effective at the end of its subscription's current period; not linked
    to an invoice, not processed."""

    class Meta:
        model = Renewal

    subscription = factory.SubFactory(SubscriptionFactory)
    effective_date = factory.SelfAttribute("subscription.current_period_end")


class PaymentFactory(DjangoModelFactory):
    """A PaymentIntent and its charge, not tied to an invoice unless ``invoice=`` is given."""

    class Meta:
        model = Payment

    payment_intent_id = stripe_id_sequence("pi")
    charge_id = stripe_id_sequence("ch")
    invoice = None
    stripe_invoice_id = factory.Maybe(
        "invoice", yes_declaration=factory.SelfAttribute("invoice.stripe_id"), no_declaration=""
    )
    currency = factory.Maybe("invoice", yes_declaration=factory.SelfAttribute("invoice.currency"), no_declaration="usd")


class RefundFactory(DjangoModelFactory):
    """A succeeded refund of 10.00 USD. It names no PaymentIntent or charge unless given: a test
    about whose refund it is says so."""

    class Meta:
        model = Refund

    stripe_id = stripe_id_sequence("re")
    amount = 1000
    currency = "usd"
    status = "succeeded"


class DisputeFactory(DjangoModelFactory):
    """A dispute of 20.00 USD that needs a response within a week, about a new payment's charge.

    ``DisputeFactory(payment=payment)``: a dispute of that payment's charge and PaymentIntent.
    """

    class Meta:
        model = Dispute
        exclude = ("payment",)

    payment = factory.SubFactory(PaymentFactory)
    stripe_id = stripe_id_sequence("dp")
    charge_id = factory.SelfAttribute("payment.charge_id")
    payment_intent_id = factory.SelfAttribute("payment.payment_intent_id")
    amount = 2000
    currency = "usd"
    reason = "fraudulent"
    status = Dispute.Status.NEEDS_RESPONSE
    evidence_due_by = factory.LazyFunction(lambda: now() + timedelta(days=7))
    stripe_created = factory.LazyFunction(now)


class StripeEventFactory(DjangoModelFactory):
    """An inbox row as a verified delivery stores it (status ``received``), with an event-shaped
    payload that agrees with its columns."""

    class Meta:
        model = StripeEvent

    id = stripe_id_sequence("evt")
    type = "invoice.paid"
    api_version = factory.LazyFunction(lambda: settings.STRIPE_API_VERSION)
    livemode = False
    created = factory.LazyFunction(now)
    object_id = ""
    payload = factory.LazyAttribute(
        lambda o: {
            "id": o.id,
            "object": "event",
            "type": o.type,
            "api_version": o.api_version,
            "created": int(o.created.timestamp()),
            "livemode": o.livemode,
            "data": {"object": {"id": o.object_id}},
        }
    )


def _owed_key(o) -> str:
    """The key ``owe_email`` is given for that e-mail by the billing services."""
    if o.kind == OwedEmail.Kind.TRIAL_WILL_END:
        trial_end = int(o.subscription.trial_end.timestamp()) if o.subscription.trial_end else 0
        return f"trial_will_end:{o.subscription.stripe_id}:{trial_end}"
    if o.kind == OwedEmail.Kind.PAYMENT_FAILED:
        return f"payment_failed:{o.invoice.stripe_id}:1"
    return f"receipt:{o.invoice.stripe_id}"


class OwedEmailFactory(DjangoModelFactory):
    """A pending e-mail the app owes: by default a receipt for a new paid invoice.

    Pass ``invoice=`` (receipt, payment failed) or ``subscription=`` (trial ending); the account
    is theirs and the key the one the services would give it.
    """

    class Meta:
        model = OwedEmail

    kind = OwedEmail.Kind.RECEIPT
    invoice = factory.Maybe(
        factory.LazyAttribute(lambda o: o.kind == OwedEmail.Kind.TRIAL_WILL_END),
        yes_declaration=None,
        no_declaration=factory.SubFactory(InvoiceFactory),
    )
    subscription = factory.Maybe(
        factory.LazyAttribute(lambda o: o.kind == OwedEmail.Kind.TRIAL_WILL_END),
        yes_declaration=factory.SubFactory(SubscriptionFactory, trialing=True),
        no_declaration=None,
    )
    account = factory.LazyAttribute(lambda o: (o.invoice or o.subscription).account)
    key = factory.LazyAttribute(_owed_key)

"""What happens on each Stripe event, in one file.

Each handler is registered for its event types and translates the event into service calls.
It runs inside the inbox's transaction (``billing.inbox``); it never commits, talks HTTP or
sends mail. Event types: https://docs.stripe.com/api/events/types
"""
from .registry import handles
from .services import (
    attach_waiting_payments,
    invoice_first_read,
    invoice_lock_key,
    link_checkout_to_account,
    link_invoice_to_renewal,
    mirror_invoice,
    mirror_subscription,
    owe_payment_failed_email,
    owe_trial_will_end_email,
    record_charge_refund,
    record_invoice_payment,
    record_payment_method,
    record_refund,
    settle_paid_invoice,
    subscription_first_read,
)
from .stripe_payloads import Event, object_id, read_invoice


def _customer(event: Event) -> str | None:
    """The customer whose account the handler locks first (``registry.handles``)."""
    return object_id(event.obj.get("customer")) or None


def _invoice(event: Event) -> str | None:
    """The invoice's lock, taken before the account's: its payments' writers take it too."""
    stripe_id = event.obj.get("id")
    return invoice_lock_key(stripe_id) if isinstance(stripe_id, str) and stripe_id else None


@handles("checkout.session.completed")
def on_checkout_completed(event: Event) -> None:
    """Link the account named by ``client_reference_id`` to the customer (merging a placeholder)."""
    link_checkout_to_account(event)


@handles(
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    locks_account_of=_customer,
    reads_first=subscription_first_read,
)
def on_subscription_changed(event: Event) -> None:
    """Mirror the snapshot (unless older than the mirror) and keep entitlements in step."""
    mirror_subscription(event)


@handles("customer.subscription.trial_will_end", locks_account_of=_customer, reads_first=subscription_first_read)
def on_trial_will_end(event: Event) -> None:
    """Sent three days before a trial ends: mirror the snapshot and owe the reminder e-mail.

    https://docs.stripe.com/billing/subscriptions/trials#use-webhooks-to-manage-trial-ending
    """
    subscription, _ = mirror_subscription(event)
    owe_trial_will_end_email(subscription)


@handles(
    "invoice.created",
    "invoice.finalized",
    "invoice.updated",
    "invoice.voided",
    "invoice.marked_uncollectible",
    locks_account_of=_customer,
    reads_first=invoice_first_read,
    locks_key_of=_invoice,
)
def on_invoice_changed(event: Event) -> None:
    """Mirror the invoice and link it to the renewal it pays for.

    ``invoice.created`` must be answered fast: Stripe holds finalization until it gets a 2xx.
    https://docs.stripe.com/billing/subscriptions/webhooks#understand
    """
    invoice, applied = mirror_invoice(event)
    if applied:
        link_invoice_to_renewal(invoice)
    # Free unless mirror_invoice saw a payment waiting; even a stale snapshot's event attaches it.
    attach_waiting_payments(invoice)


@handles("invoice.paid", locks_account_of=_customer, reads_first=invoice_first_read, locks_key_of=_invoice)
def on_invoice_paid(event: Event) -> None:
    """Mark paid; process its renewal exactly once; owe the receipt exactly once."""
    invoice, _ = mirror_invoice(event, whole_subscription=True)
    attach_waiting_payments(invoice)
    settle_paid_invoice(invoice)


@handles("invoice.payment_failed", locks_account_of=_customer, reads_first=invoice_first_read, locks_key_of=_invoice)
def on_invoice_payment_failed(event: Event) -> None:
    """Mirror the invoice and owe the billing-error e-mail (once per payment attempt)."""
    invoice, _ = mirror_invoice(event)
    owe_payment_failed_email(invoice, read_invoice(event.obj).attempt_count)


@handles("invoice_payment.paid")
def on_invoice_payment_paid(event: Event) -> None:
    """Tie a PaymentIntent to the invoice it paid: how refunds find their invoice since basil."""
    record_invoice_payment(event)


@handles("charge.refunded")
def on_charge_refunded(event: Event) -> None:
    record_charge_refund(event)


@handles("refund.created", "refund.updated", "refund.failed")
def on_refund_changed(event: Event) -> None:
    record_refund(event)


@handles("setup_intent.succeeded")
def on_setup_intent_succeeded(event: Event) -> None:
    """A payment method is on file for the customer's account."""
    record_payment_method(event)

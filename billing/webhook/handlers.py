"""What happens on each Stripe event, in one file.

Each handler is registered for its event types and translates the event into service calls.
It runs inside the inbox's transaction (``billing.webhook.inbox``); it never commits, talks
HTTP or sends mail. The services take their own locks. Event types:
https://docs.stripe.com/api/events/types
"""

from ..services.accounts import link_checkout_to_account, record_payment_method
from ..services.disputes import mirror_dispute
from ..services.invoices import mirror_invoice, owe_payment_failed_email, settle_paid_invoice
from ..services.payments import record_charge_refund, record_invoice_payment, record_refund
from ..services.subscriptions import mirror_subscription, owe_trial_will_end_email
from ..stripe_payloads import Event
from .registry import handles


@handles("checkout.session.completed")
def on_checkout_completed(event: Event) -> None:
    """Link the account named by ``client_reference_id`` to the customer (merging a placeholder)."""
    link_checkout_to_account(event)


@handles("customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted")
def on_subscription_changed(event: Event) -> None:
    """Mirror the snapshot (unless older than the mirror) and keep entitlements in step."""
    mirror_subscription(event)


@handles("customer.subscription.trial_will_end")
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
)
def on_invoice_changed(event: Event) -> None:
    """Mirror the invoice, link it to the renewal it pays for, attach payments that waited for it.

    ``invoice.created`` must be answered fast: Stripe holds finalization until it gets a 2xx.
    https://docs.stripe.com/billing/subscriptions/webhooks#understand
    """
    mirror_invoice(event)


@handles("invoice.paid")
def on_invoice_paid(event: Event) -> None:
    """Mark paid; process its renewal exactly once; owe the receipt exactly once."""
    mirrored = mirror_invoice(event)
    settle_paid_invoice(mirrored.invoice, mirrored.renewal)


@handles("invoice.payment_failed")
def on_invoice_payment_failed(event: Event) -> None:
    """Mirror the invoice and owe the billing-error e-mail (once per payment attempt)."""
    mirrored = mirror_invoice(event)
    owe_payment_failed_email(mirrored.invoice, mirrored.snapshot.attempt_count)


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


@handles(
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
)
def on_dispute_changed(event: Event) -> None:
    """Mirror the dispute for support (newest snapshot wins); it changes no entitlement.

    Each ``charge.dispute.*`` event carries the whole dispute as its object:
    https://docs.stripe.com/api/events/types#event_types-charge.dispute.created
    """
    mirror_dispute(event)

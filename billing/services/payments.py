"""Which PaymentIntent paid which invoice, and what was refunded of it.

Since API version 2025-03-31.basil a charge no longer names its invoice: the link comes from
``invoice_payment.paid`` (or Stripe's InvoicePayments API, ``billing.tasks``), so refunds can
arrive before the invoice they belong to is known. They wait on a ``Payment`` row until it is,
and the invoice's ``amount_refunded`` is recomputed from all of them whenever one moves.

Payment writers know no customer, so they take no account lock. One that names the invoice
takes the invoice's lock first (``locks``), as the invoice's own handlers do: that orders a
payment with the invoice it pays, whichever arrives first.
"""

from __future__ import annotations

from django.conf import settings

from .. import sql
from ..models import Invoice, Payment, Refund
from ..outbox import run_after_commit
from ..stripe_payloads import Event, read_charge, read_invoice_payment, read_refund
from .locks import get_or_create_locked, lock_invoice, lock_payment
from .snapshots import older_than_stored, save_changed

# Refund statuses that count against the invoice: https://docs.stripe.com/api/refunds/object#refund_object-status
COUNTED_REFUND_STATUSES = ("succeeded", "pending", "requires_action")


def record_invoice_payment(event: Event) -> None:
    """``invoice_payment.paid``: which PaymentIntent paid which invoice (basil and later)."""
    snap = read_invoice_payment(event.obj)
    if not snap.payment_intent_id:
        return
    if snap.invoice_id:
        lock_invoice(snap.invoice_id)  # then look for the invoice: one committed meanwhile is seen
    read = sql.payment_read(snap.invoice_id, snap.payment_intent_id)
    payment, created = get_or_create_locked(
        Payment,
        {"payment_intent_id": snap.payment_intent_id},
        {"stripe_invoice_id": snap.invoice_id, "invoice_id": read.invoice_id, "livemode": event.livemode},
    )
    if created and not read.refund_known:
        # Nothing of it is refunded yet: its invoice's refunded amount cannot change. A refund
        # written concurrently creates this payment's row or waits for it (lock_payment), then
        # recomputes.
        return
    save_changed(payment, {"stripe_invoice_id": snap.invoice_id, "livemode": event.livemode}, reason=event.type)
    recompute_refunded(payment)


def record_charge_refund(event: Event) -> None:
    """``charge.refunded``: the charge's cumulative refunded amount (it only grows)."""
    snap = read_charge(event.obj)
    if snap.invoice_id:  # pre-basil charges still name their invoice
        lock_invoice(snap.invoice_id)
    payment = lock_payment(snap.payment_intent_id or f"charge:{snap.stripe_id}")
    values = {
        "charge_id": snap.stripe_id,
        "currency": snap.currency,
        "charge_amount_refunded": max(payment.charge_amount_refunded, snap.amount_refunded),
        "livemode": event.livemode,
    }
    if snap.invoice_id:
        values["stripe_invoice_id"] = snap.invoice_id
    save_changed(payment, values, reason=event.type)
    recompute_refunded(payment)


def record_refund(event: Event) -> None:
    """``refund.created`` / ``.updated`` / ``.failed``: mirror the refund, newest snapshot wins."""
    snap = read_refund(event.obj)
    values = {
        "payment_intent_id": snap.payment_intent_id,
        "charge_id": snap.charge_id,
        "amount": snap.amount,
        "currency": snap.currency,
        "status": snap.status,
        "livemode": event.livemode,
    }
    refund, created = get_or_create_locked(
        Refund, {"stripe_id": snap.stripe_id}, {**values, "last_event_created": event.created}, reason=event.type
    )
    if not created:
        if older_than_stored(refund, event):
            return
        refund.last_event_created = event.created
        save_changed(refund, values, reason=event.type, extra=("last_event_created",))
    key = snap.payment_intent_id or (f"charge:{snap.charge_id}" if snap.charge_id else "")
    if key:
        recompute_refunded(lock_payment(key))


def recompute_refunded(payment: Payment) -> None:
    """Attach the payment to its invoice when known, and recompute the invoice's refunded amount.

    The caller holds the payment's lock. Each payment counts the larger of its charge's
    cumulative ``amount_refunded`` and the sum of its counted refunds.
    """
    if payment.invoice_id is None and payment.stripe_invoice_id:
        invoice_id = Invoice.objects.filter(stripe_id=payment.stripe_invoice_id).values_list("id", flat=True).first()
        if invoice_id is not None:
            save_changed(payment, {"invoice_id": invoice_id}, reason="its invoice is known")
    if payment.invoice_id is None:
        # Kept until invoice_payment.paid or the invoice arrives; meanwhile ask Stripe (after commit).
        if not payment.stripe_invoice_id and not payment.payment_intent_id.startswith("charge:"):
            _ask_stripe_for_invoice(payment.payment_intent_id)
        return
    invoice = Invoice.objects.select_for_update().get(pk=payment.invoice_id)
    invoice_payments = Payment.objects.filter(invoice=invoice)
    payments = list(invoice_payments)
    refunds = Refund.objects.of_payments(invoice_payments).filter(status__in=COUNTED_REFUND_STATUSES)
    refunds = list(refunds.values_list("payment_intent_id", "charge_id", "amount"))
    total = 0
    for p in payments:
        refunded = sum(
            amount
            for payment_intent_id, charge_id, amount in refunds
            if payment_intent_id == p.payment_intent_id or (charge_id and charge_id == p.charge_id)
        )
        total += max(p.charge_amount_refunded, refunded)
    save_changed(invoice, {"amount_refunded": total}, reason="refund")


def attach_waiting_payments(invoice: Invoice) -> None:
    """Payments (and their refunds) that arrived before their invoice are attached to it now.

    The caller holds the invoice's lock, which a payment's writer takes before it looks for the
    invoice: a payment committed before is found here, one committed after finds the invoice.
    """
    for payment in Payment.objects.select_for_update().filter(stripe_invoice_id=invoice.stripe_id, invoice=None):
        recompute_refunded(payment)


def _ask_stripe_for_invoice(payment_intent_id: str) -> None:
    """Once this transaction commits, ask Stripe which invoice the PaymentIntent paid.

    Through ``billing.outbox.run_after_commit``: no request waits for the broker, and a look-up
    whose message is lost is asked again by ``billing.tasks.sweep_unresolved_payments``.
    """
    if not settings.STRIPE_API_KEY:
        return
    from ..tasks import resolve_payment_invoice, resolve_payment_invoices

    run_after_commit(resolve_payment_invoice, payment_intent_id, batch_task=resolve_payment_invoices)

"""The invoice mirror; a paid invoice settled exactly once; the e-mails an invoice owes.

``mirror_invoice`` takes the invoice's lock, then the account's (``locks``), then reads. A
snapshot older than the mirror is not written, and an invoice's status never moves backwards.
``settle_paid_invoice`` grants what the invoice paid for, through its renewal, once.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from provisioning.models import Entitlement

from .. import sql
from ..errors import PrerequisiteMissing
from ..models import Invoice, InvoiceLineItem, OwedEmail, Renewal, Subscription
from ..outbox import owe_email
from ..stripe_payloads import Event, InvoiceSnapshot, read_invoice
from . import renewals
from .locks import lock_account, lock_invoice
from .payments import attach_waiting_payments
from .snapshots import older_than_stored, save_snapshot
from .subscriptions import end_subscription, grant_entitlement, seats_for_period

# Stripe's invoice statuses in the order they can be reached; paid and void are final.
# https://docs.stripe.com/invoicing/overview#invoice-statuses
_STATUS_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


def _status_moves_backwards(current: str, new: str) -> bool:
    if current == new:
        return False
    return _STATUS_RANK.get(new, 0) <= _STATUS_RANK.get(current, 0)


class MirroredInvoice(NamedTuple):
    invoice: Invoice
    applied: bool  # False if the snapshot was older than the mirror (nothing of it written)
    renewal: Renewal | None  # the renewal the invoice pays for, linked before or now
    snapshot: InvoiceSnapshot  # the event's snapshot, as read (what the mirror does not keep, too)


def mirror_invoice(event: Event) -> MirroredInvoice:
    """Mirror the invoice snapshot of ``event``, link the invoice to the renewal it pays for,
    and attach the payments that arrived before it.

    The invoice's subscription, if mirrored, comes cached on it (``invoice.subscription``).
    """
    snap = read_invoice(event.obj)
    lock_invoice(snap.stripe_id)
    account = lock_account(snap.customer)
    line = snap.subscription_line
    period_start = line.period_start if line else None
    read = sql.invoice_read(snap.stripe_id, snap.subscription_id, period_start)
    invoice, sub = read.invoice, read.subscription
    values = {
        "subscription_id": sub.pk if sub else None,
        "stripe_subscription_id": snap.subscription_id,
        "number": snap.number,
        "status": snap.status,
        "billing_reason": snap.billing_reason,
        "currency": snap.currency,
        "total": snap.total,
        "amount_due": snap.amount_due,
        "amount_paid": snap.amount_paid,
        "amount_remaining": snap.amount_remaining,
        "customer_email": snap.customer_email,
        "hosted_invoice_url": snap.hosted_invoice_url,
        "invoice_pdf": snap.invoice_pdf,
        "period_start": period_start,
        "period_end": line.period_end if line else None,
        "line_quantity": line.quantity if line else None,
        "paid_at": snap.paid_at or (event.created if snap.status == Invoice.Status.PAID else None),
        "stripe_created": snap.created,
        "livemode": event.livemode,
    }
    if invoice is None:
        invoice = Invoice(stripe_id=snap.stripe_id, account=account, lines_digest=lines_digest(snap), **values)
        invoice.last_event_created, invoice.last_event_id = event.created, event.id
        sql.create_with_history(invoice, reason=event.type)
        _write_lines(invoice, snap, existing=[])
        applied = True
    elif older_than_stored(invoice, event) or _status_moves_backwards(invoice.status, snap.status):
        applied = False
    else:
        if sub is None:
            values["subscription_id"] = invoice.subscription_id  # never forget a known subscription
        values["paid_at"] = values["paid_at"] or invoice.paid_at
        written = invoice.lines_digest
        was_draft = invoice.status == Invoice.Status.DRAFT
        if was_draft:  # lines only change while the invoice is a draft
            values["lines_digest"] = lines_digest(snap)
        save_snapshot(invoice, values, event)
        if was_draft and values["lines_digest"] != written:
            _write_lines(invoice, snap, existing=list(invoice.lines.all()))
        applied = True
    if invoice.account_id == account.pk:
        invoice.account = account
    if sub is not None and invoice.subscription_id == sub.pk:
        invoice.subscription = sub
    renewal = renewals.link_invoice_to_renewal(invoice, _renewals_that_decide(read, invoice, period_start))
    if read.payments_waiting:
        attach_waiting_payments(invoice)
    return MirroredInvoice(invoice, applied, renewal, snap)


def _renewals_that_decide(read: sql.InvoiceRead, invoice: Invoice, period_start) -> list[Renewal] | None:
    """The renewals that decide the invoice's link, as ``invoice_read`` found them; None when
    its read cannot tell (``link_invoice_to_renewal`` then reads every candidate).
    """
    if read.subscription is None or invoice.subscription_id != read.subscription.pk:
        return None  # the invoice keeps a subscription its snapshot does not name
    if invoice.period_start != period_start:
        return None  # a stale snapshot of another period: the read looked at its date
    if read.linked_renewal or read.exact_renewal or not read.renewal_that_day:
        return [r for r in (read.linked_renewal, read.exact_renewal) if r is not None]
    return None  # renewals near the period's start on that date: the nearest wins, read them all


def _line_key(line) -> tuple:
    return (line.stripe_id, line.amount, line.quantity, line.period_start, line.period_end)


def lines_digest(snap: InvoiceSnapshot) -> str:
    """A fingerprint of the snapshot's lines (what ``_write_lines`` compares), kept on the invoice
    so that a snapshot with the lines already written (most ``invoice.finalized``) reads none.
    """
    keys = sorted((_line_key(line) for line in snap.lines), key=lambda key: key[0])
    return hashlib.blake2b(repr(keys).encode(), digest_size=16).hexdigest()


def _write_lines(invoice: Invoice, snap: InvoiceSnapshot, *, existing: list[InvoiceLineItem]) -> None:
    """The invoice's lines as the snapshot has them (``existing`` rewritten only if they differ)."""
    if {_line_key(line) for line in existing} == {_line_key(line) for line in snap.lines}:
        return
    for line in existing:
        line._change_reason = "invoice snapshot"
        line.delete()
    rows = [
        InvoiceLineItem(
            invoice=invoice,
            stripe_id=line.stripe_id,
            description=line.description[:10000],
            currency=line.currency,
            amount=line.amount,
            quantity=line.quantity,
            period_start=line.period_start,
            period_end=line.period_end,
            parent_type=line.parent_type,
            stripe_subscription_id=line.subscription_id,
            price_id=line.price_id,
            proration=line.proration,
        )
        for line in snap.lines
    ]
    sql.create_many_with_history(rows, reason="invoice snapshot")


def settle_paid_invoice(invoice: Invoice, renewal: Renewal | None) -> None:
    """``invoice.paid``: grant what it paid for (once) and owe its receipt (once).

    ``renewal``: the renewal the invoice was linked to (``mirror_invoice``), if any.
    """
    if invoice.status != Invoice.Status.PAID:
        return  # a stale snapshot of an invoice whose payment we have not seen yet
    if invoice.subscription_id is None and invoice.stripe_subscription_id:
        raise PrerequisiteMissing(
            f"invoice {invoice.stripe_id} pays for subscription {invoice.stripe_subscription_id}, not known yet"
        )
    if invoice.subscription_id is not None and invoice.period_start and invoice.period_end:
        sub = invoice.subscription
        if _is_trial_invoice(sub, invoice):
            pass  # the trial's own $0 invoice: the trial entitlement already covers it
        elif invoice.billing_reason == "subscription_create":
            grant_paid_period(sub, invoice)  # the first invoice has no renewal before it
            renewals.relink_renewal_entitlements(sub)
        else:
            # A renewal created here is linked to this (already mirrored) invoice by ensure_renewal.
            renewal = renewal or renewals.ensure_renewal(sub, invoice.period_start)
            if not process_renewal(renewal, invoice, sub):  # which relinks them when it processes
                renewals.relink_renewal_entitlements(sub)
    if invoice.total > 0:
        owe_email(OwedEmail.Kind.RECEIPT, key=f"receipt:{invoice.stripe_id}", account=invoice.account, invoice=invoice)


def _is_trial_invoice(sub: Subscription, invoice: Invoice) -> bool:
    return bool(sub.trial_end and invoice.period_end and invoice.period_end <= sub.trial_end)


def grant_paid_period(sub: Subscription, invoice: Invoice) -> None:
    """A ``paid`` entitlement for the invoice's service period, and the next renewal planned.

    The caller relinks the renewals' entitlements once it has made all its changes.
    """
    grant_entitlement(
        sub,
        kind=Entitlement.Kind.PAID,
        starts_at=invoice.period_start,
        expires_at=invoice.period_end,
        seats=seats_for_period(sub, invoice.period_start, invoice.line_quantity),
        stripe_invoice_id=invoice.stripe_id,
    )
    if not sub.ended_at or sub.ended_at > invoice.period_end:
        renewals.ensure_renewal(sub, invoice.period_end)
    if sub.ended_at:
        end_subscription(sub)


def process_renewal(renewal: Renewal, invoice: Invoice, sub: Subscription) -> bool:
    """Grant the period ``invoice`` paid for through ``renewal``, exactly once.

    ``renewal`` was read under the account's lock, which every writer of ``processed_at``
    holds: what it says is current.
    """
    if renewal.processed_at is not None:
        return False
    grant_paid_period(sub, invoice)
    processed_at = invoice.paid_at or invoice.last_event_created
    renewals.relink_renewal_entitlements(sub, processing=(renewal, processed_at, f"processed by {invoice.stripe_id}"))
    return True


def owe_payment_failed_email(invoice: Invoice, attempt_count: int) -> None:
    owe_email(
        OwedEmail.Kind.PAYMENT_FAILED,
        key=f"payment_failed:{invoice.stripe_id}:{attempt_count}",
        account=invoice.account,
        invoice=invoice,
    )

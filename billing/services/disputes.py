"""The dispute mirror: a charge that the cardholder's bank contests, shown to support.

``mirror_dispute`` locks the dispute's own row and nothing else. A dispute names its charge and
PaymentIntent, never a customer or an invoice, so there is no account to lock, and it writes no
invoice or payment row, so it needs no invoice key either. Its invoice and account are resolved
when they are read (``Dispute.objects.for_invoice`` / ``.for_account``): a payment or an
invoice that arrives after the dispute is found then, with nothing to re-link
(docs/decisions/0006-disputes.rst).

It changes no entitlement: what a lost dispute means for a customer is for people to decide.
https://docs.stripe.com/disputes/how-disputes-work
"""

from __future__ import annotations

from ..models import Dispute
from ..stripe_payloads import Event, read_dispute
from .locks import get_or_create_locked
from .snapshots import older_than_stored, save_snapshot


def lock_dispute(stripe_id: str, defaults: dict, *, reason: str) -> tuple[Dispute, bool]:
    """The dispute's row, locked until the transaction ends; created with ``defaults`` if never seen.

    A row comes last in the lock order (``billing.services.locks``), and a dispute takes no lock
    before it. Two first deliveries of one dispute both try the INSERT; the second waits for the
    first to commit, then finds and locks its row (``get_or_create_locked``).
    """
    return get_or_create_locked(Dispute, {"stripe_id": stripe_id}, defaults, reason=reason)


def mirror_dispute(event: Event) -> tuple[Dispute, bool]:
    """Mirror the dispute snapshot of ``event``; (row, whether the snapshot was applied).

    A snapshot older than the one stored is not written; on a tie the later delivery wins, as
    for every mirror (docs/decisions/0002-inbox-and-ordering.rst). History rows carry the event
    type as their reason.
    """
    snap = read_dispute(event.obj)
    values = {
        "charge_id": snap.charge_id,
        "payment_intent_id": snap.payment_intent_id,
        "amount": snap.amount,
        "currency": snap.currency,
        "reason": snap.reason,
        "status": snap.status,
        "evidence_due_by": snap.evidence_due_by,
        "is_charge_refundable": snap.is_charge_refundable,
        "stripe_created": snap.created,
        "livemode": event.livemode,
    }
    watermark = {"last_event_created": event.created, "last_event_id": event.id}
    dispute, created = lock_dispute(snap.stripe_id, {**values, **watermark}, reason=event.type)
    if created:
        return dispute, True
    if older_than_stored(dispute, event):
        return dispute, False
    save_snapshot(dispute, values, event)
    return dispute, True

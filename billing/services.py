"""Billing services: mirror Stripe objects, link invoices to renewals, grant paid periods.

Handlers (``billing.handlers``) call these inside the inbox's transaction. Each function
is written so that its end state depends on *what* has been delivered, not on the order:

* a mirrored row keeps the Stripe ``created`` of the event that last wrote it and ignores
  older snapshots (an invoice's status never moves backwards either);
* renewals and invoices are linked from both sides (when the invoice arrives, and when the
  renewal is created), by the one rule in ``billing.matching``;
* a paid period becomes an entitlement through a unique window, so once;
* the seats of a period come from the newest subscription snapshot *of that period*, even
  when that snapshot arrived after a newer one (it is read back from the inbox).

Locks are taken in one order: account, then subscription, then invoice, then renewals.
"""
from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import Q
from simple_history.utils import bulk_create_with_history

from provisioning import services as provisioning
from provisioning.models import Account, Entitlement

from . import matching
from .inbox import PrerequisiteMissing
from .models import Invoice, InvoiceLineItem, OwedEmail, Payment, Refund, Renewal, StripeEvent, Subscription
from .outbox import owe_email
from .stripe_payloads import (
    CustomerRef,
    Event,
    InvoiceSnapshot,
    read_charge,
    read_checkout_session,
    read_invoice,
    read_invoice_payment,
    read_refund,
    read_setup_intent,
    read_subscription,
)

logger = logging.getLogger(__name__)


def account_for(customer: CustomerRef) -> Account:
    return provisioning.lock_account_for_customer(customer.customer_id, name=customer.name, email=customer.email)


def _older_than_stored(row, event: Event) -> bool:
    return row.last_event_created is not None and event.created < row.last_event_created


def _save_changes(row, values: dict, event: Event, reason: str) -> bool:
    """Write ``values`` that differ, with the event's watermark; only the watermark if none do."""
    changed = [name for name, value in values.items() if getattr(row, name) != value]
    row.last_event_created, row.last_event_id = event.created, event.id
    if not changed:
        type(row).objects.filter(pk=row.pk).update(last_event_created=event.created, last_event_id=event.id)
        return False
    for name in changed:
        setattr(row, name, values[name])
    row._change_reason = reason
    row.save(update_fields=[*changed, "last_event_created", "last_event_id", "updated_at"])
    return True


# --- Subscriptions -------------------------------------------------------------------------


def mirror_subscription(event: Event) -> tuple[Subscription, bool]:
    """Mirror the subscription snapshot of ``event``; (row, whether the snapshot was applied)."""
    snap = read_subscription(event.obj)
    values = {
        "status": snap.status,
        "quantity": snap.quantity,
        "price_id": snap.price_id,
        "current_period_start": snap.current_period_start,
        "current_period_end": snap.current_period_end,
        "trial_start": snap.trial_start,
        "trial_end": snap.trial_end,
        "cancel_at_period_end": snap.cancel_at_period_end,
        "cancel_at": snap.cancel_at,
        "canceled_at": snap.canceled_at,
        "ended_at": snap.ended_at,
        "stripe_created": snap.created,
    }
    sub = _subscription_with_locked_account(snap.stripe_id, snap.customer.customer_id)
    if sub is not None:
        provisioning.learn_customer_details(sub.account, snap.customer.name, snap.customer.email)
    else:
        account = account_for(snap.customer)
        sub = Subscription.objects.filter(stripe_id=snap.stripe_id).first()
    if sub is None:
        sub = Subscription(stripe_id=snap.stripe_id, account=account, **values)
        sub.last_event_created, sub.last_event_id = event.created, event.id
        sub._change_reason = event.type
        sub.save()
        # Invoices that arrived before their subscription are attached now.
        Invoice.objects.filter(stripe_subscription_id=sub.stripe_id, subscription__isnull=True).update(
            subscription=sub
        )
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=True)
        sync_subscription(sub)
        return sub, True
    if _subscription_snapshot_is_stale(sub, event, snap.status):
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=False)
        return sub, False
    before = {name: getattr(sub, name) for name in _SYNC_INPUTS}
    _save_changes(sub, values, event, event.type)
    changed = {name for name in _SYNC_INPUTS if getattr(sub, name) != before[name]}
    # Entitlements only move when what they are derived from moved (the hot path skips both).
    if changed & {"quantity", "current_period_start"}:
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=True)
    if changed & {"trial_start", "trial_end", "ended_at"}:
        sync_subscription(sub)
    return sub, True


# The fields of a subscription that its entitlements and renewals are derived from.
_SYNC_INPUTS = ("quantity", "current_period_start", "trial_start", "trial_end", "ended_at")


def _subscription_with_locked_account(stripe_id: str, customer_id: str) -> Subscription | None:
    """A known subscription, its account locked, in one round trip (the hot path of updates).

    Every writer of a customer's rows locks the account first, so the account's lock is what
    serialises them; the subscription row itself needs no lock of its own.
    """
    try:
        return (
            Subscription.objects.select_related("account")
            .select_for_update(of=("account",))
            .get(stripe_id=stripe_id, account__stripe_customer_id=customer_id)
        )
    except Subscription.DoesNotExist:
        return None


def _subscription_snapshot_is_stale(sub: Subscription, event: Event, status: str) -> bool:
    if _older_than_stored(sub, event):
        return True
    # On a tie the later delivery wins, except that an ended subscription stays ended.
    return (
        event.created == sub.last_event_created
        and sub.status == Subscription.Status.CANCELED
        and status != Subscription.Status.CANCELED
    )


def period_quantity(stripe_subscription_id: str, period_start: datetime) -> int | None:
    """The quantity in the newest subscription snapshot whose current period starts at ``period_start``.

    Read back from the inbox, so a snapshot that lost the race for the mirror (it is older than
    the mirror's) still decides the seats of *its* period.
    """
    payloads = (
        StripeEvent.objects.filter(object_id=stripe_subscription_id, type__startswith="customer.subscription.")
        .exclude(status=StripeEvent.Status.IGNORED)
        .order_by("-created", "-received_at")
        .values_list("payload", flat=True)
    )
    for payload in payloads.iterator(chunk_size=50):
        snap = read_subscription(payload["data"]["object"])
        if snap.current_period_start == period_start:
            return snap.quantity
    return None


def _seats_for_period(sub: Subscription, period_start: datetime, fallback: int | None) -> int:
    if sub.current_period_start == period_start:
        return sub.quantity
    quantity = period_quantity(sub.stripe_id, period_start)
    if quantity is not None:
        return quantity
    return fallback if fallback is not None else sub.quantity


def _apply_period_seats(sub: Subscription, period_start: datetime | None, quantity: int, newest: bool) -> None:
    """A seat change: the entitlement of the snapshot's period follows its newest snapshot."""
    if period_start is None:
        return
    for entitlement in Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id, starts_at=period_start):
        seats = quantity if newest else _seats_for_period(sub, period_start, entitlement.seats)
        provisioning.update_entitlement(entitlement, seats=seats, reason="seat change")


def sync_subscription(sub: Subscription) -> None:
    """Bring renewals and entitlements in line with the mirrored subscription (idempotent)."""
    if sub.trial_start and sub.trial_end:
        provisioning.grant_entitlement(
            sub.account,
            kind=Entitlement.Kind.TRIAL,
            stripe_subscription_id=sub.stripe_id,
            starts_at=sub.trial_start,
            expires_at=sub.trial_end,
            seats=_seats_for_period(sub, sub.trial_start, sub.quantity),
        )
        if not sub.ended_at or sub.ended_at > sub.trial_end:
            ensure_renewal(sub, sub.trial_end)
    if sub.ended_at:
        _end_subscription(sub)


def _end_subscription(sub: Subscription) -> None:
    """Nothing is planned after the end; no window reaches past it."""
    Renewal.objects.filter(
        subscription=sub, processed_at__isnull=True, stripe_invoice_id__isnull=True, effective_date__gte=sub.ended_at
    ).delete()
    for entitlement in Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id, expires_at__gt=sub.ended_at):
        provisioning.update_entitlement(
            entitlement, expires_at=max(sub.ended_at, entitlement.starts_at), reason="subscription ended"
        )


# --- Renewals ------------------------------------------------------------------------------


def ensure_renewal(sub: Subscription, effective_date: datetime) -> Renewal:
    """The renewal of ``sub`` effective at ``effective_date`` (by the matching rule), created if absent."""
    candidates = Renewal.objects.filter(subscription=sub, effective_date__date=effective_date.date())
    renewal = matching.pick_by_instant(((r.effective_date, r) for r in candidates), effective_date)
    if renewal is not None:
        return renewal
    renewal, created = Renewal.objects.get_or_create(subscription=sub, effective_date=effective_date)
    if created:
        link_renewal_to_invoice(renewal)
    return renewal


def link_renewal_to_invoice(renewal: Renewal) -> None:
    """Link a new renewal to an invoice that arrived before it (same rule, seen from the renewal)."""
    linked = Renewal.objects.filter(subscription_id=renewal.subscription_id, stripe_invoice_id__isnull=False)
    invoices = Invoice.objects.filter(
        subscription_id=renewal.subscription_id, period_start__date=renewal.effective_date.date()
    ).exclude(stripe_id__in=linked.values("stripe_invoice_id"))
    invoice = matching.pick_by_instant(((i.period_start, i) for i in invoices), renewal.effective_date)
    if invoice is not None:
        renewal.stripe_invoice_id = invoice.stripe_id
        renewal._change_reason = f"linked to {invoice.stripe_id}"
        renewal.save(update_fields=["stripe_invoice_id", "updated_at"])


def link_invoice_to_renewal(invoice: Invoice) -> Renewal | None:
    """Link ``invoice`` to the renewal it pays for; the renewal (linked before or now), or None.

    A renewal already linked to another invoice keeps its link: the conflict is logged and
    that renewal is returned so the caller can decide (DESIGN: a linked renewal never changes).
    """
    if invoice.subscription_id is None or invoice.period_start is None:
        return None
    candidates = Renewal.objects.select_for_update().filter(
        Q(effective_date__date=invoice.period_start.date()) | Q(stripe_invoice_id=invoice.stripe_id),
        subscription_id=invoice.subscription_id,
    )
    decision = matching.decide_link(
        ((r.effective_date, r.stripe_invoice_id, r) for r in candidates),
        invoice.stripe_id,
        invoice.period_start,
        invoice_already_linked=False,
    )
    renewal = decision.renewal
    if decision.outcome == matching.Decision.LINK:
        renewal.stripe_invoice_id = invoice.stripe_id
        renewal._change_reason = f"linked to {invoice.stripe_id}"
        renewal.save(update_fields=["stripe_invoice_id", "updated_at"])
    elif decision.outcome == matching.Decision.CONFLICT:
        logger.warning(
            "renewal %s is linked to %s; ignoring conflicting invoice %s",
            renewal.pk,
            renewal.stripe_invoice_id,
            invoice.stripe_id,
        )
    return renewal


def _grant_paid_period(sub: Subscription, invoice: Invoice) -> Entitlement:
    """A ``paid`` entitlement for the invoice's service period, and the next renewal planned."""
    entitlement, _ = provisioning.grant_entitlement(
        sub.account,
        kind=Entitlement.Kind.PAID,
        stripe_subscription_id=sub.stripe_id,
        starts_at=invoice.period_start,
        expires_at=invoice.period_end,
        seats=_seats_for_period(sub, invoice.period_start, invoice.line_quantity),
        stripe_invoice_id=invoice.stripe_id,
    )
    if not sub.ended_at or sub.ended_at > invoice.period_end:
        ensure_renewal(sub, invoice.period_end)
    if sub.ended_at:
        _end_subscription(sub)
    _relink_renewal_entitlements(sub)
    return entitlement


def _relink_renewal_entitlements(sub: Subscription) -> None:
    """Each processed renewal moves from the window before it to the paid window it starts."""
    entitlements = list(Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id).order_by("starts_at"))
    for renewal in Renewal.objects.filter(subscription=sub, processed_at__isnull=False):
        before = [e for e in entitlements if e.starts_at < renewal.effective_date]
        from_id = before[-1].pk if before else None
        to_id = next(
            (e.pk for e in entitlements if e.kind == Entitlement.Kind.PAID and e.starts_at == renewal.effective_date),
            None,
        )
        if (renewal.from_entitlement_id, renewal.to_entitlement_id) != (from_id, to_id):
            renewal.from_entitlement_id, renewal.to_entitlement_id = from_id, to_id
            renewal.save(update_fields=["from_entitlement", "to_entitlement", "updated_at"])


def process_renewal(renewal: Renewal, invoice: Invoice) -> bool:
    """Grant the period ``invoice`` paid for through ``renewal``, exactly once."""
    renewal = Renewal.objects.select_for_update().get(pk=renewal.pk)
    if renewal.processed_at is not None:
        return False
    _grant_paid_period(renewal.subscription, invoice)
    renewal.processed_at = invoice.paid_at or invoice.last_event_created
    renewal._change_reason = f"processed by {invoice.stripe_id}"
    renewal.save(update_fields=["processed_at", "updated_at"])
    _relink_renewal_entitlements(renewal.subscription)
    return True


# --- Invoices ------------------------------------------------------------------------------

# Stripe's invoice statuses in the order they can be reached; paid and void are final.
# https://docs.stripe.com/invoicing/overview#invoice-statuses
_STATUS_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


def _status_moves_backwards(current: str, new: str) -> bool:
    if current == new:
        return False
    return _STATUS_RANK.get(new, 0) <= _STATUS_RANK.get(current, 0)


def mirror_invoice(event: Event) -> tuple[Invoice, bool]:
    """Mirror the invoice snapshot of ``event``; (row, whether the snapshot was applied)."""
    snap = read_invoice(event.obj)
    account = account_for(snap.customer)
    sub = Subscription.objects.filter(stripe_id=snap.subscription_id).first() if snap.subscription_id else None
    line = snap.subscription_line
    values = {
        "subscription": sub,
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
        "period_start": line.period_start if line else None,
        "period_end": line.period_end if line else None,
        "line_quantity": line.quantity if line else None,
        "paid_at": snap.paid_at or (event.created if snap.status == Invoice.Status.PAID else None),
        "stripe_created": snap.created,
    }
    invoice = Invoice.objects.select_for_update().filter(stripe_id=snap.stripe_id).first()
    if invoice is None:
        invoice = Invoice(stripe_id=snap.stripe_id, account=account, **values)
        invoice.last_event_created, invoice.last_event_id = event.created, event.id
        invoice._change_reason = event.type
        invoice.save()
        _write_lines(invoice, snap, replace=False)
        return invoice, True
    if _older_than_stored(invoice, event) or _status_moves_backwards(invoice.status, snap.status):
        return invoice, False
    if sub is None:
        values["subscription"] = invoice.subscription  # never forget a known subscription
    values["paid_at"] = values["paid_at"] or invoice.paid_at
    was_draft = invoice.status == Invoice.Status.DRAFT
    _save_changes(invoice, values, event, event.type)
    if was_draft:
        _write_lines(invoice, snap, replace=True)  # lines only change while the invoice is a draft
    return invoice, True


def _write_lines(invoice: Invoice, snap: InvoiceSnapshot, replace: bool) -> None:
    if replace:
        existing = {
            (line.stripe_id, line.amount, line.quantity, line.period_start, line.period_end)
            for line in invoice.lines.all()
        }
        wanted = {(line.stripe_id, line.amount, line.quantity, line.period_start, line.period_end) for line in snap.lines}
        if existing == wanted:
            return
        invoice.lines.all().delete()
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
    if rows:
        bulk_create_with_history(rows, InvoiceLineItem, batch_size=100, default_change_reason="invoice snapshot")


def _is_trial_invoice(sub: Subscription, invoice: Invoice) -> bool:
    return bool(sub.trial_end and invoice.period_end and invoice.period_end <= sub.trial_end)


def settle_paid_invoice(invoice: Invoice) -> None:
    """``invoice.paid``: grant what it paid for (once) and owe its receipt (once)."""
    if invoice.status != Invoice.Status.PAID:
        return  # a stale snapshot of an invoice whose payment we have not seen yet
    if invoice.subscription_id is None and invoice.stripe_subscription_id:
        raise PrerequisiteMissing(
            f"invoice {invoice.stripe_id} pays for subscription {invoice.stripe_subscription_id}, not known yet"
        )
    if invoice.subscription_id is not None and invoice.period_start and invoice.period_end:
        sub = Subscription.objects.select_for_update().get(pk=invoice.subscription_id)
        if _is_trial_invoice(sub, invoice):
            pass  # the trial's own $0 invoice: the trial entitlement already covers it
        elif invoice.billing_reason == "subscription_create":
            _grant_paid_period(sub, invoice)  # the first invoice has no renewal before it
        else:
            # A renewal created here is linked to this (already mirrored) invoice by ensure_renewal.
            renewal = link_invoice_to_renewal(invoice) or ensure_renewal(sub, invoice.period_start)
            process_renewal(renewal, invoice)
    if invoice.total > 0:
        owe_email(OwedEmail.Kind.RECEIPT, key=f"receipt:{invoice.stripe_id}", account=invoice.account, invoice=invoice)


def owe_payment_failed_email(invoice: Invoice, attempt_count: int) -> None:
    owe_email(
        OwedEmail.Kind.PAYMENT_FAILED,
        key=f"payment_failed:{invoice.stripe_id}:{attempt_count}",
        account=invoice.account,
        invoice=invoice,
    )


def owe_trial_will_end_email(sub: Subscription) -> None:
    if sub.trial_end is None:
        return
    owe_email(
        OwedEmail.Kind.TRIAL_WILL_END,
        key=f"trial_will_end:{sub.stripe_id}:{int(sub.trial_end.timestamp())}",
        account=sub.account,
        subscription=sub,
    )


# --- Accounts ------------------------------------------------------------------------------


def link_checkout_to_account(event: Event) -> None:
    """``checkout.session.completed``: the account named by ``client_reference_id`` is this customer's.

    If an account was already created for the customer (its events came first), it is merged
    into the named one. One account per customer, always.
    """
    snap = read_checkout_session(event.obj)
    if snap.mode != "subscription" or snap.customer is None or not snap.client_reference_id.isdigit():
        return
    target = Account.objects.select_for_update().filter(pk=int(snap.client_reference_id)).first()
    cid = snap.customer.customer_id
    if target is None:
        logger.warning("checkout %s names account %s, which does not exist", snap.stripe_id, snap.client_reference_id)
        return
    if target.stripe_customer_id == cid:
        return
    if target.stripe_customer_id:
        logger.warning(
            "checkout %s: account %s already belongs to another customer; not relinked", snap.stripe_id, target.pk
        )
        return
    source = Account.objects.select_for_update().filter(stripe_customer_id=cid).first()
    if source is not None:
        merge_accounts(source, target)
    target.stripe_customer_id = cid
    target.billing_email = target.billing_email or snap.customer.email
    target._change_reason = f"linked to {cid} by {snap.stripe_id}"
    target.save(update_fields=["stripe_customer_id", "billing_email", "updated_at"])


def merge_accounts(source: Account, target: Account) -> None:
    """Move everything of ``source`` to ``target`` and delete ``source`` (history records each move)."""
    reason = f"merged from account {source.pk} into {target.pk}"
    for row in [*Subscription.objects.filter(account=source), *Invoice.objects.filter(account=source)]:
        row.account = target
        row._change_reason = reason
        row.save(update_fields=["account", "updated_at"])
    OwedEmail.objects.filter(account=source).update(account=target)
    provisioning.move_account_rows(source, target)
    source._change_reason = reason
    source.delete()


def record_payment_method(event: Event) -> None:
    snap = read_setup_intent(event.obj)
    if not snap.customer_id or not snap.payment_method_id or snap.status != "succeeded":
        return
    account = provisioning.lock_account_for_customer(snap.customer_id)
    provisioning.set_payment_method(account, snap.payment_method_id, event.created)


# --- Payments and refunds ------------------------------------------------------------------


def record_invoice_payment(event: Event) -> None:
    """``invoice_payment.paid``: which PaymentIntent paid which invoice (basil and later)."""
    snap = read_invoice_payment(event.obj)
    if not snap.payment_intent_id:
        return
    payment = _payment_for(snap.payment_intent_id)
    if payment.stripe_invoice_id != snap.invoice_id:
        payment.stripe_invoice_id = snap.invoice_id
        payment.save(update_fields=["stripe_invoice_id", "updated_at"])
    recompute_refunded(payment)


def record_charge_refund(event: Event) -> None:
    """``charge.refunded``: the charge's cumulative refunded amount (it only grows)."""
    snap = read_charge(event.obj)
    payment = _payment_for(snap.payment_intent_id or f"charge:{snap.stripe_id}")
    fields = {"charge_id": snap.stripe_id, "currency": snap.currency}
    if snap.invoice_id:  # pre-basil charges still name their invoice
        fields["stripe_invoice_id"] = snap.invoice_id
    fields["charge_amount_refunded"] = max(payment.charge_amount_refunded, snap.amount_refunded)
    for name, value in fields.items():
        setattr(payment, name, value)
    payment.save()
    recompute_refunded(payment)


def record_refund(event: Event) -> None:
    """``refund.created`` / ``.updated`` / ``.failed``: mirror the refund, newest snapshot wins."""
    snap = read_refund(event.obj)
    refund = Refund.objects.select_for_update().filter(stripe_id=snap.stripe_id).first()
    if refund is not None and refund.last_event_created and event.created < refund.last_event_created:
        return
    refund = refund or Refund(stripe_id=snap.stripe_id)
    refund.payment_intent_id, refund.charge_id = snap.payment_intent_id, snap.charge_id
    refund.amount, refund.currency, refund.status = snap.amount, snap.currency, snap.status
    refund.last_event_created = event.created
    refund.save()
    key = snap.payment_intent_id or (f"charge:{snap.charge_id}" if snap.charge_id else "")
    if key:
        recompute_refunded(_payment_for(key))


def _payment_for(payment_intent_id: str) -> Payment:
    payment, _ = Payment.objects.select_for_update().get_or_create(payment_intent_id=payment_intent_id)
    return payment


_COUNTED_REFUND_STATUSES = ("succeeded", "pending", "requires_action")


def recompute_refunded(payment: Payment) -> None:
    """Attach the payment to its invoice when known, and recompute the invoice's refunded amount."""
    if payment.invoice_id is None and payment.stripe_invoice_id:
        invoice = Invoice.objects.filter(stripe_id=payment.stripe_invoice_id).first()
        if invoice is not None:
            payment.invoice = invoice
            payment.save(update_fields=["invoice", "updated_at"])
    if payment.invoice_id is None:
        # Kept until invoice_payment.paid or the invoice arrives; meanwhile ask Stripe (after commit).
        if not payment.stripe_invoice_id and not payment.payment_intent_id.startswith("charge:"):
            _ask_stripe_for_invoice(payment.payment_intent_id)
        return
    invoice = Invoice.objects.select_for_update().get(pk=payment.invoice_id)
    total = 0
    for each in invoice.payments.all():
        refunds = Refund.objects.filter(
            Q(payment_intent_id=each.payment_intent_id) | Q(charge_id=each.charge_id, charge_id__gt=""),
            status__in=_COUNTED_REFUND_STATUSES,
        )
        total += max(each.charge_amount_refunded, sum(r.amount for r in refunds))
    if invoice.amount_refunded != total:
        invoice.amount_refunded = total
        invoice._change_reason = "refund"
        invoice.save(update_fields=["amount_refunded", "updated_at"])


def _ask_stripe_for_invoice(payment_intent_id: str) -> None:
    from django.conf import settings
    from django.db import transaction

    if not settings.STRIPE_API_KEY:
        return
    from .tasks import resolve_payment_invoice

    transaction.on_commit(lambda: resolve_payment_invoice.delay(payment_intent_id), robust=True)


def attach_waiting_payments(invoice: Invoice) -> None:
    """Refunds that arrived before their invoice: attach them now."""
    for payment in Payment.objects.filter(stripe_invoice_id=invoice.stripe_id, invoice__isnull=True):
        recompute_refunded(payment)

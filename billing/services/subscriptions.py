"""The subscription mirror, and the entitlements and renewals derived from it.

* A snapshot older than the mirror is not written (``snapshots``); a canceled subscription
  stays canceled on a tie.
* A trial becomes a ``trial`` entitlement ending at ``trial_end`` and a renewal effective then.
* A seat change (``quantity``) changes the seats of the entitlement of that period. The seats of
  a period come from the newest snapshot *of that period*, even when that snapshot lost the
  race for the mirror to a newer one (``period_quantity`` reads it back from the inbox).
"""

from __future__ import annotations

from datetime import datetime

from provisioning import services as provisioning
from provisioning.models import ENTITLEMENT_WINDOW, Entitlement

from .. import sql
from ..models import Invoice, OwedEmail, Renewal, StripeEvent, Subscription
from ..outbox import owe_email
from ..stripe_payloads import Event, PayloadError, read_subscription
from . import renewals
from .locks import lock_account
from .snapshots import older_than_stored, save_changed, save_snapshot


def mirror_subscription(event: Event) -> tuple[Subscription, bool]:
    """Mirror the subscription snapshot of ``event``; (row, whether the snapshot was applied)."""
    snap = read_subscription(event.obj)
    account = lock_account(snap.customer)
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
        "livemode": event.livemode,
    }
    read = sql.subscription_read(snap.stripe_id, snap.current_period_start, snap.quantity)
    sub = read.subscription
    if sub is None:
        sub = Subscription(stripe_id=snap.stripe_id, account=account, **values)
        sub.last_event_created, sub.last_event_id = event.created, event.id
        sql.create_with_history(sub, reason=event.type)
        if read.invoices_waiting:
            _attach_waiting_invoices(sub)
        if read.seats_differ:
            _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=True)
        sync_subscription(sub)
        return sub, True
    if sub.account_id == account.pk:
        sub.account = account
    if _is_stale(sub, event, snap.status):
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=False)
        return sub, False
    changed = save_snapshot(sub, values, event)
    # Entitlements and renewals only move when what they are derived from moved.
    if changed & {"quantity", "current_period_start"} and read.seats_differ:
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=True)
    if changed & {"trial_start", "trial_end", "ended_at"}:
        sync_subscription(sub)
    return sub, True


def _is_stale(sub: Subscription, event: Event, status: str) -> bool:
    if older_than_stored(sub, event):
        return True
    # On a tie the later delivery wins, except that an ended subscription stays ended.
    return (
        event.created == sub.last_event_created
        and sub.status == Subscription.Status.CANCELED
        and status != Subscription.Status.CANCELED
    )


def _attach_waiting_invoices(sub: Subscription) -> None:
    """Invoices that arrived before their subscription are attached to it now."""
    for invoice in Invoice.objects.filter(stripe_subscription_id=sub.stripe_id, subscription__isnull=True):
        save_changed(invoice, {"subscription_id": sub.pk}, reason="its subscription arrived")


def sync_subscription(sub: Subscription) -> None:
    """Bring the trial's entitlement and renewal, and the end, in line with the mirror (idempotent)."""
    if sub.trial_start and sub.trial_end:
        grant_entitlement(
            sub,
            kind=Entitlement.Kind.TRIAL,
            starts_at=sub.trial_start,
            expires_at=sub.trial_end,
            seats=seats_for_period(sub, sub.trial_start, sub.quantity),
        )
        if not sub.ended_at or sub.ended_at > sub.trial_end:
            renewals.ensure_renewal(sub, sub.trial_end)
    if sub.ended_at:
        end_subscription(sub)


def end_subscription(sub: Subscription) -> None:
    """Nothing is planned after the end, and no entitlement reaches past it."""
    planned = Renewal.objects.filter(
        subscription=sub, processed_at__isnull=True, stripe_invoice_id__isnull=True, effective_date__gte=sub.ended_at
    )
    for renewal in planned:
        renewal._change_reason = "subscription ended"
        renewal.delete()
    for entitlement in Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id, expires_at__gt=sub.ended_at):
        provisioning.update_entitlement(
            entitlement, expires_at=max(entitlement.starts_at, sub.ended_at), reason="subscription ended"
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
    for payload in payloads:
        try:
            snap = read_subscription(payload["data"]["object"])
        except PayloadError:
            continue  # a snapshot of the wrong shape (its event failed): it decides nothing
        if snap.current_period_start == period_start:
            return snap.quantity
    return None


def grant_entitlement(
    sub: Subscription, *, kind: str, starts_at: datetime, expires_at: datetime, seats: int, stripe_invoice_id: str = ""
) -> bool:
    """The subscription's entitlement for one window (trial or paid period), granted once.

    Provisioning says what it holds; it is stored with its history row in one statement, unless
    the window has one already (``ON CONFLICT DO NOTHING`` on ``uniq_entitlement_window``): then
    nothing changes and this returns False (``sync_subscription`` grants the trial's window
    again on every snapshot). The caller holds the account's lock.
    """
    entitlement = provisioning.entitlement_for_window(
        sub.account_id,
        kind=kind,
        stripe_subscription_id=sub.stripe_id,
        starts_at=starts_at,
        expires_at=expires_at,
        seats=seats,
        stripe_invoice_id=stripe_invoice_id,
    )
    return sql.create_with_history(entitlement, reason=None, unless_exists=ENTITLEMENT_WINDOW)


def seats_for_period(sub: Subscription, period_start: datetime, fallback: int | None) -> int:
    """The seats of the period starting at ``period_start``: the mirror's, or its own snapshot's."""
    if sub.current_period_start == period_start:
        return sub.quantity
    quantity = period_quantity(sub.stripe_id, period_start)
    if quantity is not None:
        return quantity
    return fallback if fallback is not None else sub.quantity


def _apply_period_seats(sub: Subscription, period_start: datetime | None, quantity: int, newest: bool) -> None:
    """A seat change: the entitlement of the snapshot's period follows its newest snapshot.

    ``newest``: the snapshot is the mirror's own, so its quantity is the period's; otherwise the
    period's newest snapshot is looked up (``seats_for_period``).
    """
    if period_start is None:
        return
    windows = Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id, starts_at=period_start)
    if newest:
        windows = windows.exclude(seats=quantity)
    for entitlement in windows:
        seats = quantity if newest else seats_for_period(sub, period_start, entitlement.seats)
        provisioning.update_entitlement(entitlement, seats=seats, reason="seat change")


def owe_trial_will_end_email(sub: Subscription) -> None:
    if sub.trial_end is None:
        return
    owe_email(
        OwedEmail.Kind.TRIAL_WILL_END,
        key=f"trial_will_end:{sub.stripe_id}:{int(sub.trial_end.timestamp())}",
        account=sub.account,
        subscription=sub,
    )

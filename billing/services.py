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

Locks are taken in one order: account, then subscription, then invoice, then renewals. Every
writer of a customer's subscriptions, invoices and renewals holds its account's lock, which is
what serialises them.

Reads and writes go through ``billing.sql`` (hand-written statements, history rows written in
the same statement) rather than the ORM: this is the webhook's hot path, and the ORM's
per-statement cost was most of what a webhook cost (docs/decisions/0005-webhook-hot-path-sql.rst).
The rare paths (checkout linking and account merges) keep the ORM.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from provisioning import services as provisioning
from provisioning.models import Account, Entitlement

from . import matching, sql
from .inbox import PrerequisiteMissing, holds_account_lock, holds_key_lock, locked_account, take_first_read
from .models import Invoice, InvoiceLineItem, OwedEmail, Payment, Refund, Renewal, StripeEvent, Subscription
from .outbox import owe_email
from .stripe_payloads import (
    CustomerRef,
    Event,
    InvoiceSnapshot,
    PayloadError,
    read_charge,
    read_checkout_session,
    read_invoice,
    read_invoice_payment,
    read_refund,
    read_setup_intent,
    read_subscription,
)

logger = logging.getLogger(__name__)


def _t(model) -> sql.Table:
    return sql.table(model)


def account_for(customer: CustomerRef) -> Account:
    account = locked_account(customer.customer_id)
    if account is not None:  # locked by the inbox with the event's INSERT: read as it is now
        provisioning.learn_customer_details(account, customer.name, customer.email)
        return account
    return provisioning.lock_account_for_customer(customer.customer_id, name=customer.name, email=customer.email)


def _older_than_stored(row, event: Event) -> bool:
    return row.last_event_created is not None and event.created < row.last_event_created


def _save_changes(row, values: dict, event: Event, reason: str, then: sql.Expr | None = None) -> Any:
    """Write ``values`` that differ, with the event's watermark; only the watermark if none do.

    A snapshot that changes nothing moves only the watermark, without a history row: history
    records changes, and a renewal's unchanged snapshots would otherwise fill it. The value of
    ``then`` (``sql.Table.update``) if anything changed, else None.
    """
    table = _t(type(row))
    changed = {name: value for name, value in values.items() if getattr(row, name) != value}
    watermark = {"last_event_created": event.created, "last_event_id": event.id}
    if not changed:
        sql.execute(
            f"UPDATE {table} SET last_event_created = %s, last_event_id = %s WHERE {table.pk_column} = %s",
            [event.created, event.id, row.pk],
        )
        row.last_event_created, row.last_event_id = event.created, event.id
        return None
    return table.update(row, {**changed, **watermark}, reason=reason, then=then)


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
    sub = _subscription_with_locked_account(snap.stripe_id, snap.customer.customer_id, snap)
    if sub is not None:
        provisioning.learn_customer_details(sub.account, snap.customer.name, snap.customer.email)
    else:
        account = account_for(snap.customer)
        sub = _t(Subscription).get("stripe_id = %s", [snap.stripe_id])
        if sub is not None and sub.account_id == account.pk:
            sql.attach(sub, "account", account)
    if sub is None:
        sub = _t(Subscription).insert(
            {
                "stripe_id": snap.stripe_id,
                "account_id": account.pk,
                **values,
                "last_event_created": event.created,
                "last_event_id": event.id,
            },
            reason=event.type,
        )
        sql.attach(sub, "account", account)
        # Invoices that arrived before their subscription are attached now.
        _t(Invoice).update_where(
            {"subscription_id": sub.pk},
            "stripe_subscription_id = %s AND subscription_id IS NULL",
            [sub.stripe_id],
            reason="its subscription arrived",
        )
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=True)
        sync_subscription(sub)
        return sub, True
    if _subscription_snapshot_is_stale(sub, event, snap.status):
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=False)
        return sub, False
    before = {name: getattr(sub, name) for name in _SYNC_INPUTS}
    seats = getattr(sub, "_seats_differ", True)
    ask = seats is None and snap.current_period_start is not None and (
        sub.quantity != snap.quantity or sub.current_period_start != snap.current_period_start)
    asked = _save_changes(sub, values, event, event.type,
                          then=_seats_differ_sql(sub.stripe_id, snap) if ask else None)
    if ask:
        seats = bool(asked)
    changed = {name for name in _SYNC_INPUTS if getattr(sub, name) != before[name]}
    # Entitlements only move when what they are derived from moved (the hot path skips both).
    if changed & {"quantity", "current_period_start"} and seats is not False:
        _apply_period_seats(sub, snap.current_period_start, snap.quantity, newest=True)
    if changed & {"trial_start", "trial_end", "ended_at"}:
        sync_subscription(sub)
    return sub, True


# The fields of a subscription that its entitlements and renewals are derived from.
_SYNC_INPUTS = ("quantity", "current_period_start", "trial_start", "trial_end", "ended_at")


def _lock_account(customer_id: str) -> None:
    """Take the lock every writer of a customer's rows takes first: its account's row.

    A statement of its own, sent before the reads that follow: a statement reads rows as they
    were when it started, so a read that waited for the lock in the same statement would see
    them as they were *before* the writer it waited for committed.

    Free when the inbox took it already, in the statement that stored the event
    (``billing.inbox.holds_account_lock``).
    """
    if holds_account_lock(customer_id):
        return
    sql.execute(f"SELECT 1 FROM {_t(Account)} WHERE stripe_customer_id = %s{sql.for_update()}", [customer_id])


def invoice_lock_key(stripe_invoice_id: str) -> str:
    """The advisory lock that orders an invoice's writers with the writers of its payments.

    Payment writers take no account lock (an ``invoice_payment`` names no customer), so without
    it a payment and the invoice it pays, committed at the same instant, can each miss the
    other's row: the payment left unattached, its refunds never counted. The invoice handlers
    take this lock first (``handles(locks_key_of=...)``, before the account's); the payment's
    INSERT takes it before it looks for the invoice, and looks again if it waited.
    """
    return f"billing.invoice:{stripe_invoice_id}"


def lock_invoice(stripe_invoice_id: str) -> None:
    """Take ``invoice_lock_key`` unless the inbox took it already (PostgreSQL; SQLite has one writer)."""
    key = invoice_lock_key(stripe_invoice_id)
    if not sql.is_postgresql() or holds_key_lock(key):
        return
    sql.execute(f"SELECT {sql.ADVISORY_LOCK}", [key])


def subscription_first_read(event: Event) -> tuple[str, list] | None:
    """The subscription handlers' first read, sent by the inbox with the account's lock.

    The subscription row, locked after the account (``registry.handles(reads_first=...)``): a
    row lock returns the newest version of the row, even when the statement waited for the
    account's lock while another delivery changed the subscription.
    """
    stripe_id = event.obj.get("id")
    if not isinstance(stripe_id, str) or not stripe_id:
        return None
    subs = _t(Subscription)
    return (
        f"SELECT {subs.cols('s')} FROM {subs} s"
        f" WHERE s.stripe_id = %s AND s.account_id = (SELECT id FROM locked) FOR UPDATE",
        [stripe_id],
    )


def _seats_differ_sql(stripe_subscription_id: str, snap) -> sql.Expr:
    """True if an entitlement of the snapshot's period has other seats than its quantity."""
    return sql.Expr(
        f"EXISTS (SELECT 1 FROM {_t(Entitlement)} e WHERE e.stripe_subscription_id = %s"
        f" AND e.starts_at = %s AND e.seats <> %s)",
        [stripe_subscription_id, snap.current_period_start, snap.quantity],
    )


def _subscription_with_locked_account(stripe_id: str, customer_id: str, snap=None) -> Subscription | None:
    """A known subscription, its account locked, in one round trip (the hot path of updates).

    Every writer of a customer's rows locks the account first, so the account's lock is what
    serialises them; the subscription row itself needs no lock of its own. With ``snap``, the
    same round trip also answers whether an entitlement of the snapshot's period has other
    seats than the snapshot's quantity (``sub._seats_differ``; None if not asked): only then
    is a seat change written.

    The lock goes first, alone (``_lock_account``): read with it, an older snapshot could win.
    When the inbox sent the lock with the event's INSERT, it sent this read too (locking the
    subscription row, so that it is read as it is now): no round trip at all.
    """
    subs, accounts = _t(Subscription), _t(Account)
    first = take_first_read(customer_id)
    if first is not None:
        account, row = first
        if row[subs.attnames.index("id")] is None:
            return None
        sub = subs.load(row)
        sql.attach(sub, "account", account)
        sub._seats_differ = None  # asked in the statement that writes the subscription
        return sub
    _lock_account(customer_id)
    seats_differ, params = "NULL", []
    if snap is not None and snap.current_period_start is not None:
        seats = _seats_differ_sql(stripe_id, snap)
        seats_differ, params = seats.sql, seats.params
    row = sql.one(
        f"SELECT {subs.cols('s')}, {accounts.cols('a')}, {seats_differ} FROM {subs} s"
        f" JOIN {accounts} a ON a.id = s.account_id"
        f" WHERE s.stripe_id = %s AND a.stripe_customer_id = %s",
        [*params, stripe_id, customer_id],
    )
    if row is None:
        return None
    sub = subs.load(row)
    sql.attach(sub, "account", accounts.load(row, subs.width))
    sub._seats_differ = row[-1] is None or bool(row[-1])
    return sub


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
    events = _t(StripeEvent)
    found = sql.rows(
        f"SELECT payload FROM {events} WHERE object_id = %s AND type LIKE %s AND status <> %s"
        f" ORDER BY created DESC, received_at DESC",
        [stripe_subscription_id, "customer.subscription.%", StripeEvent.Status.IGNORED],
    )
    for (payload,) in found:
        if isinstance(payload, (str, bytes)):
            payload = json.loads(payload)
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
    entitlements = _t(Entitlement)
    if newest:
        entitlements.update_where(
            {"seats": quantity},
            "stripe_subscription_id = %s AND starts_at = %s AND seats <> %s",
            [sub.stripe_id, period_start, quantity],
            reason="seat change",
        )
        return
    for entitlement in entitlements.filter("stripe_subscription_id = %s AND starts_at = %s", [sub.stripe_id, period_start]):
        seats = _seats_for_period(sub, period_start, entitlement.seats)
        provisioning.update_entitlement(entitlement, seats=seats, reason="seat change")


def sync_subscription(sub: Subscription) -> None:
    """Bring renewals and entitlements in line with the mirrored subscription (idempotent)."""
    if sub.trial_start and sub.trial_end:
        provisioning.grant_entitlement(
            sub.account_id,
            kind=Entitlement.Kind.TRIAL,
            stripe_subscription_id=sub.stripe_id,
            starts_at=sub.trial_start,
            expires_at=sub.trial_end,
            seats=_seats_for_period(sub, sub.trial_start, sub.quantity),
        )
        if not sub.ended_at or sub.ended_at > sub.trial_end:
            ensure_renewal(sub, sub.trial_end, need_row=False)
    if sub.ended_at:
        _end_subscription(sub)


def _end_subscription(sub: Subscription) -> None:
    """Nothing is planned after the end; no window reaches past it."""
    _t(Renewal).delete_where(
        "subscription_id = %s AND processed_at IS NULL AND stripe_invoice_id IS NULL AND effective_date >= %s",
        [sub.pk, sub.ended_at],
        reason="subscription ended",
    )
    _t(Entitlement).update_where(
        {"expires_at": sql.Expr("CASE WHEN starts_at > %s THEN starts_at ELSE %s END", [sub.ended_at, sub.ended_at])},
        "stripe_subscription_id = %s AND expires_at > %s",
        [sub.stripe_id, sub.ended_at],
        reason="subscription ended",
    )


# --- Renewals ------------------------------------------------------------------------------


def ensure_renewal(sub: Subscription, effective_date: datetime, *, need_row: bool = True) -> Renewal | None:
    """The renewal of ``sub`` effective at ``effective_date`` (by the matching rule), created if absent.

    One read answers both "is there such a renewal?" and "is there an unlinked invoice of that
    day it could be linked to?". A renewal planned ahead (``need_row=False``: the caller does
    not use the result) is inserted by a statement that asks both questions itself
    (``Table.insert_where``): one round trip where there were two, and only when an invoice of
    that day is waiting does it take the way that links them.
    """
    renewals, invoices = _t(Renewal), _t(Invoice)
    start, end = sql.utc_day(effective_date)
    values = {"subscription_id": sub.pk, "effective_date": effective_date}
    conflict = ["subscription_id", "effective_date"]
    if not need_row:
        # The common case in one statement: inserted unless a renewal of that day exists or an
        # invoice of that day waits for one (then the full way below, which links it).
        same_day = sql.Expr(
            f"EXISTS (SELECT 1 FROM {renewals} r WHERE r.subscription_id = %s AND r.effective_date >= %s"
            f" AND r.effective_date < %s)", [sub.pk, start, end])
        waiting = sql.Expr(f"EXISTS (SELECT 1 FROM {invoices} i WHERE {_unlinked_invoices_of_the_day('i')})",
                           [sub.pk, start, end])
        found = renewals.insert_where(
            values,
            sql.Expr(f"NOT {same_day.sql} AND NOT {waiting.sql}", [*same_day.params, *waiting.params]),
            then=sql.Expr(f"CASE WHEN {same_day.sql} THEN 1 WHEN {waiting.sql} THEN 2 ELSE 0 END",
                          [*same_day.params, *waiting.params]),
            on_conflict=conflict,
        )
        if found != 2:
            return None  # planned now, or planned already
    found = sql.rows(
        f"SELECT {renewals.cols('r')}, x.invoice_waiting FROM (SELECT EXISTS (SELECT 1 FROM {invoices} i"
        f" WHERE {_unlinked_invoices_of_the_day('i')}) AS invoice_waiting) AS x"
        f" LEFT JOIN {renewals} r ON r.subscription_id = %s AND r.effective_date >= %s AND r.effective_date < %s",
        [sub.pk, start, end, sub.pk, start, end],
    )
    pk_index = renewals.attnames.index("id")
    candidates = [renewals.load(row) for row in found if row[pk_index] is not None]
    renewal = matching.pick_by_instant(((r.effective_date, r) for r in candidates), effective_date)
    if renewal is not None:
        return renewal
    invoice_waiting = bool(found[0][-1])
    renewal = renewals.insert(values, on_conflict=conflict)
    if renewal is None:  # created meanwhile by a writer that did not hold the account's lock
        return renewals.get("subscription_id = %s AND effective_date = %s", [sub.pk, effective_date])
    if invoice_waiting:
        link_renewal_to_invoice(renewal)
    return renewal


def _unlinked_invoices_of_the_day(alias: str) -> str:
    """Invoices of a subscription whose service period starts on a UTC day, linked to no renewal.

    Parameters: the subscription's id, the day's start and end.
    """
    renewals = _t(Renewal)
    return (
        f"{alias}.subscription_id = %s AND {alias}.period_start >= %s AND {alias}.period_start < %s AND NOT EXISTS"
        f" (SELECT 1 FROM {renewals} lr WHERE lr.subscription_id = {alias}.subscription_id"
        f" AND lr.stripe_invoice_id = {alias}.stripe_id)"
    )


def link_renewal_to_invoice(renewal: Renewal) -> None:
    """Link a new renewal to an invoice that arrived before it (same rule, seen from the renewal)."""
    invoices, renewals = _t(Invoice), _t(Renewal)
    start, end = sql.utc_day(renewal.effective_date)
    candidates = invoices.filter(_unlinked_invoices_of_the_day(str(invoices)), [renewal.subscription_id, start, end])
    invoice = matching.pick_by_instant(((i.period_start, i) for i in candidates), renewal.effective_date)
    if invoice is not None:
        renewals.update(renewal, {"stripe_invoice_id": invoice.stripe_id}, reason=f"linked to {invoice.stripe_id}")


def link_invoice_to_renewal(invoice: Invoice) -> Renewal | None:
    """Link ``invoice`` to the renewal it pays for; the renewal (linked before or now), or None.

    A renewal already linked to another invoice keeps its link: the conflict is logged and
    that renewal is returned so the caller can decide (DESIGN: a linked renewal never changes).
    """
    if invoice.subscription_id is None or invoice.period_start is None:
        return None
    linked = getattr(invoice, "_linked_renewal", None)
    if linked is not None and linked.subscription_id == invoice.subscription_id:
        return linked  # read (locked) with the invoice: what the candidates below would find first
    renewals = _t(Renewal)
    exact = getattr(invoice, "_exact_renewal", None)
    if exact is not None and exact.subscription_id == invoice.subscription_id and exact.effective_date == invoice.period_start:
        # Read (locked) with the invoice. No renewal is linked to the invoice (that read found
        # none), and the exact instant beats every same-day candidate: the decision is this one's.
        candidates = [exact]
    else:
        start, end = sql.utc_day(invoice.period_start)
        candidates = renewals.filter(
            "subscription_id = %s AND ((effective_date >= %s AND effective_date < %s) OR stripe_invoice_id = %s)",
            [invoice.subscription_id, start, end, invoice.stripe_id],
            lock=True,
        )
    decision = matching.decide_link(
        ((r.effective_date, r.stripe_invoice_id, r) for r in candidates),
        invoice.stripe_id,
        invoice.period_start,
        invoice_already_linked=False,
    )
    renewal = decision.renewal
    if decision.outcome == matching.Decision.LINK:
        renewals.update(renewal, {"stripe_invoice_id": invoice.stripe_id}, reason=f"linked to {invoice.stripe_id}")
    elif decision.outcome == matching.Decision.CONFLICT:
        logger.warning(
            "renewal %s is linked to %s; ignoring conflicting invoice %s",
            renewal.pk,
            renewal.stripe_invoice_id,
            invoice.stripe_id,
        )
    return renewal


def _grant_paid_period(sub: Subscription, invoice: Invoice) -> None:
    """A ``paid`` entitlement for the invoice's service period, and the next renewal planned.

    The caller relinks the renewals' entitlements once it has made all its changes.
    """
    provisioning.grant_entitlement(
        sub.account_id,
        kind=Entitlement.Kind.PAID,
        stripe_subscription_id=sub.stripe_id,
        starts_at=invoice.period_start,
        expires_at=invoice.period_end,
        seats=_seats_for_period(sub, invoice.period_start, invoice.line_quantity),
        stripe_invoice_id=invoice.stripe_id,
    )
    if not sub.ended_at or sub.ended_at > invoice.period_end:
        ensure_renewal(sub, invoice.period_end, need_row=False)
    if sub.ended_at:
        _end_subscription(sub)


def _relink_renewal_entitlements(sub: Subscription, processing: tuple[Renewal, datetime, str] | None = None) -> None:
    """Each processed renewal moves from the window before it to the paid window it starts.

    "The window before it": the subscription's entitlement that starts last before the
    renewal's date (the later-created on a tie); "the paid window it starts": the first paid
    entitlement starting at that date. One UPDATE, nothing read back; only renewals whose
    links change are written (and get a history row).

    ``processing`` (renewal, processed_at, reason): the same UPDATE marks that renewal
    processed, with its reason in its history row; one statement where there were two.
    """
    renewals, entitlements = _t(Renewal), _t(Entitlement)
    from_sql = (
        f"(SELECT e.id FROM {entitlements} e WHERE e.stripe_subscription_id = %s"
        f" AND e.starts_at < {renewals}.effective_date ORDER BY e.starts_at DESC, e.id DESC LIMIT 1)"
    )
    to_sql = (
        f"(SELECT e.id FROM {entitlements} e WHERE e.stripe_subscription_id = %s AND e.kind = %s"
        f" AND e.starts_at = {renewals}.effective_date ORDER BY e.id LIMIT 1)"
    )
    from_params, to_params = [sub.stripe_id], [sub.stripe_id, Entitlement.Kind.PAID]
    values = {"from_entitlement_id": sql.Expr(from_sql, from_params), "to_entitlement_id": sql.Expr(to_sql, to_params)}
    relinked = (f"processed_at IS NOT NULL AND (COALESCE(from_entitlement_id, 0) <> COALESCE({from_sql}, 0)"
                f" OR COALESCE(to_entitlement_id, 0) <> COALESCE({to_sql}, 0))")
    if processing is None:
        renewals.update_where(values, f"subscription_id = %s AND {relinked}", [sub.pk, *from_params, *to_params])
        return
    renewal, processed_at, reason = processing
    pk = renewals.pk_column
    values["processed_at"] = sql.Expr(f"CASE WHEN {pk} = %s THEN %s ELSE processed_at END", [renewal.pk, processed_at])
    renewals.update_where(
        values,
        f"subscription_id = %s AND ({pk} = %s OR {relinked})",
        [sub.pk, renewal.pk, *from_params, *to_params],
        reason=sql.Expr(f"CASE WHEN {pk} = %s THEN %s END", [renewal.pk, reason]),
    )


def process_renewal(renewal: Renewal, invoice: Invoice, sub: Subscription) -> bool:
    """Grant the period ``invoice`` paid for through ``renewal``, exactly once.

    ``renewal`` was read under the account's lock, which every writer of ``processed_at``
    holds: what it says is current.
    """
    if renewal.processed_at is not None:
        return False
    _grant_paid_period(sub, invoice)
    processed_at = invoice.paid_at or invoice.last_event_created
    _relink_renewal_entitlements(sub, processing=(renewal, processed_at, f"processed by {invoice.stripe_id}"))
    renewal.processed_at = processed_at
    return True


# --- Invoices ------------------------------------------------------------------------------

# Stripe's invoice statuses in the order they can be reached; paid and void are final.
# https://docs.stripe.com/invoicing/overview#invoice-statuses
_STATUS_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


def _status_moves_backwards(current: str, new: str) -> bool:
    if current == new:
        return False
    return _STATUS_RANK.get(new, 0) <= _STATUS_RANK.get(current, 0)


def _invoice_and_subscription_id(stripe_id: str, subscription_stripe_id: str) -> tuple[Invoice | None, int | None]:
    """The mirrored invoice (if any) and the id of the subscription it names (if mirrored), at once."""
    invoices, subs = _t(Invoice), _t(Subscription)
    row = sql.one(
        f"SELECT (SELECT s.id FROM {subs} s WHERE s.stripe_id = %s), {invoices.cols('i')}"
        f" FROM (SELECT 1 AS one) AS x LEFT JOIN {invoices} i ON i.stripe_id = %s",
        [subscription_stripe_id, stripe_id],
    )
    pk_index = 1 + invoices.attnames.index("id")
    invoice = invoices.load(row, 1) if row[pk_index] is not None else None
    return invoice, row[0]


def _invoice_read(snap: InvoiceSnapshot, whole_subscription: bool) -> tuple[str, list]:
    """The read of an invoice handler: whether refunds wait for the invoice, its subscription
    (the whole row, locked, with ``whole_subscription``; else its id), the invoice (locked), the
    renewal already linked to it (locked; links never change, so one found is current) and the
    renewal effective at the exact start of its period (locked; by the matching rule it wins
    over any other candidate, and there is at most one).

    One row, whatever exists, in portable SQL (SQLite runs it too: no LATERAL, so each renewal's
    subquery names the subscription again). The rows it reads are locked because it is also
    sent by the inbox before the account's lock is granted (``invoice_first_read``): a row lock
    returns a row's newest version. A row missing from that early read is looked for again later.
    """
    invoices, subs, renewals = _t(Invoice), _t(Subscription), _t(Renewal)
    line = snap.subscription_line
    lock = sql.for_update()
    sub_cols = subs.cols("s") if whole_subscription else "s.id"
    sub_id = f"(SELECT id FROM {subs} WHERE stripe_id = %s)"
    waiting = _payments_waiting_for(snap.stripe_id)
    return (
        f"SELECT {waiting.sql}, {sub_cols}, {invoices.cols('i')}, {renewals.cols('r')}, {renewals.cols('e')}"
        f" FROM (SELECT 1 AS one) AS x"
        f" LEFT JOIN (SELECT {sub_cols} FROM {subs} s WHERE s.stripe_id = %s{lock if whole_subscription else ''}) s"
        f" ON true"
        f" LEFT JOIN (SELECT {invoices.cols('i')} FROM {invoices} i WHERE i.stripe_id = %s{lock}) i ON true"
        f" LEFT JOIN (SELECT {renewals.cols('r')} FROM {renewals} r"
        f" WHERE r.stripe_invoice_id = %s AND r.subscription_id = {sub_id}{lock}) r ON true"
        f" LEFT JOIN (SELECT {renewals.cols('e')} FROM {renewals} e"
        f" WHERE e.effective_date = %s AND e.subscription_id = {sub_id}{lock}) e ON true",
        [*waiting.params, snap.subscription_id, snap.stripe_id, snap.stripe_id, snap.subscription_id,
         line.period_start if line else None, snap.subscription_id],
    )


def _payments_waiting_for(stripe_invoice_id: str) -> sql.Expr:
    """Whether a payment names this invoice and is not attached to it yet (``attach_waiting_payments``)."""
    return sql.Expr(
        f"EXISTS (SELECT 1 FROM {_t(Payment)} p WHERE p.stripe_invoice_id = %s AND p.invoice_id IS NULL)",
        [stripe_invoice_id],
    )


def invoice_first_read(event: Event) -> tuple[str, list] | None:
    """The invoice handlers' first read, sent by the inbox with the account's lock."""
    try:
        snap = read_invoice(event.obj)
    except PayloadError:
        return None  # the handler reports it
    return _invoice_read(snap, whole_subscription=event.type == "invoice.paid")


def _invoice_with_locked_account(snap: InvoiceSnapshot, whole_subscription: bool):
    """Lock the customer's account, then read it, the invoice, its subscription and whether
    refunds wait for the invoice, in one statement after the lock's.

    (account or None if never seen, invoice or None, subscription id or None, subscription
    row or None, payments waiting, (linked renewal, exact renewal) as ``_remember`` takes them).
    The subscription row only with ``whole_subscription``.
    When the inbox sent the lock with the event's INSERT, it sent this read too
    (``invoice_first_read``): no round trip at all.
    """
    accounts, invoices, subs = _t(Account), _t(Invoice), _t(Subscription)
    first = take_first_read(snap.customer.customer_id)
    if first is not None:
        account, row = first
    else:
        lock_invoice(snap.stripe_id)  # before the account's, as the inbox takes it
        _lock_account(snap.customer.customer_id)
        read, params = _invoice_read(snap, whole_subscription)
        row = sql.one(
            f"SELECT r.*, {accounts.cols('a')} FROM ({read}) AS r"
            f" LEFT JOIN {accounts} a ON a.stripe_customer_id = %s",
            [*params, snap.customer.customer_id],
        )
        account = None
    offset = 1
    sub_id = row[offset + (subs.attnames.index("id") if whole_subscription else 0)]
    sub = subs.load(row, offset) if whole_subscription and sub_id is not None else None
    offset += subs.width if whole_subscription else 1
    invoice = invoices.load(row, offset) if row[offset + invoices.attnames.index("id")] is not None else None
    offset += invoices.width
    renewals = _t(Renewal)
    linked = renewals.load(row, offset) if row[offset + renewals.attnames.index("id")] is not None else None
    offset += renewals.width
    exact = renewals.load(row, offset) if row[offset + renewals.attnames.index("id")] is not None else None
    offset += renewals.width
    if first is None and row[offset + accounts.attnames.index("id")] is not None:
        account = accounts.load(row, offset)
    if first is not None and sub_id is None and snap.subscription_id:
        # Not there when the early read began; it may have been mirrored while it waited.
        invoice, sub_id = _invoice_and_subscription_id(snap.stripe_id, snap.subscription_id)  # no link read
        if whole_subscription and sub_id is not None:
            sub = _t(Subscription).get("id = %s", [sub_id])
    return account, invoice, sub_id, sub, bool(row[0]), (linked, exact)


def mirror_invoice(event: Event, *, whole_subscription: bool = False) -> tuple[Invoice, bool]:
    """Mirror the invoice snapshot of ``event``; (row, whether the snapshot was applied).

    With ``whole_subscription``, the invoice's subscription (if mirrored) comes cached on it
    (``invoice.subscription``), read in the same round trip.
    """
    snap = read_invoice(event.obj)
    account, invoice, sub_id, sub, payments_waiting, renewals = _invoice_with_locked_account(snap, whole_subscription)
    if account is None:  # a customer never seen: create its account, then read again under its lock
        account = account_for(snap.customer)
        invoice, sub_id = _invoice_and_subscription_id(snap.stripe_id, snap.subscription_id)
        sub, payments_waiting, renewals = None, True, (None, None)
    else:
        provisioning.learn_customer_details(account, snap.customer.name, snap.customer.email)
    line = snap.subscription_line
    values = {
        "subscription_id": sub_id,
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
    if invoice is None:
        # Whether payments wait for the invoice is asked again by the INSERT: the first read may
        # be older than the account's lock (the inbox sends it before the lock is granted), and a
        # payment recorded meanwhile found no invoice to attach to. Payment writers take no
        # account lock; this statement sees every payment committed before it began.
        invoice, waiting_now = _t(Invoice).insert_then(
            {
                "stripe_id": snap.stripe_id,
                "account_id": account.pk,
                **values,
                "last_event_created": event.created,
                "last_event_id": event.id,
            },
            _payments_waiting_for(snap.stripe_id),
            reason=event.type,
            on_conflict=["stripe_id"],
        )
        if invoice is not None:
            sql.attach(invoice, "account", account)
            _remember(invoice, sub, bool(waiting_now), renewals)
            _write_lines(invoice, snap, replace=False)
            return invoice, True
        # Mirrored meanwhile by a writer that did not hold the account's lock (an operator's
        # re-sync): treat it as the existing row it now is.
        invoice, sub_id = _invoice_and_subscription_id(snap.stripe_id, snap.subscription_id)
    if invoice.account_id == account.pk:
        sql.attach(invoice, "account", account)
    if _older_than_stored(invoice, event) or _status_moves_backwards(invoice.status, snap.status):
        _remember(invoice, sub, payments_waiting, renewals)
        return invoice, False
    if sub_id is None:
        values["subscription_id"] = invoice.subscription_id  # never forget a known subscription
    values["paid_at"] = values["paid_at"] or invoice.paid_at
    was_draft = invoice.status == Invoice.Status.DRAFT
    _save_changes(invoice, values, event, event.type)
    if was_draft:
        _write_lines(invoice, snap, replace=True)  # lines only change while the invoice is a draft
    _remember(invoice, sub, payments_waiting, renewals)
    return invoice, True


def _remember(invoice: Invoice, sub: Subscription | None, payments_waiting: bool, renewals: tuple) -> None:
    """Keep what the first read learnt on the invoice, for the rest of the handler.

    ``renewals``: (the renewal linked to the invoice, the one effective at the exact start of
    its period), each None if not found (``link_invoice_to_renewal`` then reads the candidates).
    """
    if sub is not None and invoice.subscription_id == sub.pk:
        sql.attach(invoice, "subscription", sub)
    invoice._payments_waiting = payments_waiting
    invoice._linked_renewal, invoice._exact_renewal = renewals


def _write_lines(invoice: Invoice, snap: InvoiceSnapshot, replace: bool) -> None:
    lines = _t(InvoiceLineItem)
    if replace:
        existing = {
            (line.stripe_id, line.amount, line.quantity, line.period_start, line.period_end)
            for line in lines.filter("invoice_id = %s", [invoice.pk])
        }
        wanted = {(line.stripe_id, line.amount, line.quantity, line.period_start, line.period_end) for line in snap.lines}
        if existing == wanted:
            return
        lines.delete_where("invoice_id = %s", [invoice.pk], reason="invoice snapshot")
    lines.insert_many(
        (
            {
                "invoice_id": invoice.pk,
                "stripe_id": line.stripe_id,
                "description": line.description[:10000],
                "currency": line.currency,
                "amount": line.amount,
                "quantity": line.quantity,
                "period_start": line.period_start,
                "period_end": line.period_end,
                "parent_type": line.parent_type,
                "stripe_subscription_id": line.subscription_id,
                "price_id": line.price_id,
                "proration": line.proration,
            }
            for line in snap.lines
        ),
        reason="invoice snapshot",
        returning=False,
    )


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
        # Read under the account's lock (by mirror_invoice, or here), which its writers hold.
        subscription_field = Invoice._meta.get_field("subscription")
        if subscription_field.is_cached(invoice):
            sub = invoice.subscription
        else:
            sub = _t(Subscription).get("id = %s", [invoice.subscription_id])
        if _is_trial_invoice(sub, invoice):
            pass  # the trial's own $0 invoice: the trial entitlement already covers it
        elif invoice.billing_reason == "subscription_create":
            _grant_paid_period(sub, invoice)  # the first invoice has no renewal before it
            _relink_renewal_entitlements(sub)
        else:
            # A renewal created here is linked to this (already mirrored) invoice by ensure_renewal.
            renewal = link_invoice_to_renewal(invoice) or ensure_renewal(sub, invoice.period_start)
            if not process_renewal(renewal, invoice, sub):  # which relinks them when it processes
                _relink_renewal_entitlements(sub)
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
    payments = _t(Payment)
    # A new payment is attached to its invoice, if mirrored, by the INSERT itself, which also
    # says whether any refund of the PaymentIntent is known. If none is, the new payment adds
    # nothing to its invoice's refunded amount and there is nothing to recompute. A refund
    # written concurrently is not missed: its writer inserts this same payment row
    # (``_payment_for``), so it waits for this transaction and recomputes after it.
    # The invoice's lock is taken first, before the row (an invoice handler holding it may be
    # creating the invoice). The lookup sees the database as the statement began, so an
    # invoice committed while it waited is looked for again below.
    invoice_id = sql.Expr(f"(SELECT id FROM {_t(Invoice)} WHERE stripe_id = %s)", [snap.invoice_id])
    if sql.is_postgresql() and snap.invoice_id:
        invoice_id = sql.Expr(f"(SELECT {invoice_id.sql} FROM (SELECT {sql.ADVISORY_LOCK} AS locked) AS l)",
                              [*invoice_id.params, invoice_lock_key(snap.invoice_id)])
    refunds_known = sql.Expr(f"EXISTS (SELECT 1 FROM {_t(Refund)} r WHERE r.payment_intent_id = %s)",
                             [snap.payment_intent_id])
    payment, refunded = payments.insert_then(
        {"payment_intent_id": snap.payment_intent_id, "stripe_invoice_id": snap.invoice_id, "invoice_id": invoice_id},
        refunds_known,
        on_conflict=["payment_intent_id"],
    )
    if payment is not None and not refunded:
        if payment.invoice_id is None and snap.invoice_id:
            recompute_refunded(payment)  # looks for the invoice again, now that the lock is held
        return
    if payment is None:
        payment = payments.get("payment_intent_id = %s", [snap.payment_intent_id], lock=True)
    if payment.stripe_invoice_id != snap.invoice_id:
        payments.update(payment, {"stripe_invoice_id": snap.invoice_id})
    recompute_refunded(payment)


def record_charge_refund(event: Event) -> None:
    """``charge.refunded``: the charge's cumulative refunded amount (it only grows)."""
    snap = read_charge(event.obj)
    if snap.invoice_id:
        lock_invoice(snap.invoice_id)  # before the payment's row, as every payment writer does
    payment = _payment_for(snap.payment_intent_id or f"charge:{snap.stripe_id}")
    fields = {"charge_id": snap.stripe_id, "currency": snap.currency}
    if snap.invoice_id:  # pre-basil charges still name their invoice
        fields["stripe_invoice_id"] = snap.invoice_id
    fields["charge_amount_refunded"] = max(payment.charge_amount_refunded, snap.amount_refunded)
    changed = {name: value for name, value in fields.items() if getattr(payment, name) != value}
    if changed:
        _t(Payment).update(payment, changed)
    recompute_refunded(payment)


def record_refund(event: Event) -> None:
    """``refund.created`` / ``.updated`` / ``.failed``: mirror the refund, newest snapshot wins."""
    snap = read_refund(event.obj)
    refunds = _t(Refund)
    values = {
        "payment_intent_id": snap.payment_intent_id,
        "charge_id": snap.charge_id,
        "amount": snap.amount,
        "currency": snap.currency,
        "status": snap.status,
        "last_event_created": event.created,
    }
    refund = refunds.get("stripe_id = %s", [snap.stripe_id], lock=True)
    if refund is None:
        refund = refunds.insert({"stripe_id": snap.stripe_id, **values}, on_conflict=["stripe_id"])
        if refund is None:  # a concurrent delivery of another event of this refund created it
            refund = refunds.get("stripe_id = %s", [snap.stripe_id], lock=True)
            if refund.last_event_created and event.created < refund.last_event_created:
                return
            refunds.update(refund, values)
    elif refund.last_event_created and event.created < refund.last_event_created:
        return
    else:
        refunds.update(refund, values)
    key = snap.payment_intent_id or (f"charge:{snap.charge_id}" if snap.charge_id else "")
    if key:
        recompute_refunded(_payment_for(key))


def _payment_for(payment_intent_id: str, **defaults) -> Payment:
    """The Payment of a PaymentIntent, locked; created (with ``defaults``) if never seen."""
    payments = _t(Payment)
    payment = payments.insert({"payment_intent_id": payment_intent_id, **defaults}, on_conflict=["payment_intent_id"])
    if payment is None:
        payment = payments.get("payment_intent_id = %s", [payment_intent_id], lock=True)
    return payment


_COUNTED_REFUND_STATUSES = ("succeeded", "pending", "requires_action")


def recompute_refunded(payment: Payment) -> None:
    """Attach the payment to its invoice when known, and recompute the invoice's refunded amount."""
    invoices, payments, refunds = _t(Invoice), _t(Payment), _t(Refund)
    if payment.invoice_id is None and payment.stripe_invoice_id:
        row = sql.one(f"SELECT id FROM {invoices} WHERE stripe_id = %s", [payment.stripe_invoice_id])
        if row is not None:
            payments.update(payment, {"invoice_id": row[0]})
    if payment.invoice_id is None:
        # Kept until invoice_payment.paid or the invoice arrives; meanwhile ask Stripe (after commit).
        if not payment.stripe_invoice_id and not payment.payment_intent_id.startswith("charge:"):
            _ask_stripe_for_invoice(payment.payment_intent_id)
        return
    locked = sql.one(f"SELECT amount_refunded FROM {invoices} WHERE id = %s{sql.for_update()}", [payment.invoice_id])
    statuses = ", ".join(["%s"] * len(_COUNTED_REFUND_STATUSES))
    per_payment = sql.rows(
        f"SELECT p.charge_amount_refunded, (SELECT COALESCE(SUM(r.amount), 0) FROM {refunds} r"
        f" WHERE (r.payment_intent_id = p.payment_intent_id OR (r.charge_id = p.charge_id AND r.charge_id > ''))"
        f" AND r.status IN ({statuses})) FROM {payments} p WHERE p.invoice_id = %s",
        [*_COUNTED_REFUND_STATUSES, payment.invoice_id],
    )
    total = sum(max(charge_refunded, refunded) for charge_refunded, refunded in per_payment)
    if locked[0] != total:
        invoices.update_where({"amount_refunded": total}, "id = %s", [payment.invoice_id], reason="refund")


def _ask_stripe_for_invoice(payment_intent_id: str) -> None:
    from django.conf import settings
    from django.db import transaction

    if not settings.STRIPE_API_KEY:
        return
    from .tasks import resolve_payment_invoice

    transaction.on_commit(lambda: resolve_payment_invoice.delay(payment_intent_id), robust=True)


def attach_waiting_payments(invoice: Invoice) -> None:
    """Refunds that arrived before their invoice: attach them now."""
    if not getattr(invoice, "_payments_waiting", True):
        return  # mirror_invoice's read, earlier in this transaction, found none
    for payment in _t(Payment).filter("stripe_invoice_id = %s AND invoice_id IS NULL", [invoice.stripe_id]):
        recompute_refunded(payment)

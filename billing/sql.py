"""The app's only hand-written SQL: a few named statements the ORM cannot say, or says slower.

Everything else (handlers, services, admin, API, commands) uses the ORM. A statement is kept
here only when the ORM has no way to say it, or when a benchmark shows that it pays
(docs/decisions/0005-webhook-hot-path-sql.rst gives the figure for each). Each function sends
one statement and runs in the caller's transaction; none commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import NamedTuple

from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.utils import timezone
from simple_history.models import HistoricalRecords

from provisioning.models import Account, Entitlement

from .models import StripeEvent
from .stripe_payloads import Event

_EVENTS = StripeEvent._meta.db_table


def store_event_once(event: Event, raw_body: str, status: str, *, error: str = "") -> bool:
    """Insert the inbox row of ``event`` unless it exists; True if this call created it.

    ``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id``: one statement that both stores the
    event and says whether this delivery is the first. A concurrent delivery of the same event
    waits on the primary key until the first one's transaction ends, then inserts nothing. The
    raw body goes to the JSON column as it was received (not parsed and serialised again).

    The ORM's way, ``get_or_create``, is a SELECT, a SAVEPOINT, the INSERT and a RELEASE: four
    round trips on every delivery where this is one (decision 0005 has the measured cost).
    """
    now = timezone.now()
    handled = status in (StripeEvent.Status.PROCESSED, StripeEvent.Status.FAILED)
    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_EVENTS} (id, type, api_version, livemode, created, object_id, payload, status,"
            f" attempts, last_error, received_at, processed_at)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s{cast}, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (id) DO NOTHING RETURNING id",
            [
                event.id,
                event.type,
                event.api_version[:64],
                event.livemode,
                event.created,
                str(event.obj.get("id") or "")[:255],
                raw_body,
                status,
                1 if handled else 0,
                error,
                now,
                now if status == StripeEvent.Status.PROCESSED else None,
            ],
        )
        return cursor.fetchone() is not None


def advisory_xact_lock(key: str) -> None:
    """Take PostgreSQL's transaction-level advisory lock named ``key`` (released at COMMIT/ROLLBACK).

    The ORM has no word for it. It orders writers that share no row to lock, such as an
    invoice and a payment of it that arrive together (``billing.services.locks.lock_invoice``).
    Taking it again in the same transaction is allowed and costs only the round trip.
    SQLite (``make run``) has one writer at a time and no such lock: nothing is sent.
    """
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [key])


# --- Reads ---------------------------------------------------------------------------------------
# The reads every handled event makes. The queryset way (``Model.objects.get(...)``) compiles
# its SQL anew on each call, which cost the web process three to four times the CPU of these
# statements written once (decision 0005). Each returns model instances.


def locked_account(customer_id: str) -> Account | None:
    """The account of a Stripe customer, its row locked (``FOR UPDATE``); None if it has none.

    Every writer of a customer's rows takes this lock first (``billing.services.locks``).
    """
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    row = _fetch(
        f"SELECT {_columns(Account)} FROM {_qn(Account._meta.db_table)} WHERE stripe_customer_id = %s{lock}",
        [customer_id],
    )
    return _instance(Account, row) if row else None


class SubscriptionRead(NamedTuple):
    """What a subscription's handlers need, as it is once they hold the account's lock."""

    subscription: models.Model | None  # the mirrored subscription
    seats_differ: bool  # an entitlement of the period that starts at ``period_start`` has other seats
    invoices_waiting: bool  # an invoice names the subscription and is not attached to it yet


def subscription_read(stripe_id: str, period_start, quantity: int) -> SubscriptionRead:
    """The mirrored subscription ``stripe_id`` (``sub_...``) or None, whether an entitlement of
    its period starting at ``period_start`` has seats other than ``quantity``, and whether
    invoices wait for it, in ONE statement.

    A snapshot that moves the period or the seats, or creates the subscription, changes those
    entitlements and attaches those invoices; most have neither to do. Three reads with the ORM
    (decision 0005).
    """
    from .models import Invoice, Subscription

    subs, invoices = _qn(Subscription._meta.db_table), _qn(Invoice._meta.db_table)
    row = _fetch(
        f"SELECT {_columns(Subscription, 's')},"
        f" EXISTS (SELECT 1 FROM {_qn(Entitlement._meta.db_table)} e"
        f" WHERE e.stripe_subscription_id = %s AND e.starts_at = %s AND e.seats <> %s),"
        f" EXISTS (SELECT 1 FROM {invoices} i WHERE i.stripe_subscription_id = %s AND i.subscription_id IS NULL)"
        f" FROM (SELECT 1 AS one) x LEFT JOIN {subs} s ON s.stripe_id = %s",
        [stripe_id, _value(period_start), quantity, stripe_id, stripe_id],
    )
    width = len(Subscription._meta.concrete_fields)
    values = row[:width]
    sub = _instance(Subscription, values) if values[_pk_index(Subscription)] is not None else None
    return SubscriptionRead(sub, seats_differ=bool(row[width]), invoices_waiting=bool(row[width + 1]))


class InvoiceRead(NamedTuple):
    """What an invoice's handlers need, as it is once they hold the invoice's and the account's locks."""

    invoice: models.Model | None  # the mirrored invoice
    subscription: models.Model | None  # the subscription the snapshot names, if mirrored
    linked_renewal: models.Model | None  # the renewal already linked to the invoice
    exact_renewal: models.Model | None  # that subscription's renewal effective at the period's start
    renewal_that_day: bool  # that subscription has a renewal on the UTC date of the period's start
    payments_waiting: bool  # a payment names the invoice and is not attached to it yet


def invoice_read(stripe_id: str, stripe_subscription_id: str, period_start) -> InvoiceRead:
    """The invoice, its subscription, the renewals it may pay for and whether payments wait, in
    ONE statement; each part None (False) if there is none.

    By the matching rule (``billing.matching``) a renewal linked to the invoice, or else the one
    effective at the exact start of its period, decides the link without reading the other
    candidates; and with neither, and no renewal on that UTC date, there is no candidate to
    read. Five reads with the ORM; this is most of an invoice event's reads (decision 0005).
    """
    from .matching import utc_day
    from .models import Invoice, Payment, Renewal, Subscription

    invoices, subs, renewals = (_qn(m._meta.db_table) for m in (Invoice, Subscription, Renewal))
    day_start, day_end = (_value(t) for t in utc_day(period_start)) if period_start else (None, None)
    row = _fetch(
        f"SELECT {_columns(Invoice, 'i')}, {_columns(Subscription, 's')}, {_columns(Renewal, 'r')},"
        f" {_columns(Renewal, 'e')},"
        f" EXISTS (SELECT 1 FROM {renewals} d WHERE d.subscription_id = s.id"
        f" AND d.effective_date >= %s AND d.effective_date < %s),"
        f" EXISTS (SELECT 1 FROM {_qn(Payment._meta.db_table)} p WHERE p.stripe_invoice_id = %s AND p.invoice_id IS NULL)"
        f" FROM (SELECT 1 AS one) x"
        f" LEFT JOIN {invoices} i ON i.stripe_id = %s"
        f" LEFT JOIN {subs} s ON s.stripe_id = %s"
        f" LEFT JOIN {renewals} r ON r.stripe_invoice_id = %s AND r.subscription_id = s.id"
        f" LEFT JOIN {renewals} e ON e.effective_date = %s AND e.subscription_id = s.id",
        [day_start, day_end, stripe_id, stripe_id, stripe_subscription_id, stripe_id, _value(period_start)],
    )
    parts, offset = [], 0
    for model in (Invoice, Subscription, Renewal, Renewal):
        width = len(model._meta.concrete_fields)
        values = row[offset : offset + width]
        parts.append(_instance(model, values) if values[_pk_index(model)] is not None else None)
        offset += width
    return InvoiceRead(*parts, renewal_that_day=bool(row[offset]), payments_waiting=bool(row[offset + 1]))


class PaymentRead(NamedTuple):
    """What ``invoice_payment.paid`` needs, as it is once it holds the invoice's lock."""

    invoice_id: int | None  # the primary key of the mirrored invoice, if any
    refund_known: bool  # a refund of the PaymentIntent is mirrored


def payment_read(stripe_invoice_id: str, payment_intent_id: str) -> PaymentRead:
    """The invoice a payment names (its primary key, or None) and whether a refund of the
    PaymentIntent is known, in ONE statement: two ORM reads on every ``invoice_payment.paid``
    (decision 0005).
    """
    from .models import Invoice, Refund

    row = _fetch(
        f"SELECT (SELECT i.id FROM {_qn(Invoice._meta.db_table)} i WHERE i.stripe_id = %s),"
        f" EXISTS (SELECT 1 FROM {_qn(Refund._meta.db_table)} r WHERE r.payment_intent_id = %s)",
        [stripe_invoice_id, payment_intent_id],
    )
    return PaymentRead(invoice_id=row[0], refund_known=bool(row[1]))


@cache
def _pk_index(model) -> int:
    return [f.primary_key for f in model._meta.concrete_fields].index(True)


def _fetch(statement: str, params: list) -> tuple | None:
    with _db().cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()


@cache
def _columns(model, alias: str = "") -> str:
    """The select list of ``model``'s columns, in the order ``_instance`` reads them."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + _qn(f.column) for f in model._meta.concrete_fields)


def _instance(model, values):
    """The model instance of a row of ``_columns(model)``, as a queryset would give it."""
    fields, db = model._meta.concrete_fields, _db()
    if db.vendor != "postgresql":  # SQLite: datetimes come back as text, booleans as 0/1
        values = [_convert(model, field, value) for field, value in zip(fields, values, strict=True)]
    return model.from_db(db.alias, _attnames(model), values)


def _convert(model, field, value):
    expression = field.get_col(model._meta.db_table)
    for converter in connection.ops.get_db_converters(expression) + field.get_db_converters(connection):
        value = converter(value, expression, connection)
    return value


def _value(value):
    """A parameter as the database wants it (SQLite compares datetimes as naive UTC text)."""
    return connection.ops.adapt_datetimefield_value(value) if isinstance(value, datetime) else value


# --- Writes that carry their history row ------------------------------------------------------
# django-simple-history writes a model's history row in a ``post_save`` receiver: a second
# round trip, and the whole of ``Model.save()`` around the first. The functions below send a
# write and its history rows as ONE statement (a data-modifying CTE on PostgreSQL; two
# statements in one transaction on SQLite), with the values simple-history would record
# (``billing/tests/test_sql.py`` compares them with its own rows).


def save_with_history(obj: models.Model, fields: Sequence[str], *, reason: str | None) -> None:
    """``obj.save(update_fields=fields)`` and its history row (``~``, ``reason``), in one statement.

    ``auto_now`` fields (``updated_at``) are written too, as ``save()`` would.
    """
    meta = obj._meta
    written = [meta.get_field(name) for name in fields]
    written += [f for f in meta.concrete_fields if getattr(f, "auto_now", False) and f not in written]
    assignments = ", ".join(f"{_qn(f.column)} = %s" for f in written)
    db = _db()
    params = [f.get_db_prep_save(f.pre_save(obj, False), db) for f in written]
    _write_with_history(
        type(obj),
        f"UPDATE {_qn(meta.db_table)} SET {assignments} WHERE {_qn(meta.pk.column)} = %s",
        [*params, obj.pk],
        "~",
        reason,
    )


def create_with_history(obj: models.Model, *, reason: str | None, unless_exists: Sequence[str] = ()) -> bool:
    """``obj.save()`` of a new row and its history row (``+``, ``reason``), in one statement.

    With ``unless_exists`` (the fields of a unique constraint), nothing is written if a row with
    those values exists (``ON CONFLICT DO NOTHING``; it waits for a concurrent writer of that
    row to end first): False. Otherwise True, and ``obj`` has its primary key.
    """
    return bool(create_many_with_history([obj], reason=reason, unless_exists=unless_exists))


def create_many_with_history(
    objs: Sequence[models.Model], *, reason: str | None, unless_exists: Sequence[str] = (), where: tuple | None = None
) -> list:
    """``create_with_history`` of several new rows of one model, in one statement: those created.

    ``where`` (SQL, parameters; one row only): the row is inserted only if it holds.
    """
    if not objs:
        return []
    meta = objs[0]._meta
    fields = [f for f in meta.concrete_fields if not (f.primary_key and f.auto_created)]
    columns = ", ".join(_qn(f.column) for f in fields)
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    db = _db()
    params = [f.get_db_prep_save(f.pre_save(obj, True), db) for obj in objs for f in fields]
    conflict = ""
    if unless_exists:
        conflict = f" ON CONFLICT ({', '.join(_qn(meta.get_field(n).column) for n in unless_exists)}) DO NOTHING"
    values = f"VALUES {', '.join([row] * len(objs))}"
    if where is not None:
        values, params = f"SELECT {row[1:-1]} WHERE {where[0]}", [*params, *where[1]]
    pks = _write_with_history(
        type(objs[0]),
        f"INSERT INTO {_qn(meta.db_table)} ({columns}) {values}{conflict}",
        params,
        "+",
        reason,
    )
    if len(pks) != len(objs):  # some skipped (unless_exists): only a single row is asked for so
        return []
    for obj, pk in zip(objs, pks, strict=True):
        obj.pk, obj._state.adding, obj._state.db = pk, False, db.alias
    return list(objs)


def plan_renewal(renewal) -> bool:
    """Insert a new renewal and its history row, unless its subscription already has a renewal on
    the same UTC day or an invoice of that day waits, unlinked, for one: True if inserted.

    One statement for the common case of planning the next period (nothing on that day yet);
    the ORM's way is two reads before the INSERT (decision 0005). When it steps aside, the
    caller takes the full way, which picks the renewal of that day or links the waiting invoice.
    """
    from .matching import utc_day
    from .models import Invoice, Renewal

    start, end = (_value(t) for t in utc_day(renewal.effective_date))
    renewals, invoices = _qn(Renewal._meta.db_table), _qn(Invoice._meta.db_table)
    same_day = (
        f"SELECT 1 FROM {renewals} r WHERE r.subscription_id = %s AND r.effective_date >= %s AND r.effective_date < %s"
    )
    waiting = (
        f"SELECT 1 FROM {invoices} i WHERE i.subscription_id = %s AND i.period_start >= %s AND i.period_start < %s"
        f" AND NOT EXISTS (SELECT 1 FROM {renewals} lr WHERE lr.stripe_invoice_id = i.stripe_id)"
    )
    day = [renewal.subscription_id, start, end]
    where = (f"NOT EXISTS ({same_day}) AND NOT EXISTS ({waiting})", [*day, *day])
    return bool(
        create_many_with_history([renewal], reason=None, unless_exists=("subscription", "effective_date"), where=where)
    )


def relink_renewal_entitlements(subscription, processing: tuple | None = None) -> None:
    """Move each processed renewal of ``subscription`` from the window before it to the paid
    window it starts, in ONE UPDATE with its history rows; only renewals whose links change.

    "The window before it": the subscription's entitlement that starts last before the
    renewal's date (the later-created on a tie); "the paid window it starts": the first paid
    entitlement starting at that date. ``processing`` (renewal, processed_at, reason): that
    renewal is also marked processed by the same UPDATE, its history row giving the reason.

    The ORM's way reads the windows and the renewals, then saves each renewal that moved (with
    a history row each): three to five statements on every paid renewal (decision 0005).
    """
    from .models import Renewal

    renewals, windows = _qn(Renewal._meta.db_table), _qn(Entitlement._meta.db_table)
    window_before = (
        f"(SELECT e.id FROM {windows} e WHERE e.stripe_subscription_id = %s"
        f" AND e.starts_at < {renewals}.effective_date ORDER BY e.starts_at DESC, e.id DESC LIMIT 1)"
    )
    window_started = (
        f"(SELECT e.id FROM {windows} e WHERE e.stripe_subscription_id = %s AND e.kind = %s"
        f" AND e.starts_at = {renewals}.effective_date ORDER BY e.id LIMIT 1)"
    )
    before_params, started_params = [subscription.stripe_id], [subscription.stripe_id, Entitlement.Kind.PAID]
    renewal_id, processed_at, reason = processing if processing else (None, None, None)
    now = timezone.now()
    _write_with_history(
        Renewal,
        f"UPDATE {renewals} SET from_entitlement_id = {window_before}, to_entitlement_id = {window_started},"
        f" processed_at = CASE WHEN id = %s THEN %s ELSE processed_at END, updated_at = %s"
        f" WHERE subscription_id = %s AND (id = %s OR (processed_at IS NOT NULL AND"
        f" (COALESCE(from_entitlement_id, 0) <> COALESCE({window_before}, 0)"
        f" OR COALESCE(to_entitlement_id, 0) <> COALESCE({window_started}, 0))))",
        [
            *before_params,
            *started_params,
            renewal_id,
            processed_at,
            now,
            subscription.pk,
            renewal_id,
            *before_params,
            *started_params,
        ],
        "~",
        reason_sql=("CASE WHEN id = %s THEN %s END", [renewal_id, reason[:100] if reason else None]),
    )


def _db():
    """The default database's connection itself: every attribute of the ``connection`` proxy is
    looked up in a context-local store, which a statement's dozens of field conversions feel."""
    return connections[DEFAULT_DB_ALIAS]


@cache
def _attnames(model) -> list[str]:
    return [f.attname for f in model._meta.concrete_fields]


@cache
def _qn(name: str) -> str:
    return connection.ops.quote_name(name)


@cache
def _history_model(model):
    """simple-history's model of ``model``'s history rows, or None. Looked up once per model:
    each access to ``Model.history`` builds a new manager class."""
    history = getattr(model, "history", None)
    return None if history is None else history.model


@cache
def _tracked_columns(model) -> str:
    """The columns a model's history table copies from it, quoted, as simple-history defines them."""
    own = {f.column for f in model._meta.concrete_fields}
    return ", ".join(_qn(f.column) for f in _history_model(model)._meta.concrete_fields if f.column in own)


def _write_with_history(
    model,
    write: str,
    params: list,
    history_type: str,
    reason: str | None = None,
    reason_sql: tuple[str, list] | None = None,
) -> list:
    """Run ``write`` (an INSERT or UPDATE) and record a history row per row written; their pks.

    ``reason_sql`` (SQL over the written row's columns, its parameters) gives each row its own
    reason; otherwise every row gets ``reason``.
    """
    meta, db = model._meta, _db()
    pk = _qn(meta.pk.column)
    history_model = _history_model(model)
    with db.cursor() as cursor:
        if history_model is None:
            cursor.execute(f"{write} RETURNING {pk}", params)
            return [row[0] for row in cursor.fetchall()]
        history_meta = history_model._meta
        tracked = _tracked_columns(model)
        why, why_params = reason_sql or ("%s", [reason[:100] if reason else None])
        insert_history = (
            f"INSERT INTO {_qn(history_meta.db_table)} ({tracked}, history_date, history_change_reason,"
            f" history_type, history_user_id) SELECT {tracked}, %s, {why}, %s, %s FROM"
        )
        history_params = [timezone.now(), *why_params, history_type, _history_user_id()]
        if db.vendor == "postgresql":
            cursor.execute(
                f"WITH written AS ({write} RETURNING *), history AS ({insert_history} written) SELECT {pk} FROM written",
                [*params, *history_params],
            )
            return [row[0] for row in cursor.fetchall()]
        # SQLite (``make run``): the history rows in a second statement of the same transaction.
        cursor.execute(f"{write} RETURNING {pk}", params)
        pks = [row[0] for row in cursor.fetchall()]
        if pks:
            cursor.execute(
                f"{insert_history} {_qn(meta.db_table)} WHERE {pk} IN ({', '.join(['%s'] * len(pks))})",
                [*history_params, *pks],
            )
        return pks


def _history_user_id():
    """The signed-in user of the current request, as simple-history's middleware records it."""
    request = getattr(HistoricalRecords.context, "request", None)
    user = getattr(request, "user", None)
    return user.pk if user is not None and getattr(user, "is_authenticated", False) else None

"""The inbox: store every verified event once, apply it once, remember how it went.

The way of one event, top-down (the view in ``billing.views`` has already checked the
signature and the envelope):

1. ``receive`` opens ONE transaction and inserts the event's row, already marked
   ``processed``, with ``INSERT ... ON CONFLICT (id) DO NOTHING``. Nobody can see that row
   before the transaction commits, and it commits together with the handler's writes, so
   "applied" and "recorded as applied" cannot drift apart. A concurrent delivery of the same
   event blocks on the unique key until the first commits, then finds the row (taken with
   ``SELECT ... FOR UPDATE``) ``processed``: it answers 200 and changes nothing.
2. The handler runs in that transaction. If it raises, the whole transaction is rolled back
   (none of its writes and none of its ``on_commit`` callbacks survive), and the failure is
   recorded in a transaction of its own: the row is upserted as ``failed`` with ``attempts``
   and ``last_error`` (never overwriting a concurrent success). The answer is 500 so that
   Stripe retries; the retry (or ``reprocess_stripe_events``) takes the existing row with
   ``FOR UPDATE``, runs the handler and marks it ``processed``.

For the events of a customer, the handler's first act is to lock the customer's account (every
writer of a customer's rows does, ``billing.services``). The handler declares that at
registration (``handles(..., locks_account_of=..., reads_first=...)``), and the INSERT
statement takes the lock too, once it has created the row, and sends the handler's first read
after it: the handler's own lock is free (``holds_account_lock``) and its read is handed over
(``take_first_read``), two round trips less. docs/decisions/0005-webhook-hot-path-sql.rst
says why that read locks every row it reads.

The handler runs inside ``sql.deferred_writes()``: its writes that read nothing back travel
with its next statement instead of one round trip each.

On the common path an event costs the inbox one INSERT and the COMMIT: no savepoint, no
UPDATE (``make bench`` measures it against a minimal webhook). (psycopg's pipeline mode was
tried for the first delivery and removed: it cost the web process more CPU than it saved
PostgreSQL, docs/decisions/0005-webhook-hot-path-sql.rst.)

Unknown event types are stored ``ignored`` without a transaction of their own.
See docs/decisions/0002-inbox-and-ordering.rst for the alternatives this replaced.
"""
from __future__ import annotations

import logging
import time
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

from django.db import connection, transaction
from django.utils import timezone

from provisioning.models import Account

from . import registry, sql
from .models import StripeEvent
from .stripe_payloads import Event, PayloadError

logger = logging.getLogger(__name__)

Status = StripeEvent.Status
DUPLICATE = "duplicate"
MAX_ERROR_CHARS = 8000


class _Locked(NamedTuple):
    """What the event's INSERT statement locked and read for the handler (``_insert_locking``)."""

    customer_id: str
    account: Account | None  # the customer's account, locked; None if it has none yet
    first_read: list  # the handler's first read (``registry.handles(reads_first=...)``), until taken
    key: str | None = None  # the advisory lock taken before the account's (``handles(locks_key_of=...)``)


_locked: ContextVar[_Locked | None] = ContextVar("billing_inbox_locked", default=None)


def holds_account_lock(customer_id: str) -> bool:
    """True if this transaction already holds the lock of ``customer_id``'s account row.

    Only inside a handler run by the inbox, after the event's INSERT took the lock: the lock is
    the transaction's until it ends, and the mark is cleared when the handler's run ends.
    """
    locked = _locked.get()
    return locked is not None and locked.account is not None and locked.customer_id == customer_id


def holds_key_lock(key: str) -> bool:
    """True if the event's INSERT took the advisory lock ``key`` in this transaction
    (``registry.handles(locks_key_of=...)``); the mark is cleared when the handler's run ends."""
    locked = _locked.get()
    return locked is not None and locked.key == key


def locked_account(customer_id: str) -> Account | None:
    """The account row the inbox locked for ``customer_id`` in this transaction, or None."""
    locked = _locked.get()
    if locked is None or locked.customer_id != customer_id:
        return None
    return locked.account


def take_first_read(customer_id: str) -> tuple[Account | None, tuple | None] | None:
    """(the locked account or None, the row of the handler's first read or None), once.

    None if the inbox read nothing for this customer in this transaction, or if it was taken
    already: after the handler's own writes the row would be out of date.
    """
    locked = _locked.get()
    if locked is None or locked.customer_id != customer_id or not locked.first_read:
        return None
    return locked.account, locked.first_read.pop()


class PrerequisiteMissing(Exception):
    """The event needs a row that a later delivery will bring (e.g. its subscription).

    Raised by a handler to fail the event *on purpose*: nothing is applied, the answer is
    non-2xx, and Stripe's retry (or an operator's re-process) applies it once the
    prerequisite has arrived. See docs/decisions/0003-retry-policy.rst.
    """


@dataclass(frozen=True)
class Outcome:
    event_id: str
    status: str  # processed | ignored | failed | duplicate
    error: str = ""

    @property
    def http_status(self) -> int:
        return 500 if self.status == Status.FAILED else 200


def receive(payload: dict, raw_body: str) -> Outcome:
    """Store and apply one verified event (``payload`` is ``raw_body`` parsed)."""
    event = Event.from_payload(payload)
    path = registry.path_for(event.type)
    if path is None:
        _insert(event, raw_body, Status.IGNORED)
        logger.info("stripe event %s %s ignored (no handler)", event.id, event.type)
        return Outcome(event.id, Status.IGNORED)
    return _apply(event, path, raw_body)


def process_event(event_id: str) -> Outcome:
    """Apply a stored event again (operators, the admin): failed, received or ignored ones.

    A processed event is left alone: applying it twice is exactly what the inbox prevents.
    """
    row = StripeEvent.objects.only("id", "status", "payload", "type").get(pk=event_id)
    if row.status == Status.PROCESSED:
        return Outcome(event_id, DUPLICATE)
    path = registry.path_for(row.type)
    if path is None:
        StripeEvent.objects.filter(pk=event_id).update(status=Status.IGNORED)
        return Outcome(event_id, Status.IGNORED)
    return _apply(Event.from_payload(row.payload), path, raw_body=None)


def _apply(event: Event, path: str, raw_body: str | None) -> Outcome:
    """Run the handler and record the result, in the handler's own transaction.

    The row is inserted already ``processed``: nobody can see it before the handler's writes
    commit with it, and on the common path this saves a savepoint and an UPDATE per event.
    A failure rolls everything back; the failure is then recorded in a transaction of its own.
    """
    started = time.perf_counter()
    outcome = _run_handler(event, path, raw_body)
    if outcome.status == Status.PROCESSED:
        logger.info("stripe event %s %s processed in %.1f ms", event.id, event.type,
                    (time.perf_counter() - started) * 1000)
    return outcome


def _run_handler(event: Event, path: str, raw_body: str | None) -> Outcome:
    """Insert the row (first delivery) or take the existing one under its lock, then handle."""
    handler_ran = False
    marked = None
    try:
        with transaction.atomic():
            created = False
            if raw_body is not None:
                customer = registry.account_locked_by(path, event) if _row_locks() else None
                if customer is None:
                    created = _insert(event, raw_body, Status.PROCESSED)
                else:
                    created, locked = _insert_locking(
                        event, raw_body, customer, _first_read(path, event), _key(path, event)
                    )
                    marked = _locked.set(locked)
            if created:
                handler_ran = True
                with sql.deferred_writes():
                    registry.resolve(path)(event)
            else:
                if _lock(event.id) == Status.PROCESSED:
                    return Outcome(event.id, DUPLICATE)
                handler_ran = True
                with sql.deferred_writes():
                    registry.resolve(path)(event)
                _mark_processed(event.id)
    except Exception as exc:  # noqa: BLE001 - every handler failure is recorded, then answered 500
        if not handler_ran:
            raise  # the inbox itself failed (database down): nothing stored, the view answers 503
        return _failed(event, raw_body, exc)
    finally:
        if marked is not None:
            _locked.reset(marked)
    return Outcome(event.id, Status.PROCESSED)


def _first_read(path: str, event: Event) -> tuple[str, list] | None:
    """The handler's first read (``registry.first_read_of``), or None if the payload is too
    broken to build it."""
    return _unless_broken(registry.first_read_of, path, event)


def _key(path: str, event: Event) -> str | None:
    """The handler's advisory lock key (``registry.key_locked_by``), or None, as ``_first_read``."""
    return _unless_broken(registry.key_locked_by, path, event)


def _unless_broken(ask, path: str, event: Event):
    """``ask(path, event)``, or None if it raises: the handler then meets the payload's problem
    itself, and the event is recorded failed, never the inbox."""
    try:
        return ask(path, event)
    except Exception:  # noqa: BLE001 - never let a payload problem look like the inbox failing
        logger.debug("%s failed for stripe event %s", ask.__name__, event.id, exc_info=True)
        return None


def _failed(event: Event, raw_body: str | None, exc: Exception) -> Outcome:
    error = _describe(exc)
    _record_failure(event, raw_body, error)
    if isinstance(exc, (PrerequisiteMissing, PayloadError)):
        logger.warning("stripe event %s %s failed: %s", event.id, event.type, exc)
    else:
        logger.exception("stripe event %s %s failed", event.id, event.type, exc_info=exc)
    return Outcome(event.id, Status.FAILED, error)


def _describe(exc: Exception) -> str:
    if isinstance(exc, (PrerequisiteMissing, PayloadError)):
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception(exc, limit=8))[-MAX_ERROR_CHARS:]


# --- SQL -----------------------------------------------------------------------------------
# The inbox is the hot path of every delivery, so its three statements are written by hand:
# the insert passes the raw body straight to the JSON column (no re-serialising) and answers
# in the same round trip whether this delivery created the row.

_TABLE = StripeEvent._meta.db_table


def _row(event: Event, raw_body: str, status: str, error: str | None) -> list:
    now = timezone.now()
    handled = status in (Status.PROCESSED, Status.FAILED)
    values = [
        event.id,
        event.type,
        event.api_version[:64],
        event.livemode,
        event.created,
        str(event.obj.get("id") or "")[:255],
        raw_body,
        status,
        1 if handled else 0,
        now,
        now if status == Status.PROCESSED else None,
    ]
    if error is not None:
        values.insert(9, error)
    return values


def _insert(event: Event, raw_body: str, status: str) -> bool:
    """Insert the event's row unless it exists; True if this call created it."""
    cursor = sql.cursor()
    cursor.execute(_insert_sql(), _row(event, raw_body, status, error=None))
    return cursor.fetchone() is not None


def _insert_locking(
    event: Event, raw_body: str, customer_id: str, first_read: tuple[str, list] | None, key: str | None = None
) -> tuple[bool, _Locked]:
    """Insert the event's row (as ``_insert``) and lock ``customer_id``'s account, in one statement.

    (whether this call created the row, what was locked and read). The lock is what the
    handler would take first anyway; taken here it costs no round trip of its own, and neither
    does the handler's ``first_read`` sent with it.

    The lock is taken only once the INSERT has created the row (``EXISTS (SELECT 1 FROM
    inserted)``), as when the handler took it: a duplicate waits for the first delivery's row
    holding nothing, then takes no lock at all. Were the lock taken first, a duplicate could
    hold the account while waiting for the row of a first delivery that waits for the account.

    With ``key``, the advisory lock of that name is taken as the row is created (the INSERT's
    ``RETURNING``), before the account's: the order every taker of that lock keeps.
    """
    accounts = sql.table(Account)
    read, params = first_read or (None, [])
    insert, key_params = _insert_sql(), []
    if key is not None:
        insert, key_params = f"{insert}, {sql.ADVISORY_LOCK} AS keyed", [key]
    cursor = sql.cursor()
    cursor.execute(
        f"WITH inserted AS ({insert}),"
        f" locked AS (SELECT {accounts.cols()} FROM {accounts}"
        f" WHERE stripe_customer_id = %s AND EXISTS (SELECT 1 FROM inserted) FOR UPDATE)"
        # The read runs only once the account is locked: its row locks come after the account's.
        + (f", first_read AS (SELECT r.* FROM ({read}) AS r WHERE EXISTS (SELECT 1 FROM locked))" if read else "")
        + f" SELECT (SELECT id FROM inserted), {accounts.cols('l')}{', r.*' if read else ''}"
        f" FROM (SELECT 1 AS one) AS x LEFT JOIN locked l ON true"
        + (" LEFT JOIN first_read r ON true" if read else ""),
        [*_row(event, raw_body, Status.PROCESSED, error=None), *key_params, customer_id, *params],
    )
    row = cursor.fetchone()
    created = row[0] is not None
    account_id = row[1 + accounts.attnames.index("id")]
    account = accounts.load(row, 1) if account_id is not None else None
    reads = [tuple(row[1 + accounts.width:])] if read and account is not None else []
    return created, _Locked(customer_id, account, reads, key if created else None)


def _row_locks() -> bool:
    # SQLite (``make run``) has no row locks: its writers are serialised by the database lock.
    return connection.features.has_select_for_update


def _insert_sql() -> str:
    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    return (
        f"INSERT INTO {_TABLE} (id, type, api_version, livemode, created, object_id, payload, status,"
        f" attempts, last_error, received_at, processed_at)"
        f" VALUES (%s, %s, %s, %s, %s, %s, %s{cast}, %s, %s, '', %s, %s)"
        f" ON CONFLICT (id) DO NOTHING RETURNING id"
    )


def _lock(event_id: str) -> str:
    lock = " FOR UPDATE" if _row_locks() else ""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT status FROM {_TABLE} WHERE id = %s{lock}", [event_id])
        return cursor.fetchone()[0]


def _mark_processed(event_id: str) -> None:
    """A retried (failed or received) event that has now been applied."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET status = %s, attempts = attempts + 1, last_error = '', processed_at = %s"
            f" WHERE id = %s",
            [Status.PROCESSED, timezone.now(), event_id],
        )


def _record_failure(event: Event, raw_body: str | None, error: str) -> None:
    """Keep the event as ``failed`` (counting the attempt) after its transaction rolled back.

    The row may not exist (it was inserted in the rolled-back transaction), or a concurrent
    delivery may have processed the event meanwhile: that outcome is never overwritten.
    """
    if raw_body is None:
        _finish_failed(event.id, error)
        return
    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_TABLE} (id, type, api_version, livemode, created, object_id, payload, status,"
            f" attempts, last_error, received_at, processed_at)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s{cast}, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (id) DO UPDATE SET attempts = {_TABLE}.attempts + 1,"
            f" status = CASE WHEN {_TABLE}.status = %s THEN {_TABLE}.status ELSE EXCLUDED.status END,"
            f" last_error = CASE WHEN {_TABLE}.status = %s THEN {_TABLE}.last_error ELSE EXCLUDED.last_error END",
            [*_row(event, raw_body, Status.FAILED, error=error), Status.PROCESSED, Status.PROCESSED],
        )


def _finish_failed(event_id: str, error: str) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET attempts = attempts + 1,"
            f" status = CASE WHEN status = %s THEN status ELSE %s END,"
            f" last_error = CASE WHEN status = %s THEN last_error ELSE %s END WHERE id = %s",
            [Status.PROCESSED, Status.FAILED, Status.PROCESSED, error, event_id],
        )

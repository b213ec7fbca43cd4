"""The inbox: store every verified event once, apply it once, remember how it went.

The way of one event, top-down (the view in ``billing.views`` has already checked the
signature and the envelope):

1. ``receive`` opens ONE transaction and inserts the event's row with
   ``INSERT ... ON CONFLICT (id) DO NOTHING``. A concurrent delivery of the same event blocks on
   that insert (or, if the row already exists, on ``SELECT ... FOR UPDATE``) until the first
   one commits, and then sees the row ``processed``: it answers 200 and changes nothing.
2. The handler runs inside a savepoint. If it raises, the savepoint is rolled back (none of its
   writes and none of its ``on_commit`` callbacks survive) and the row, still in the outer
   transaction, is marked ``failed`` with ``attempts`` and ``last_error``; the answer is 500
   so that Stripe retries, and the retry (or ``reprocess_stripe_events``) applies it.
3. On success the row is marked ``processed`` in the same transaction as the handler's writes:
   "applied" and "recorded as applied" cannot drift apart.

Unknown event types are stored ``ignored`` without a transaction of their own.
See docs/decisions/0002-inbox-and-ordering.rst for the alternatives this replaced.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from . import registry
from .models import StripeEvent
from .stripe_payloads import Event, PayloadError

logger = logging.getLogger(__name__)

Status = StripeEvent.Status
DUPLICATE = "duplicate"
MAX_ERROR_CHARS = 8000


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
    path = registry.registered_types().get(event.type)
    if path is None:
        _insert(event, raw_body, Status.IGNORED)
        logger.info("stripe event %s %s ignored (no handler)", event.id, event.type)
        return Outcome(event.id, Status.IGNORED)
    with transaction.atomic():
        if _insert(event, raw_body, Status.RECEIVED):
            return _apply(event, path)
        current = _lock(event.id)
        if current == Status.PROCESSED:
            return Outcome(event.id, DUPLICATE)
        return _apply(event, path)


def process_event(event_id: str) -> Outcome:
    """Apply a stored event again (operators, the admin): failed, received or ignored ones.

    A processed event is left alone: applying it twice is exactly what the inbox prevents.
    """
    with transaction.atomic():
        row = StripeEvent.objects.select_for_update().only("id", "status", "payload", "type").get(pk=event_id)
        if row.status == Status.PROCESSED:
            return Outcome(event_id, DUPLICATE)
        path = registry.registered_types().get(row.type)
        if path is None:
            StripeEvent.objects.filter(pk=event_id).update(status=Status.IGNORED)
            return Outcome(event_id, Status.IGNORED)
        return _apply(Event.from_payload(row.payload), path)


def _apply(event: Event, path: str) -> Outcome:
    """Run the handler in a savepoint; record the result in the enclosing transaction."""
    started = time.perf_counter()
    try:
        with transaction.atomic():
            registry.resolve(path)(event)
    except Exception as exc:  # noqa: BLE001 - every handler failure is recorded, then answered 500
        error = _describe(exc)
        _finish(event.id, Status.FAILED, error)
        if isinstance(exc, (PrerequisiteMissing, PayloadError)):
            logger.warning("stripe event %s %s failed: %s", event.id, event.type, exc)
        else:
            logger.exception("stripe event %s %s failed", event.id, event.type)
        return Outcome(event.id, Status.FAILED, error)
    _finish(event.id, Status.PROCESSED, "")
    logger.info(
        "stripe event %s %s processed in %.1f ms", event.id, event.type, (time.perf_counter() - started) * 1000
    )
    return Outcome(event.id, Status.PROCESSED)


def _describe(exc: Exception) -> str:
    if isinstance(exc, (PrerequisiteMissing, PayloadError)):
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception(exc, limit=8))[-MAX_ERROR_CHARS:]


# --- SQL -----------------------------------------------------------------------------------
# The inbox is the hot path of every delivery, so its three statements are written by hand:
# the insert passes the raw body straight to the JSON column (no re-serialising) and answers
# in the same round trip whether this delivery created the row.

_TABLE = StripeEvent._meta.db_table


def _insert(event: Event, raw_body: str, status: str) -> bool:
    """Insert the event's row unless it exists; True if this call created it."""
    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_TABLE} (id, type, api_version, livemode, created, object_id, payload, status,"
            f" attempts, last_error, received_at, processed_at)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s{cast}, %s, 0, '', %s, NULL)"
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
                timezone.now(),
            ],
        )
        return cursor.fetchone() is not None


def _lock(event_id: str) -> str:
    # SQLite (``make run``) has no row locks: its writers are serialised by the database lock.
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT status FROM {_TABLE} WHERE id = %s{lock}", [event_id])
        return cursor.fetchone()[0]


def _finish(event_id: str, status: str, error: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET status = %s, attempts = attempts + 1, last_error = %s, processed_at = %s"
            f" WHERE id = %s",
            [status, error, timezone.now() if status == Status.PROCESSED else None, event_id],
        )

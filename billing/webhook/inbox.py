"""The inbox: store every verified event once, apply it once, remember how it went.

The way of one event, top-down (``billing.webhook.views`` has already checked the signature
and the envelope):

1. ``receive`` opens ONE transaction and inserts the event's row, already marked
   ``processed`` (``billing.sql.store_event_once``). Nobody can see that row before the
   transaction commits, and it commits together with the handler's writes, so "applied" and
   "recorded as applied" cannot drift apart. A concurrent delivery of the same event blocks on
   the primary key until the first commits, then finds the row ``processed``: it answers 200
   and changes nothing. A delivery waiting there holds no other lock.
2. The handler runs in that transaction; the services it calls take their own locks
   (``billing.services.locks``). If it raises, the whole transaction is rolled back (none of
   its writes and none of its ``on_commit`` callbacks survive), and the failure is recorded in
   a transaction of its own: the row is kept ``failed`` with ``attempts`` and ``last_error``
   (never overwriting a concurrent success). The answer is 500 so that Stripe retries; the
   retry (or ``reprocess_stripe_events``) locks the existing row, runs the handler and marks
   it ``processed``.

Unknown event types are stored ``ignored``. See docs/decisions/0002-inbox-and-ordering.rst for
the alternatives this replaced.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .. import sql
from ..errors import PrerequisiteMissing
from ..models import StripeEvent
from ..stripe_payloads import Event, PayloadError
from . import registry

logger = logging.getLogger(__name__)

Status = StripeEvent.Status
DUPLICATE = "duplicate"
MAX_ERROR_CHARS = 8000

__all__ = ["DUPLICATE", "Outcome", "PrerequisiteMissing", "process_event", "receive"]


@dataclass(frozen=True)
class Outcome:
    event_id: str
    status: str  # processed | ignored | failed | duplicate
    error: str = ""  # as kept in last_error: a traceback for an unexpected failure
    reason: str = ""  # an expected failure's message (PayloadError, PrerequisiteMissing): safe to answer

    @property
    def http_status(self) -> int:
        return 500 if self.status == Status.FAILED else 200


def receive(payload: dict, raw_body: str) -> Outcome:
    """Store and apply one verified event (``payload`` is ``raw_body`` parsed)."""
    event = Event.from_payload(payload)
    handler = registry.handler_for(event.type)
    if handler is None:
        sql.store_event_once(event, raw_body, Status.IGNORED)
        logger.info("stripe event %s %s ignored (no handler)", event.id, event.type)
        return Outcome(event.id, Status.IGNORED)
    return _apply(event, handler, raw_body)


def process_event(event_id: str) -> Outcome:
    """Apply a stored event again (operators, the admin): failed, received or ignored ones.

    A processed event is left alone: applying it twice is exactly what the inbox prevents.
    """
    row = StripeEvent.objects.only("id", "status", "payload", "type").get(pk=event_id)
    if row.status == Status.PROCESSED:
        return Outcome(event_id, DUPLICATE)
    handler = registry.handler_for(row.type)
    if handler is None:
        StripeEvent.objects.filter(pk=event_id).update(status=Status.IGNORED)
        return Outcome(event_id, Status.IGNORED)
    return _apply(Event.from_payload(row.payload), handler, raw_body=None)


def _apply(event: Event, handler: registry.Handler, raw_body: str | None) -> Outcome:
    """Run the handler in the event's transaction; record a failure in a transaction of its own.

    ``raw_body`` is None when the event is already stored (an operator's re-process).
    """
    started = time.perf_counter()
    handler_ran = False
    try:
        with transaction.atomic():
            first_delivery = raw_body is not None and sql.store_event_once(event, raw_body, Status.PROCESSED)
            if not first_delivery:
                stored = StripeEvent.objects.select_for_update().values_list("status", flat=True).get(pk=event.id)
                if stored == Status.PROCESSED:
                    return Outcome(event.id, DUPLICATE)
            handler_ran = True
            handler(event)
            if not first_delivery:
                StripeEvent.objects.filter(pk=event.id).update(
                    status=Status.PROCESSED, attempts=F("attempts") + 1, last_error="", processed_at=timezone.now()
                )
    except Exception as exc:  # noqa: BLE001 - every handler failure is recorded, then answered 500
        if not handler_ran:
            raise  # the inbox itself failed (database down): nothing stored, the view answers 503
        return _failed(event, raw_body, exc)
    logger.info("stripe event %s %s processed in %.1f ms", event.id, event.type, (time.perf_counter() - started) * 1000)
    return Outcome(event.id, Status.PROCESSED)


def _failed(event: Event, raw_body: str | None, exc: Exception) -> Outcome:
    expected = isinstance(exc, (PrerequisiteMissing, PayloadError))
    error = f"{type(exc).__name__}: {exc}" if expected else "".join(traceback.format_exception(exc, limit=8))
    error = error[-MAX_ERROR_CHARS:]
    _record_failure(event, raw_body, error)
    if isinstance(exc, PrerequisiteMissing):
        # Expected when events arrive out of order: no bug, so no traceback. Stripe's retry (or a
        # re-process) applies the event once the prerequisite has arrived.
        logger.warning("stripe event %s %s not applied yet, to be retried: %s", event.id, event.type, exc)
    elif expected:
        logger.warning("stripe event %s %s failed: %s", event.id, event.type, exc)
    else:
        logger.exception("stripe event %s %s failed", event.id, event.type, exc_info=exc)
    return Outcome(event.id, Status.FAILED, error, reason=error if expected else "")


def _record_failure(event: Event, raw_body: str | None, error: str) -> None:
    """Keep the event as ``failed`` (counting the attempt) after its transaction rolled back.

    The row may not exist (it was inserted in the rolled-back transaction), or a concurrent
    delivery may have processed the event meanwhile: that outcome is never overwritten.
    """
    with transaction.atomic():
        if raw_body is not None and sql.store_event_once(event, raw_body, Status.FAILED, error=error):
            return
        row = StripeEvent.objects.select_for_update().get(pk=event.id)
        row.attempts += 1
        if row.status != Status.PROCESSED:
            row.status, row.last_error = Status.FAILED, error
        row.save(update_fields=["attempts", "status", "last_error"])

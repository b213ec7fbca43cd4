"""The app's only hand-written SQL: a few named statements the ORM cannot say, or says slower.

Everything else (handlers, services, admin, API, commands) uses the ORM. A statement is kept
here only when the ORM has no way to say it, or when a benchmark shows that it pays
(docs/decisions/0005-webhook-hot-path-sql.rst gives the figure for each). Each function sends
one statement and runs in the caller's transaction; none commits.
"""

from __future__ import annotations

from django.db import connection
from django.utils import timezone

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

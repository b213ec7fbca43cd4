"""Writing a Stripe snapshot onto its mirrored row: newest snapshot wins, history says why.

Every mirrored row keeps Stripe's ``created`` of the event that last wrote it
(``last_event_created``): an older snapshot is never written over a newer one, whatever order
Stripe delivers them in (docs/decisions/0002-inbox-and-ordering.rst).
"""

from __future__ import annotations

from django.db import models

from .. import sql
from ..stripe_payloads import Event


def older_than_stored(row: models.Model, event: Event) -> bool:
    return row.last_event_created is not None and event.created < row.last_event_created


def save_changed(row: models.Model, values: dict, *, reason: str, extra: tuple[str, ...] = ()) -> set[str]:
    """Set ``values`` on ``row`` and save those that differ (one history row, ``reason``).

    The names of the fields that changed; nothing is written if none did (``extra`` fields are
    saved along with a change but are no change by themselves).
    """
    changed = {name for name, value in values.items() if getattr(row, name) != value}
    if changed:
        for name in changed:
            setattr(row, name, values[name])
        sql.save_with_history(row, [*changed, *extra], reason=reason)
    return changed


def save_snapshot(row: models.Model, values: dict, event: Event) -> set[str]:
    """Write the snapshot ``values`` of ``event`` that differ, and the event's watermark.

    A snapshot that changes nothing moves only the watermark, without a history row: history
    records changes, and a renewal's unchanged snapshots would otherwise fill it.
    """
    row.last_event_created, row.last_event_id = event.created, event.id
    changed = save_changed(row, values, reason=event.type, extra=("last_event_created", "last_event_id"))
    if not changed:
        type(row).objects.filter(pk=row.pk).update(last_event_created=event.created, last_event_id=event.id)
    return changed

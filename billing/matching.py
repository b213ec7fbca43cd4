"""Which renewal an invoice pays for: the one rule, shared by the live handlers and the backfill.

An invoice pays for the renewal of the same subscription whose ``effective_date`` equals the
``period.start`` of the invoice's subscription line: the exact instant first; failing that,
the same UTC calendar date (clock drift, a billing anchor moved by seconds), the nearest in
time winning a tie. See docs/decisions/0001-invoice-to-renewal-matching.rst.

These functions are pure: they take candidates and answer, so the data migration (frozen
models) and the command (bulk SQL) can use them on rows they loaded their own way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

T = TypeVar("T")


def pick_by_instant(candidates: Iterable[tuple[datetime, T]], instant: datetime) -> T | None:
    """The candidate whose datetime matches ``instant``: exact, else same UTC date, nearest."""
    same_day = []
    for when, item in candidates:
        if when is None:
            continue
        if when == instant:
            return item
        if when.date() == instant.date():
            same_day.append((abs((when - instant).total_seconds()), when, item))
    if not same_day:
        return None
    same_day.sort(key=lambda row: (row[0], row[1]))
    return same_day[0][2]


class Decision:
    LINK = "link"
    ALREADY_LINKED = "already_linked"
    CONFLICT = "conflict"
    UNMATCHED = "unmatched"


@dataclass(frozen=True)
class LinkDecision(Generic[T]):
    outcome: str
    renewal: T | None = None


def decide_link(
    renewals: Iterable[tuple[datetime, str | None, T]],
    invoice_id: str,
    period_start: datetime | None,
    invoice_already_linked: bool,
) -> LinkDecision[T]:
    """Decide what linking ``invoice_id`` (paying from ``period_start``) to a renewal means.

    ``renewals`` are (effective_date, stripe_invoice_id, renewal) of the invoice's subscription.
    A renewal linked to another invoice never changes its link: that is a CONFLICT.
    """
    if period_start is None:
        return LinkDecision(Decision.UNMATCHED)
    renewal_rows = list(renewals)
    for _, linked_id, renewal in renewal_rows:
        if linked_id == invoice_id:
            return LinkDecision(Decision.ALREADY_LINKED, renewal)
    if invoice_already_linked:
        return LinkDecision(Decision.ALREADY_LINKED)
    match = pick_by_instant(((when, (linked_id, r)) for when, linked_id, r in renewal_rows), period_start)
    if match is None:
        return LinkDecision(Decision.UNMATCHED)
    linked_id, renewal = match
    if linked_id:
        return LinkDecision(Decision.CONFLICT, renewal)
    return LinkDecision(Decision.LINK, renewal)


def utc_day(instant: datetime) -> tuple[datetime, datetime]:
    """[start, end) of ``instant``'s UTC calendar date: "the same UTC date" as a range an index can use."""
    start = instant.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)

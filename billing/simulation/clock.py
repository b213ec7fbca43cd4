"""The simulation's dates: calendar months, where a lifecycle starts, and making one end on time.

Stripe's monthly periods follow the calendar from the billing cycle anchor (a 31st bills on the
last day of shorter months): https://docs.stripe.com/billing/subscriptions/billing-cycle
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

DAY = 24 * 3600


class Told(Protocol):
    """A story told from some beginning: ``last`` is the time of its last event."""

    last: int


def add_months(anchor: int, months: int) -> int:
    """``anchor`` moved by whole calendar months, the day clamped to the month's last day."""
    moment = datetime.fromtimestamp(anchor, tz=UTC)
    years, month_index = divmod(moment.month - 1 + months, 12)
    year, month = moment.year + years, month_index + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def default_start(seed: int) -> int:
    """A fixed instant in the first half of 2026, the same for the same seed."""
    jan_2026 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    return jan_2026 + random.Random(f"start:{seed}").randrange(180 * DAY)


def told_to_end_at(tell: Callable[[int], Told], last: int) -> Told:
    """The story, told from the latest beginning that puts its last event at ``last`` or before.

    A story's length depends a little on its dates (months have 28 to 31 days), so it is told
    again, moved by the distance still to go (it usually lands at the second try), halving the
    range of beginnings known to end early and late whenever a guess falls outside it.
    """
    early, late = last - 400 * DAY, last  # no story lasts a year: from ``early`` it ends early
    kept = tell(early)
    begin = early + (last - kept.last)
    while late - early > 1:
        if not early < begin < late:
            begin = (early + late) // 2
        story = tell(begin)
        if story.last <= last:
            early, kept = begin, story
            if story.last == last:
                break
        else:
            late = begin
        begin += last - story.last
    return kept

"""Reads the SaaS makes: what may this account use now?

The rule for "the entitlement in force" lives here once (``in_force``): paid before trial,
then most seats, then the latest start. The admin annotates lists of accounts with the same
queryset instead of restating it.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Case, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.utils import timezone

from .models import Account, Entitlement

_PAID_FIRST = Case(When(kind=Entitlement.Kind.PAID, then=Value(0)), default=Value(1), output_field=IntegerField())


def in_force(at: datetime, account=None) -> QuerySet[Entitlement]:
    """Entitlements in force at ``at``, best first; ``account`` may be an account or OuterRef."""
    entitlements = Entitlement.objects.filter(starts_at__lte=at, expires_at__gt=at)
    if account is not None:
        entitlements = entitlements.filter(account=account)
    return entitlements.order_by(_PAID_FIRST, "-seats", "-starts_at")


def current_entitlement(account: Account, at: datetime | None = None) -> Entitlement | None:
    """The entitlement in force at ``at`` (default now)."""
    return in_force(at or timezone.now(), account).first()


def is_paid_up(account: Account, at: datetime | None = None) -> bool:
    entitlement = current_entitlement(account, at)
    return entitlement is not None and entitlement.kind == Entitlement.Kind.PAID


def with_current_entitlement(accounts: QuerySet[Account], at: datetime) -> QuerySet[Account]:
    """Accounts annotated with ``current_kind``, ``current_seats``, ``current_until`` in one query."""
    best = in_force(at, OuterRef("pk"))
    return accounts.annotate(
        current_kind=Subquery(best.values("kind")[:1]),
        current_seats=Subquery(best.values("seats")[:1]),
        current_until=Subquery(best.values("expires_at")[:1]),
    )

"""Reads the SaaS makes: what may this account use now?"""
from __future__ import annotations

from datetime import datetime

from django.db.models import Case, IntegerField, Value, When
from django.utils import timezone

from .models import Account, Entitlement


def current_entitlement(account: Account, at: datetime | None = None) -> Entitlement | None:
    """The entitlement in force at ``at`` (default now): paid before trial, then most seats."""
    at = at or timezone.now()
    paid_first = Case(When(kind=Entitlement.Kind.PAID, then=Value(0)), default=Value(1), output_field=IntegerField())
    return (
        Entitlement.objects.filter(account=account, starts_at__lte=at, expires_at__gt=at)
        .order_by(paid_first, "-seats", "-starts_at")
        .first()
    )


def is_paid_up(account: Account, at: datetime | None = None) -> bool:
    entitlement = current_entitlement(account, at)
    return entitlement is not None and entitlement.kind == Entitlement.Kind.PAID

"""Renewals: planned ahead, linked to the invoice that pays for them, processed exactly once.

A renewal and its invoice are linked from both sides, by the one rule of ``billing.matching``
(docs/decisions/0001-invoice-to-renewal-matching.rst): when the invoice arrives
(``link_invoice_to_renewal``) and when the renewal is created (``link_renewal_to_invoice``),
so the link does not depend on which came first. The callers hold the account's lock, which
every writer of a subscription's renewals holds.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import Q

from .. import matching, sql
from ..models import Invoice, Renewal, Subscription

logger = logging.getLogger(__name__)


def ensure_renewal(sub: Subscription, effective_date: datetime) -> Renewal:
    """The renewal of ``sub`` effective at ``effective_date`` (by the matching rule), created if absent.

    A renewal created here is linked at once to an invoice of its date that arrived before it.
    """
    planned = Renewal(subscription=sub, effective_date=effective_date)
    if sql.plan_renewal(planned):  # nothing on that day yet: the common case, one statement
        return planned
    start, end = matching.utc_day(effective_date)
    same_day = Renewal.objects.filter(subscription=sub, effective_date__gte=start, effective_date__lt=end)
    renewal = matching.pick_by_instant(((r.effective_date, r) for r in same_day), effective_date)
    if renewal is None:  # stepped aside for an invoice of that day that waits: link it
        sql.create_with_history(planned, reason=None)
        link_renewal_to_invoice(planned)
        renewal = planned
    return renewal


def link_renewal_to_invoice(renewal: Renewal) -> None:
    """Link a new renewal to an invoice that arrived before it (the same rule, seen from the renewal)."""
    start, end = matching.utc_day(renewal.effective_date)
    linked = Renewal.objects.filter(subscription_id=renewal.subscription_id, stripe_invoice_id__isnull=False)
    candidates = Invoice.objects.filter(
        subscription_id=renewal.subscription_id, period_start__gte=start, period_start__lt=end
    ).exclude(stripe_id__in=linked.values("stripe_invoice_id"))
    invoice = matching.pick_by_instant(((i.period_start, i) for i in candidates), renewal.effective_date)
    if invoice is not None:
        _link(renewal, invoice)


def link_invoice_to_renewal(invoice: Invoice, candidates: list[Renewal] | None = None) -> Renewal | None:
    """Link ``invoice`` to the renewal it pays for; the renewal (linked before or now), or None.

    A renewal already linked to another invoice keeps its link: the conflict is logged and
    that renewal is returned so the caller can decide (DESIGN: a linked renewal never changes).
    ``candidates``: the renewals that decide the link, when the caller has read them (by the
    matching rule, the one linked to the invoice and the one effective at the exact start of its
    period win over any other); otherwise every renewal that could match is read here.
    """
    if invoice.subscription_id is None or invoice.period_start is None:
        return None
    if candidates is None:
        start, end = matching.utc_day(invoice.period_start)
        candidates = Renewal.objects.filter(
            Q(effective_date__gte=start, effective_date__lt=end) | Q(stripe_invoice_id=invoice.stripe_id),
            subscription_id=invoice.subscription_id,
        )
    decision = matching.decide_link(
        ((r.effective_date, r.stripe_invoice_id, r) for r in candidates),
        invoice.stripe_id,
        invoice.period_start,
        invoice_already_linked=False,
    )
    renewal = decision.renewal
    if decision.outcome == matching.Decision.LINK:
        _link(renewal, invoice)
    elif decision.outcome == matching.Decision.CONFLICT:
        logger.warning(
            "renewal %s is linked to %s; ignoring conflicting invoice %s",
            renewal.pk,
            renewal.stripe_invoice_id,
            invoice.stripe_id,
        )
    return renewal


def _link(renewal: Renewal, invoice: Invoice) -> None:
    renewal.stripe_invoice_id = invoice.stripe_id
    sql.save_with_history(renewal, ["stripe_invoice_id"], reason=f"linked to {invoice.stripe_id}")


def relink_renewal_entitlements(sub: Subscription, processing: tuple[Renewal, datetime, str] | None = None) -> None:
    """Each processed renewal moves from the window before it to the paid window it starts.

    ``processing`` (renewal, processed_at, reason): that renewal is marked processed in the
    same write as its links, so its history shows one change, with the reason. One UPDATE
    (``billing.sql.relink_renewal_entitlements`` says what it decides, and why it is SQL).
    """
    if processing is None:
        sql.relink_renewal_entitlements(sub)
        return
    renewal, processed_at, reason = processing
    sql.relink_renewal_entitlements(sub, processing=(renewal.pk, processed_at, reason))
    renewal.processed_at = processed_at

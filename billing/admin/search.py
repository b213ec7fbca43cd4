"""Finding rows by a pasted Stripe id: ``cus_``, ``sub_``, ``in_``, ``pi_``, ``ch_``, ``re_``, ``dp_``, ``evt_``.

Support pastes whatever id a customer or Stripe's dashboard gave them into any list's search
box. A term shaped like a Stripe id (``<kind>_<letters and digits>``) whose kind the list knows
is matched *exactly* (Stripe ids are case-sensitive) on the columns that hold ids of that kind,
each served by an index; any other term is the list's text search (names, e-mails, numbers).

A list declares, in its admin:

* ``stripe_id_fields``: kind -> the fields holding such ids (``{"cus": ("stripe_customer_id",)}``);
* ``invoice_id_field``: the path to the row's invoice id, if it has one. A payment, charge,
  refund or dispute id then finds the rows of the invoice it paid (through ``Payment``).

An event id finds what the event is about: the rows of its object, and (where the list has no
row of that object's kind) those of the customer or invoice it belongs to
(``billing.models.event_owner``).
"""

from __future__ import annotations

import re

from django.db.models import Q

from ..models import Dispute, Payment, Refund, StripeEvent, event_owner

# A Stripe id: its kind, "_", then letters, digits and "_" (checkout sessions: cs_test_a1...).
STRIPE_ID = re.compile(r"(?P<kind>[a-z]+)_[A-Za-z0-9_]+")
# What a payment-side id finds an invoice through.
PAYMENT_SIDE_KINDS = ("pi", "ch", "re", "dp")


def stripe_id_kind(term: str) -> str | None:
    """``"cus"`` for ``"cus_NffrFeUfNV2Hib"``; None for a term that is not shaped like a Stripe id."""
    match = STRIPE_ID.fullmatch(term)
    return match["kind"] if match else None


def invoice_ids_paid_by(kind: str, stripe_id: str):
    """The ids of the invoices that the PaymentIntent, charge, refund or dispute ``stripe_id`` is about."""
    if kind == "dp":
        payments = Dispute.objects.filter(stripe_id=stripe_id).payments()
    elif kind == "re":
        payments = Refund.objects.filter(stripe_id=stripe_id).payments()
    else:  # pi, ch
        payments = Payment.objects.filter(Q(payment_intent_id=stripe_id) | Q(charge_id=stripe_id))
    return payments.exclude(stripe_invoice_id="").values("stripe_invoice_id")


class StripeIdSearchMixin:
    """The search box of a list: a Stripe id exactly (see the module), anything else as text."""

    stripe_id_fields: dict[str, tuple[str, ...]] = {}
    invoice_id_field: str | None = None
    search_help_text = "A name, an e-mail, or any Stripe id (cus_, sub_, in_, pi_, ch_, re_, dp_, evt_)."

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        kind = stripe_id_kind(term)
        condition = self.stripe_id_condition(kind, term) if kind else None
        if condition is None:
            return super().get_search_results(request, queryset, search_term)
        # One subquery of primary keys: rows reached through several related rows appear once.
        matching = self.model._default_manager.filter(condition).values("pk")
        return queryset.filter(pk__in=matching), False

    def stripe_id_condition(self, kind: str, stripe_id: str) -> Q | None:
        """The rows a ``kind`` id finds on this list, or None if the list knows no such id."""
        if kind in self.stripe_id_fields:
            return _any_equal(self.stripe_id_fields[kind], stripe_id)
        if kind == "in" and self.invoice_id_field:
            return Q(**{self.invoice_id_field: stripe_id})
        if kind in PAYMENT_SIDE_KINDS and self.invoice_id_field:
            return Q(**{f"{self.invoice_id_field}__in": invoice_ids_paid_by(kind, stripe_id)})
        if kind == "evt":
            return self.event_condition(stripe_id)
        return None

    def event_condition(self, event_id: str) -> Q | None:
        """The rows an event is about: its object's, else its owner's (customer or invoice)."""
        event = (
            StripeEvent.objects.filter(id=event_id).annotate(owner=event_owner()).values("object_id", "owner").first()
        )
        if event is None:
            return Q(pk__in=[])  # an id of the right shape that names no event: nothing found
        for related_id in (event["object_id"], event["owner"]):
            kind = stripe_id_kind(related_id or "")
            if kind and kind != "evt":
                condition = self.stripe_id_condition(kind, related_id)
                if condition is not None:
                    return condition
        return Q(pk__in=[])


def _any_equal(fields, value) -> Q:
    condition = Q()
    for field in fields:
        condition |= Q(**{field: value})
    return condition

"""Disputes: read-only mirrors, and the table of them shown on an invoice's and an account's page.

A dispute names only its charge and PaymentIntent; its invoice and account are found through the
payment when a page is shown (``Dispute.objects.for_invoice`` / ``.for_account``,
docs/decisions/0006-disputes.rst), so a payment or invoice delivered after the dispute still
shows it.
"""

from django.contrib import admin
from django.db.models import Q
from django.utils.html import format_html_join

from ..models import Dispute, Invoice, Payment
from ..money import format_amount
from .base import SYNC_FIELDS, StripeMirrorAdmin
from .display import admin_link, money_display, stripe_dashboard_link, table, when, when_display
from .search import stripe_id_kind


def disputes_table(disputes):
    """A read-only table of ``disputes``, each linked to its admin page; None when there are none."""
    rows = [
        (
            admin_link(d),
            format_amount(d.amount, d.currency),
            d.get_status_display(),
            d.reason or "-",
            when(d.evidence_due_by),
        )
        for d in disputes
    ]
    return table("disputes", ("dispute", "amount", "status", "reason", "evidence due by"), rows)


@admin.register(Dispute)
class DisputeAdmin(StripeMirrorAdmin):
    """Disputes as Stripe last described them; evidence is submitted in Stripe's dashboard.

    Found by its own id, its charge's or PaymentIntent's, and by the invoice (id or number) or
    customer its payment leads to.
    """

    stripe_dashboard_path = "disputes"
    list_display = ("stripe_id", "amount_display", "status", "reason", "evidence_due")
    list_filter = ("status", "reason")
    search_fields = ("reason",)
    search_help_text = "A Stripe id (dp_, ch_, pi_, in_, cus_, evt_), an invoice number or a reason."
    stripe_id_fields = {"dp": ("stripe_id",), "ch": ("charge_id",), "pi": ("payment_intent_id",)}
    readonly_fields = ("amount_display", "charge", "payments", "invoices", "accounts")
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "status", "reason", "amount_display", "evidence_due_by")}),
        ("What is disputed", {"fields": ("charge", "payment_intent_id", "is_charge_refundable")}),
        ("Found through its payment", {"fields": ("payments", "invoices", "accounts")}),
        ("Sync", {"fields": SYNC_FIELDS}),
    )

    amount_display = money_display("amount")
    evidence_due = when_display("evidence_due_by", "evidence due by")

    def stripe_id_condition(self, kind, stripe_id):
        """Also the disputes of an invoice's or a customer's payments (``in_``, ``cus_``)."""
        condition = super().stripe_id_condition(kind, stripe_id)
        if condition is not None or kind not in ("in", "cus"):
            return condition
        field = "stripe_id" if kind == "in" else "account__stripe_customer_id"
        return _of_invoices(Invoice.objects.filter(**{field: stripe_id}))

    def get_search_results(self, request, queryset, search_term):
        """An invoice's number finds the disputes of its payments too."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term and stripe_id_kind(term) is None:
            found |= queryset.filter(_of_invoices(Invoice.objects.filter(number=term)))
        return found, may_have_duplicates

    @admin.display(description="charge")
    def charge(self, dispute):
        return stripe_dashboard_link("payments", dispute.charge_id, dispute.livemode)

    @admin.display(description="payments in this app")
    def payments(self, dispute):
        return _links(dispute.payments())

    @admin.display(description="invoices")
    def invoices(self, dispute):
        return _links(self._invoices(dispute))

    @admin.display(description="accounts")
    def accounts(self, dispute):
        return _links({invoice.account for invoice in self._invoices(dispute)})

    def _invoices(self, dispute):
        """``dispute.invoices()``, read once per page (the invoices and accounts fields show them)."""
        if not hasattr(dispute, "_invoices_shown"):
            dispute._invoices_shown = list(dispute.invoices())
        return dispute._invoices_shown


def _of_invoices(invoices) -> Q:
    payments = Payment.objects.filter(stripe_invoice_id__in=invoices.values("stripe_id"))
    return Q(pk__in=Dispute.objects.of_payments(payments).values("pk"))


def _links(rows):
    links = [(admin_link(row),) for row in rows]
    return format_html_join(", ", "{}", links) or None

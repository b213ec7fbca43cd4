"""Disputes: read-only mirrors, and the table of them shown on an invoice's and an account's page.

A dispute names only its charge and PaymentIntent; its invoice and account are found through the
payment when a page is shown (``Dispute.objects.for_invoice`` / ``.for_account``,
docs/decisions/0006-disputes.rst), so a payment or invoice delivered after the dispute still
shows it.
"""

from django.contrib import admin
from django.db.models import Q
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from ..models import Dispute, Invoice, Payment
from ..money import format_amount
from .base import SYNC_FIELDS, StripeMirrorAdmin, admin_link, money_display, stripe_dashboard_link

_TABLE = (
    "<table><thead><tr><th>dispute</th><th>amount</th><th>status</th><th>reason</th><th>evidence due by</th>"
    "</tr></thead><tbody>{}</tbody></table>"
)


def evidence_due(dispute: Dispute) -> str:
    if dispute.evidence_due_by is None:
        return "-"
    return f"{timezone.localtime(dispute.evidence_due_by):%Y-%m-%d %H:%M}"


def disputes_table(disputes):
    """A read-only table of ``disputes``, each linked to its admin page; None when there are none."""
    rows = [
        (
            admin_link(d),
            format_amount(d.amount, d.currency),
            d.get_status_display(),
            d.reason or "-",
            evidence_due(d),
        )
        for d in disputes
    ]
    if not rows:
        return None
    cells = "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"
    return format_html(_TABLE, format_html_join("", cells, rows))


def invoice_ids_disputed_by(term: str):
    """The Stripe ids of the invoices paid by what the dispute ``term`` (its ``dp_`` id) is about."""
    return Dispute.objects.filter(stripe_id__iexact=term).payments().values("stripe_invoice_id")


@admin.register(Dispute)
class DisputeAdmin(StripeMirrorAdmin):
    """Disputes as Stripe last described them; evidence is submitted in Stripe's dashboard.

    Found by its own id, its charge's or PaymentIntent's, and by the invoice (id or number) or
    customer its payment leads to.
    """

    stripe_dashboard_path = "disputes"
    list_display = (
        "stripe_id",
        "amount_display",
        "status",
        "reason",
        "evidence_due_by",
        "charge_id",
        "payment_intent_id",
        "stripe_created",
    )
    list_filter = ("status", "reason")
    search_fields = ("=stripe_id", "=charge_id", "=payment_intent_id")
    readonly_fields = ("amount_display", "charge", "payments", "invoices", "accounts")
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "status", "reason", "amount_display", "evidence_due_by")}),
        ("What is disputed", {"fields": ("charge", "payment_intent_id", "is_charge_refundable")}),
        ("Found through its payment", {"fields": ("payments", "invoices", "accounts")}),
        ("Sync", {"fields": SYNC_FIELDS}),
    )

    amount_display = money_display("amount")

    def get_search_results(self, request, queryset, search_term):
        """Also the disputes of an invoice (``in_...`` or its number) or a customer (``cus_...``)."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if not term:
            return found, may_have_duplicates
        invoices = Invoice.objects.filter(
            Q(stripe_id__iexact=term) | Q(number__iexact=term) | Q(account__stripe_customer_id__iexact=term)
        )
        payments = Payment.objects.filter(stripe_invoice_id__in=invoices.values("stripe_id"))
        via_invoice = queryset.filter(pk__in=Dispute.objects.of_payments(payments).values("pk"))
        return found | via_invoice, may_have_duplicates

    @admin.display(description="charge")
    def charge(self, dispute):
        return stripe_dashboard_link("payments", dispute.charge_id)

    @admin.display(description="payments in this app")
    def payments(self, dispute):
        return _links(dispute.payments())

    @admin.display(description="invoices")
    def invoices(self, dispute):
        return _links(dispute.invoices())

    @admin.display(description="accounts")
    def accounts(self, dispute):
        return _links({invoice.account for invoice in dispute.invoices()})


def _links(rows):
    links = [(admin_link(row),) for row in rows]
    return format_html_join(", ", "{}", links) or None

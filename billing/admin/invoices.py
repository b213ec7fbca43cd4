"""Invoices, their lines, and the disputes of the payments that paid them."""

from django.contrib import admin

from ..models import Dispute, Invoice, InvoiceLineItem
from .base import SYNC_FIELDS, ReadOnlyInline, StripeMirrorAdmin, admin_link, money_display
from .disputes import disputes_table, invoice_ids_disputed_by


class InvoiceLineItemInline(ReadOnlyInline):
    model = InvoiceLineItem
    fields = ("stripe_id", "description", "amount_display", "quantity", "period_start", "period_end", "proration")
    show_change_link = False  # lines have no admin of their own
    amount_display = money_display("amount")


@admin.register(Invoice)
class InvoiceAdmin(StripeMirrorAdmin):
    stripe_dashboard_path = "invoices"
    list_display = (
        "stripe_id",
        "number",
        "account_link",
        "status",
        "billing_reason",
        "total_display",
        "amount_due_display",
        "paid_at",
        "stripe_created",
    )
    list_select_related = ("account",)
    list_filter = ("status", "billing_reason", "currency")
    search_fields = (
        "=stripe_id",
        "number",
        "=account__stripe_customer_id",
        "customer_email",
        "=stripe_subscription_id",
    )
    amount_fields = (
        "total_display",
        "amount_due_display",
        "amount_paid_display",
        "amount_remaining_display",
        "amount_refunded_display",
    )
    readonly_fields = (*amount_fields, "disputes")
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "number", "status", "billing_reason", "account", "customer_email")}),
        (
            "Subscription",
            {"fields": ("subscription", "stripe_subscription_id", "period_start", "period_end", "line_quantity")},
        ),
        ("Amounts", {"fields": amount_fields}),
        ("Payment and receipt", {"fields": ("paid_at", "receipt_sent_at", "hosted_invoice_url", "invoice_pdf")}),
        ("Disputes", {"fields": ("disputes",)}),
        ("Sync", {"fields": SYNC_FIELDS}),
    )
    inlines = (InvoiceLineItemInline,)

    total_display = money_display("total")
    amount_due_display = money_display("amount_due", "amount due")
    amount_paid_display = money_display("amount_paid", "amount paid")
    amount_remaining_display = money_display("amount_remaining", "amount remaining")
    amount_refunded_display = money_display("amount_refunded", "amount refunded")

    @admin.display(description="account", ordering="account__name")
    def account_link(self, invoice):
        return admin_link(invoice.account)

    def get_search_results(self, request, queryset, search_term):
        """Also the invoice that a dispute (``dp_...``) is about."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term.lower().startswith("dp_"):
            found |= queryset.filter(stripe_id__in=invoice_ids_disputed_by(term))
        return found, may_have_duplicates

    @admin.display(description="disputes of its payments")
    def disputes(self, invoice):
        return disputes_table(Dispute.objects.for_invoice(invoice))

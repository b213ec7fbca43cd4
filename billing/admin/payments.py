"""Money movements: which PaymentIntent paid which invoice, and its refunds."""

from django.contrib import admin
from django.db.models import Q

from ..models import Payment, Refund
from .base import StripeMirrorAdmin
from .display import admin_link, money_display, when_display


@admin.register(Payment)
class PaymentAdmin(StripeMirrorAdmin):
    stripe_id_field = "payment_intent_id"
    stripe_dashboard_path = "payments"
    list_display = ("payment_intent_id", "invoice_link", "charge_id", "refunded_display", "updated")
    list_select_related = ("invoice",)
    search_fields = ("invoice__number",)
    search_help_text = "A Stripe id (pi_, ch_, in_, cus_, re_, dp_, evt_) or an invoice number."
    stripe_id_fields = {
        "pi": ("payment_intent_id",),
        "ch": ("charge_id",),
        "cus": ("invoice__account__stripe_customer_id",),
    }
    invoice_id_field = "stripe_invoice_id"  # in_, and re_ / dp_ through the invoice they are about
    readonly_fields = ("refunded_display",)

    refunded_display = money_display("charge_amount_refunded", "refunded")
    updated = when_display("updated_at", "updated")

    @admin.display(description="invoice", ordering="invoice__number")
    def invoice_link(self, payment):
        return admin_link(payment.invoice) or payment.stripe_invoice_id or None


@admin.register(Refund)
class RefundAdmin(StripeMirrorAdmin):
    stripe_dashboard_path = "refunds"
    list_display = ("stripe_id", "amount_display", "status", "payment_intent_id", "recorded")
    list_filter = ("status",)
    search_fields = ("status",)
    search_help_text = "A Stripe id (re_, pi_, ch_, in_, cus_, evt_) or a status."
    stripe_id_fields = {"re": ("stripe_id",), "pi": ("payment_intent_id",), "ch": ("charge_id",)}
    readonly_fields = ("amount_display",)

    amount_display = money_display("amount")
    recorded = when_display("created_at", "recorded")

    def stripe_id_condition(self, kind, stripe_id):
        """Also the refunds of an invoice's or a customer's payments (``in_``, ``cus_``)."""
        condition = super().stripe_id_condition(kind, stripe_id)
        if condition is not None or kind not in ("in", "cus"):
            return condition
        field = "stripe_invoice_id" if kind == "in" else "invoice__account__stripe_customer_id"
        payments = Payment.objects.filter(**{field: stripe_id})
        return _refunds_of(payments)


def _refunds_of(payments) -> Q:
    return Q(pk__in=Refund.objects.of_payments(payments).values("pk"))

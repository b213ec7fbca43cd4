"""Money movements: which PaymentIntent paid which invoice, and its refunds."""

from django.contrib import admin

from ..models import Payment, Refund
from .base import StripeMirrorAdmin, money_display


@admin.register(Payment)
class PaymentAdmin(StripeMirrorAdmin):
    stripe_id_field = "payment_intent_id"
    stripe_dashboard_path = "payments"
    list_display = ("payment_intent_id", "invoice", "stripe_invoice_id", "charge_id", "refunded_display", "updated_at")
    list_select_related = ("invoice",)
    search_fields = ("=payment_intent_id", "=charge_id", "=stripe_invoice_id", "=invoice__number")
    readonly_fields = ("refunded_display",)

    refunded_display = money_display("charge_amount_refunded", "refunded")


@admin.register(Refund)
class RefundAdmin(StripeMirrorAdmin):
    stripe_dashboard_path = "refunds"
    list_display = ("stripe_id", "amount_display", "status", "payment_intent_id", "charge_id", "created_at")
    list_filter = ("status",)
    search_fields = ("=stripe_id", "=payment_intent_id", "=charge_id")
    readonly_fields = ("amount_display",)

    amount_display = money_display("amount")

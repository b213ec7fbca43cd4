"""Subscriptions and the renewals planned for them (matching rule: docs/decisions/0001)."""

from django.contrib import admin
from django.db.models import Q
from simple_history.admin import SimpleHistoryAdmin

from ..models import Invoice, Renewal, Subscription
from .base import ReadOnlyInline, StripeMirrorAdmin, WebhookOwnedAdminMixin, admin_link, money_display


class RenewalInline(ReadOnlyInline):
    model = Renewal
    fields = ("effective_date", "stripe_invoice_id", "processed_at", "from_entitlement", "to_entitlement")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("from_entitlement", "to_entitlement")


class SubscriptionInvoiceInline(ReadOnlyInline):
    model = Invoice
    fields = ("number", "status", "billing_reason", "total_display", "period_start", "period_end", "paid_at")
    total_display = money_display("total")
    verbose_name_plural = "invoices"


@admin.register(Subscription)
class SubscriptionAdmin(StripeMirrorAdmin):
    stripe_dashboard_path = "subscriptions"
    list_display = (
        "stripe_id",
        "account_link",
        "status",
        "quantity",
        "current_period_end",
        "trial_end",
        "cancel_at_period_end",
        "updated_at",
    )
    list_select_related = ("account",)
    list_filter = ("status", "cancel_at_period_end")
    search_fields = ("=stripe_id", "=account__stripe_customer_id", "account__name", "account__billing_email")
    inlines = (RenewalInline, SubscriptionInvoiceInline)

    @admin.display(description="account", ordering="account__name")
    def account_link(self, subscription):
        return admin_link(subscription.account)


# --- Renewals ----------------------------------------------------------------------------


class RenewalProcessedFilter(admin.SimpleListFilter):
    title = "processed"
    parameter_name = "processed"

    def lookups(self, request, model_admin):
        return (("yes", "Processed"), ("no", "Not processed"))

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(processed_at__isnull=self.value() == "no")
        return queryset


class RenewalLinkedFilter(admin.SimpleListFilter):
    title = "linked to an invoice"
    parameter_name = "linked"

    def lookups(self, request, model_admin):
        return (("yes", "Linked"), ("no", "Not linked"))

    def queryset(self, request, queryset):
        unlinked = Q(stripe_invoice_id__isnull=True) | Q(stripe_invoice_id="")
        if self.value() == "yes":
            return queryset.exclude(unlinked)
        if self.value() == "no":
            return queryset.filter(unlinked)
        return queryset


@admin.register(Renewal)
class RenewalAdmin(WebhookOwnedAdminMixin, SimpleHistoryAdmin):
    """Renewals are planned by provisioning and linked by handlers (matching rule: ADR 0001)."""

    list_display = ("subscription", "effective_date", "stripe_invoice_id", "processed_at")
    list_select_related = ("subscription",)
    list_filter = (RenewalProcessedFilter, RenewalLinkedFilter)
    search_fields = ("=subscription__stripe_id", "=stripe_invoice_id")
    readonly_fields = ("invoice",)

    @admin.display(description="invoice in this app")
    def invoice(self, renewal):
        if not renewal.stripe_invoice_id:
            return None
        return admin_link(Invoice.objects.filter(stripe_id=renewal.stripe_invoice_id).first())

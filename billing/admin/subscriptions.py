"""Subscriptions and the renewals planned for them (matching rule: docs/decisions/0001); re-sync."""

from django.contrib import admin, messages
from django.db.models import Q
from simple_history.admin import SimpleHistoryAdmin

from ..models import Invoice, Renewal, Subscription
from ..services.resync import ResyncFailed, resync_subscription
from .actions import resync_message, support_action
from .base import ReadOnlyInline, StripeMirrorAdmin, WebhookOwnedAdminMixin
from .display import account_display, admin_link, money_display, when_display


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
    list_display = ("stripe_id", "account_link", "status", "seats", "period_end", "cancels")
    list_select_related = ("account",)
    list_filter = ("status", "cancel_at_period_end")
    search_fields = ("account__name", "account__billing_email")
    stripe_id_fields = {"sub": ("stripe_id",), "cus": ("account__stripe_customer_id",)}
    invoice_id_field = "invoices__stripe_id"  # in_, pi_, ch_, re_, dp_: the subscription it paid for
    inlines = (RenewalInline, SubscriptionInvoiceInline)
    support_actions = ("resync",)

    account_link = account_display()

    period_end = when_display("current_period_end", "period ends")

    @admin.display(description="seats", ordering="quantity")
    def seats(self, subscription):
        return subscription.quantity

    @admin.display(description="cancels", boolean=True, ordering="cancel_at_period_end")
    def cancels(self, subscription):
        """Whether it cancels at the end of its current period."""
        return subscription.cancel_at_period_end

    def support_action_note(self, name, subscription):
        return f"{subscription.get_status_display().lower()}, {subscription.quantity} seat(s)"

    @support_action(
        label="Re-sync from Stripe",
        permission="billing.resync_subscription",
        explanation=(
            "Each subscription is fetched from Stripe's API and applied as the newest snapshot, through the same "
            "services as its events: its entitlements and renewals follow."
        ),
        max_rows=20,
    )
    def resync(self, request, subscription):
        try:
            return resync_message("Subscription", resync_subscription(subscription.stripe_id))
        except ResyncFailed as exc:
            return messages.ERROR, f"Subscription {subscription.stripe_id} was not re-synced: {exc}"


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

    list_display = ("subscription", "effective", "stripe_invoice_id", "processed")
    list_select_related = ("subscription",)
    list_filter = (RenewalProcessedFilter, RenewalLinkedFilter)
    search_fields = ("subscription__account__name",)
    stripe_id_fields = {"sub": ("subscription__stripe_id",), "cus": ("subscription__account__stripe_customer_id",)}
    invoice_id_field = "stripe_invoice_id"
    readonly_fields = ("invoice",)

    effective = when_display("effective_date", "effective")
    processed = when_display("processed_at", "processed")

    @admin.display(description="invoice in this app")
    def invoice(self, renewal):
        if not renewal.stripe_invoice_id:
            return None
        return admin_link(Invoice.objects.filter(stripe_id=renewal.stripe_invoice_id).first())

"""Admin of accounts and what they are entitled to: where support starts looking for a customer.

An account is found by its name, its billing or members' e-mail, or any Stripe id that belongs to
it (customer, subscription, invoice). Its Stripe-owned fields and its entitlements are read-only:
webhook handlers write them (see ``billing.admin`` for why).
"""
from django.contrib import admin
from django.utils import timezone
from simple_history.admin import SimpleHistoryAdmin

from billing.admin import ReadOnlyInline, StripeMirrorAdmin, WebhookOwnedAdminMixin, admin_link
from billing.models import Subscription

from .models import Account, Entitlement, Membership
from .selectors import with_current_entitlement


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)


class EntitlementInline(ReadOnlyInline):
    model = Entitlement
    fields = ("kind", "seats", "starts_at", "expires_at", "stripe_subscription_id", "stripe_invoice_id")
    ordering = ("-starts_at", "-pk")  # the window that matters now first


class SubscriptionInline(ReadOnlyInline):
    model = Subscription
    fields = ("stripe_id", "status", "quantity", "current_period_end", "trial_end", "cancel_at_period_end")


@admin.register(Account)
class AccountAdmin(StripeMirrorAdmin):
    """Accounts: support edits the name and billing e-mail; Stripe owns the rest.

    An account added here has no Stripe customer yet: checkout links it (its primary key is the
    session's ``client_reference_id``).
    """

    editable_fields = ("name", "billing_email")
    stripe_id_field = "stripe_customer_id"
    stripe_dashboard_path = "customers"
    list_display = ("name", "stripe_customer_id", "billing_email", "current_entitlement", "created_at")
    search_fields = (
        "name",
        "=stripe_customer_id",
        "billing_email",
        "memberships__user__email",
        "=subscriptions__stripe_id",
        "=invoices__stripe_id",
        "invoices__number",
    )
    readonly_fields = ("current_entitlement",)
    inlines = (MembershipInline, EntitlementInline, SubscriptionInline)

    def get_queryset(self, request):
        return with_current_entitlement(super().get_queryset(request), timezone.now())

    @admin.display(description="current entitlement", ordering="current_until")
    def current_entitlement(self, account):
        if getattr(account, "current_kind", None) is None:
            return None
        until = timezone.localtime(account.current_until)
        return f"{account.current_kind}, {account.current_seats} seat(s), until {until:%Y-%m-%d %H:%M}"


@admin.register(Membership)
class MembershipAdmin(SimpleHistoryAdmin):
    list_display = ("user", "account", "role", "created_at")
    list_select_related = ("user", "account")
    list_filter = ("role",)
    search_fields = ("user__email", "user__username", "account__name", "=account__stripe_customer_id")
    autocomplete_fields = ("user", "account")


@admin.register(Entitlement)
class EntitlementAdmin(WebhookOwnedAdminMixin, SimpleHistoryAdmin):
    """Entitlements are granted by billing handlers through provisioning.services only."""

    list_display = (
        "account_link",
        "kind",
        "seats",
        "starts_at",
        "expires_at",
        "stripe_subscription_id",
        "stripe_invoice_id",
    )
    list_select_related = ("account",)
    list_filter = ("kind",)
    search_fields = ("account__name", "=stripe_subscription_id", "=stripe_invoice_id")
    date_hierarchy = "starts_at"

    @admin.display(description="account", ordering="account__name")
    def account_link(self, entitlement):
        return admin_link(entitlement.account)

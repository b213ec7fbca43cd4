"""Accounts and what they are entitled to: where support starts looking for a customer.

An account is found by its name, its billing or members' e-mail, or any Stripe id that belongs to
it (customer, subscription, invoice). Its Stripe-owned fields and its entitlements are read-only:
webhook handlers write them (``base``). The models are provisioning's, but their pages show
billing's mirror (subscriptions, disputes), so their admin lives here: billing uses
provisioning, never the reverse. ``provisioning.admin`` keeps what needs no billing (members).
"""

from django.contrib import admin
from django.utils import timezone
from simple_history.admin import SimpleHistoryAdmin

from provisioning.admin import MembershipInline
from provisioning.models import Account, Entitlement
from provisioning.selectors import with_current_entitlement

from ..models import Dispute, Invoice, Subscription
from .base import ReadOnlyInline, StripeMirrorAdmin, WebhookOwnedAdminMixin, admin_link
from .disputes import disputes_table, invoice_ids_disputed_by


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
    readonly_fields = ("current_entitlement", "disputes")
    inlines = (MembershipInline, EntitlementInline, SubscriptionInline)

    def get_queryset(self, request):
        return with_current_entitlement(super().get_queryset(request), timezone.now())

    def get_search_results(self, request, queryset, search_term):
        """Also the account that a dispute (``dp_...``) leads to, through its payment's invoice."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term.lower().startswith("dp_"):
            invoices = Invoice.objects.filter(stripe_id__in=invoice_ids_disputed_by(term))
            found |= queryset.filter(pk__in=invoices.values("account_id"))
        return found, may_have_duplicates

    @admin.display(description="current entitlement", ordering="current_until")
    def current_entitlement(self, account):
        if getattr(account, "current_kind", None) is None:
            return None
        until = timezone.localtime(account.current_until)
        return f"{account.current_kind}, {account.current_seats} seat(s), until {until:%Y-%m-%d %H:%M}"

    @admin.display(description="disputes of its payments")
    def disputes(self, account):
        if account.pk is None:  # the add page: a new account has paid nothing yet
            return None
        return disputes_table(Dispute.objects.for_account(account))


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

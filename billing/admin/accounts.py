"""Accounts and what they are entitled to: where support starts looking for a customer.

The account page is the hub: what the account is entitled to now, its subscriptions, invoices,
renewals, disputes and the recent events behind them, each linked to its own page, with a link
to the whole list where only the latest are shown. An account is found by its name, its
billing or members' e-mail, or any Stripe id that leads to it (``search``).

Its Stripe-owned fields and its entitlements are read-only: webhook handlers write them
(``base``). The models are provisioning's, but their pages show billing's mirror, so their admin
lives here: billing uses provisioning, never the reverse.
"""

from django.contrib import admin
from django.utils import timezone
from django.utils.html import format_html
from simple_history.admin import SimpleHistoryAdmin

from provisioning.admin import MembershipInline
from provisioning.models import Account, Entitlement
from provisioning.selectors import with_current_entitlement

from ..models import Dispute, Invoice, Renewal, StripeEvent, events_of_customer
from ..money import format_amount
from .base import StripeMirrorAdmin, WebhookOwnedAdminMixin
from .display import account_display, admin_link, changelist_url, table, when, when_display
from .disputes import disputes_table

# Rows of each kind shown on the account's page; the link under a table lists them all.
SHOWN = 10


@admin.register(Account)
class AccountAdmin(StripeMirrorAdmin):
    """Accounts: support edits the name and billing e-mail, and the members; Stripe owns the rest.

    An account added here has no Stripe customer yet: checkout links it (its primary key is the
    session's ``client_reference_id``).
    """

    editable_fields = ("name", "billing_email")
    stripe_id_field = "stripe_customer_id"
    stripe_dashboard_path = "customers"
    list_display = ("name", "stripe_customer_id", "billing_email", "current_entitlement")
    search_fields = ("name", "billing_email", "memberships__user__email", "invoices__number")
    stripe_id_fields = {
        "cus": ("stripe_customer_id",),
        "sub": ("subscriptions__stripe_id",),
        "in": ("invoices__stripe_id",),
    }
    invoice_id_field = "invoices__stripe_id"  # pi_, ch_, re_, dp_: whose invoice they paid
    readonly_fields = (
        "current_entitlement",
        "subscriptions_table",
        "entitlements_table",
        "invoices_table",
        "renewals_table",
        "disputes",
        "events_table",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "stripe_dashboard",
                    "name",
                    "billing_email",
                    "current_entitlement",
                    "default_payment_method_id",
                    "payment_method_added_at",
                )
            },
        ),
        ("Subscriptions and entitlements", {"fields": ("subscriptions_table", "entitlements_table")}),
        ("Invoices and renewals", {"fields": ("invoices_table", "renewals_table")}),
        ("Disputes", {"fields": ("disputes",)}),
        ("Recent events", {"fields": ("events_table",)}),
        ("Sync", {"fields": ("stripe_events", "created_at", "updated_at")}),
    )
    inlines = (MembershipInline,)

    def get_queryset(self, request):
        return with_current_entitlement(super().get_queryset(request), timezone.now())

    def get_fieldsets(self, request, obj=None):
        if obj is None:  # the add page: a new account has nothing to show yet
            return ((None, {"fields": self.editable_fields}),)
        return super().get_fieldsets(request, obj)

    def livemode_of(self, account) -> bool:
        """An account's mode is its customer's: the mode of its newest subscription or invoice, else
        of the newest event about the customer; live when nothing says (Stripe ids carry no mode)."""
        for rows in (account.subscriptions, account.invoices):
            mode = rows.order_by("-created_at").values_list("livemode", flat=True).first()
            if mode is not None:
                return mode
        if account.stripe_customer_id:
            events = customer_events(account)
            mode = events.order_by("-created").values_list("livemode", flat=True).first()
            if mode is not None:
                return mode
        return True

    @admin.display(description="events")
    def stripe_events(self, account):
        """All of the customer's events in the inbox, not only those about the customer object."""
        if not account.stripe_customer_id:
            return None
        count = customer_events(account).count()
        url = changelist_url(StripeEvent, q=account.stripe_customer_id)
        return format_html('<a href="{}">{} event{} of this customer</a>', url, count, "" if count == 1 else "s")

    @admin.display(description="current entitlement", ordering="current_until")
    def current_entitlement(self, account):
        if getattr(account, "current_kind", None) is None:
            return None
        until = timezone.localtime(account.current_until)
        return f"{account.current_kind}, {account.current_seats} seat(s), until {until:%Y-%m-%d %H:%M}"

    @admin.display(description="subscriptions")
    def subscriptions_table(self, account):
        subscriptions = account.subscriptions.order_by("-created_at", "pk")
        rows = [
            (
                admin_link(sub, sub.stripe_id),
                sub.get_status_display(),
                sub.quantity,
                when(sub.current_period_end),
                when(sub.trial_end),
                "yes" if sub.cancel_at_period_end else "no",
            )
            for sub in subscriptions
        ]
        headers = ("subscription", "status", "seats", "period ends", "trial ends", "cancels at period end")
        return table("account-subscriptions", headers, rows)

    @admin.display(description="entitlements")
    def entitlements_table(self, account):
        entitlements = Entitlement.objects.filter(account=account).order_by("-starts_at", "-pk")
        rows = [
            (
                admin_link(e, e.get_kind_display()),
                e.seats,
                when(e.starts_at),
                when(e.expires_at),
                e.stripe_subscription_id,
                e.stripe_invoice_id,
            )
            for e in entitlements[:SHOWN]
        ]
        headers = ("kind", "seats", "starts", "expires", "subscription", "invoice")
        all_url = changelist_url(Entitlement, q=account.stripe_customer_id or account.name)
        return table("account-entitlements", headers, rows, total=entitlements.count(), all_url=all_url)

    @admin.display(description="invoices")
    def invoices_table(self, account):
        invoices = account.invoices.order_by("-stripe_created", "-pk")
        rows = [
            (
                admin_link(invoice),
                invoice.stripe_id,
                invoice.get_status_display(),
                format_amount(invoice.total, invoice.currency),
                when(invoice.paid_at),
            )
            for invoice in invoices[:SHOWN]
        ]
        headers = ("invoice", "Stripe id", "status", "total", "paid")
        all_url = changelist_url(Invoice, q=account.stripe_customer_id or "")
        return table("account-invoices", headers, rows, total=invoices.count(), all_url=all_url)

    @admin.display(description="renewals")
    def renewals_table(self, account):
        renewals = Renewal.objects.filter(subscription__account=account).select_related("subscription")
        renewals = renewals.order_by("-effective_date", "-pk")
        shown = list(renewals[:SHOWN])
        invoices = Invoice.objects.in_bulk(
            [r.stripe_invoice_id for r in shown if r.stripe_invoice_id], field_name="stripe_id"
        )
        rows = [
            (
                admin_link(renewal, when(renewal.effective_date)),
                renewal.subscription.stripe_id,
                admin_link(invoices.get(renewal.stripe_invoice_id), renewal.stripe_invoice_id)
                if renewal.stripe_invoice_id in invoices
                else renewal.stripe_invoice_id,
                when(renewal.processed_at),
            )
            for renewal in shown
        ]
        headers = ("effective", "subscription", "invoice", "processed")
        all_url = changelist_url(Renewal, q=account.stripe_customer_id or "")
        return table("account-renewals", headers, rows, total=renewals.count(), all_url=all_url)

    @admin.display(description="disputes of its payments")
    def disputes(self, account):
        return disputes_table(Dispute.objects.for_account(account))

    @admin.display(description="recent events")
    def events_table(self, account):
        """The customer's latest events (``StripeEvent.objects.of_customer``), newest first."""
        if not account.stripe_customer_id:
            return None
        events = customer_events(account)
        rows = [
            (admin_link(event, event.id), event.type, event.get_status_display(), when(event.created))
            for event in events.only("id", "type", "status", "created").order_by("-created", "-received_at")[:SHOWN]
        ]
        all_url = changelist_url(StripeEvent, q=account.stripe_customer_id)
        return table(
            "account-events", ("event", "type", "status", "created"), rows, total=events.count(), all_url=all_url
        )


def customer_events(account):
    """``StripeEvent.objects.of_customer`` for the account's customer, its condition read once per
    page: the account page shows the customer's events three times (its mode, the count, the
    recent ones), and reading the condition costs a few queries (``events_of_customer``)."""
    customer_id = account.stripe_customer_id
    cached = getattr(account, "_customer_events_condition", None)
    if cached is None or cached[0] != customer_id:
        cached = (customer_id, events_of_customer(customer_id))
        account._customer_events_condition = cached
    return StripeEvent.objects.filter(cached[1])


@admin.register(Entitlement)
class EntitlementAdmin(WebhookOwnedAdminMixin, SimpleHistoryAdmin):
    """Entitlements are granted by billing handlers through provisioning.services only."""

    list_display = ("account_link", "kind", "seats", "starts", "expires", "stripe_subscription_id")
    list_select_related = ("account",)
    list_filter = ("kind",)
    search_fields = ("account__name", "account__billing_email")
    stripe_id_fields = {
        "cus": ("account__stripe_customer_id",),
        "sub": ("stripe_subscription_id",),
        "in": ("stripe_invoice_id",),
    }
    invoice_id_field = "stripe_invoice_id"
    date_hierarchy = "starts_at"

    account_link = account_display()

    starts = when_display("starts_at", "starts")
    expires = when_display("expires_at", "expires")

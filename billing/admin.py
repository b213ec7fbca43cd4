"""The admin support staff work in (DESIGN.md, "Who uses it").

Support finds a customer by e-mail or by any Stripe id, reads the subscription, invoices,
renewals and the raw events behind them with their history, and fixes things through actions
(re-process an event, send an owed e-mail), never by typing over what Stripe said.

Rows here are written by webhook handlers from Stripe's snapshots. A hand edit would be silently
overwritten by the next event, or would make the mirror disagree with Stripe with no trace of
why, so, as in dj-stripe's admin, one base class (``StripeMirrorAdmin``, through
``WebhookOwnedAdminMixin``) derives every model field as read-only and only fields a model admin
names in ``editable_fields`` stay editable.

Stripe ids are searched exactly (``=``, case-insensitive): a pasted id finds its row, and "in_"
does not find every invoice. Names, e-mails and invoice numbers match in part.

Every changelist selects or annotates what its columns show: a list costs the same number of
queries for 3 rows as for 30 (see tests/test_admin.py).
"""
import json
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.db.models import Q
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from simple_history.admin import SimpleHistoryAdmin

from provisioning.models import Account

from .models import Invoice, InvoiceLineItem, OwedEmail, Payment, Refund, Renewal, StripeEvent, Subscription
from .money import format_amount

STRIPE_DASHBOARD = "https://dashboard.stripe.com/"
# How a mirrored row was last synced: shown after what Stripe says about the object.
SYNC_FIELDS = ("stripe_events", "stripe_created", "last_event_created", "last_event_id", "created_at", "updated_at")


def stripe_dashboard_link(path: str, stripe_id: str, livemode: bool = True):
    """A link opening ``stripe_id`` in Stripe's dashboard (e.g. ``path="invoices"``).

    Test-mode objects live under ``/test/``. Mirrored rows do not store ``livemode``, so they get
    the live URL; only events know their mode.
    """
    if not stripe_id:
        return None
    url = f"{STRIPE_DASHBOARD}{'' if livemode else 'test/'}{path}/{stripe_id}"
    return format_html('<a href="{}" target="_blank" rel="noopener noreferrer">{}</a>', url, stripe_id)


def admin_link(obj, text=None):
    """A link to ``obj``'s admin page, so support can walk from row to related row."""
    if obj is None:
        return None
    opts = obj._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text if text is not None else obj)


def money_display(field: str, description: str | None = None):
    """An admin column showing the amount ``field`` with the row's currency ("12.34 USD")."""

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def display(self, obj):
        return format_amount(getattr(obj, field), obj.currency)

    return display


class WebhookOwnedAdminMixin:
    """Rows that webhook handlers own: people read them, and write only ``editable_fields``.

    Every concrete field not named in ``editable_fields`` is read-only. With nothing editable
    the admin is view-only (no add, change or delete): the fix for a wrong row is in Stripe and
    a re-processed event, not a form. Actions that change state check the model's change
    permission as granted to the user (``has_fix_permission``), not the view-only admin.
    """

    editable_fields: tuple[str, ...] = ()

    def get_readonly_fields(self, request, obj=None):
        derived = [
            f.name for f in self.model._meta.fields if not f.auto_created and f.name not in self.editable_fields
        ]
        declared = super().get_readonly_fields(request, obj)
        return [*derived, *(name for name in declared if name not in derived)]

    def has_add_permission(self, request):
        return bool(self.editable_fields) and super().has_add_permission(request)

    def has_change_permission(self, request, obj=None):
        return bool(self.editable_fields) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return bool(self.editable_fields) and super().has_delete_permission(request, obj)

    def has_fix_permission(self, request):
        opts = self.model._meta
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")


class StripeMirrorAdmin(WebhookOwnedAdminMixin, SimpleHistoryAdmin):
    """Base of the admin of every row mirrored from a Stripe object.

    On the change page the Stripe id (``stripe_id_field``) is shown as a link to the dashboard,
    followed by a link to the inbox events about that object. History (simple_history) shows
    which event changed what.
    """

    stripe_id_field = "stripe_id"
    stripe_dashboard_path = ""  # e.g. "subscriptions": https://dashboard.stripe.com/subscriptions/sub_...

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        return [*fields, *(name for name in ("stripe_dashboard", "stripe_events") if name not in fields)]

    def get_fields(self, request, obj=None):
        """The Stripe id first, as its dashboard link (it stays read-only); sync bookkeeping last."""
        shown_elsewhere = ("stripe_dashboard", self.stripe_id_field)
        fields = [name for name in super().get_fields(request, obj) if name not in shown_elsewhere]
        return [
            "stripe_dashboard",
            *(name for name in fields if name not in SYNC_FIELDS),
            *(name for name in SYNC_FIELDS if name in fields),
        ]

    @admin.display(description="Stripe id")
    def stripe_dashboard(self, obj):
        return stripe_dashboard_link(self.stripe_dashboard_path, getattr(obj, self.stripe_id_field))

    @admin.display(description="events")
    def stripe_events(self, obj):
        """The inbox rows whose ``data.object`` is this row: the history as Stripe told it."""
        stripe_id = getattr(obj, self.stripe_id_field)
        if not stripe_id:
            return None
        count = StripeEvent.objects.filter(object_id=stripe_id).count()
        url = f"{reverse('admin:billing_stripeevent_changelist')}?{urlencode({'object_id': stripe_id})}"
        return format_html('<a href="{}">{} event{} in the inbox</a>', url, count, "" if count == 1 else "s")


class ReadOnlyInline(admin.TabularInline):
    """A list of related rows to look at and click through, never to edit in place."""

    extra = 0
    can_delete = False
    show_change_link = True

    def get_readonly_fields(self, request, obj=None):
        return self.fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# --- Subscriptions ------------------------------------------------------------------------


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


# --- Invoices -----------------------------------------------------------------------------


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
    readonly_fields = (
        "total_display",
        "amount_due_display",
        "amount_paid_display",
        "amount_remaining_display",
        "amount_refunded_display",
    )
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "number", "status", "billing_reason", "account", "customer_email")}),
        (
            "Subscription",
            {"fields": ("subscription", "stripe_subscription_id", "period_start", "period_end", "line_quantity")},
        ),
        ("Amounts", {"fields": readonly_fields}),
        ("Payment and receipt", {"fields": ("paid_at", "receipt_sent_at", "hosted_invoice_url", "invoice_pdf")}),
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


# --- Renewals -----------------------------------------------------------------------------


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


# --- The inbox ----------------------------------------------------------------------------

# Where an event's object may be mirrored: (model, the field holding the Stripe id).
EVENT_OBJECT_ROWS = (
    (Subscription, "stripe_id"),
    (Invoice, "stripe_id"),
    (Account, "stripe_customer_id"),
    (Payment, "payment_intent_id"),
    (Refund, "stripe_id"),
)


@admin.register(StripeEvent)
class StripeEventAdmin(WebhookOwnedAdminMixin, admin.ModelAdmin):
    """The inbox, exactly as Stripe sent it: nothing here may be added, edited or deleted.

    It is the evidence behind every mirrored row; the only fix is to re-process an event.
    """

    list_display = ("id", "type", "status", "attempts", "created", "received_at", "processed_at")
    list_filter = ("status", "type", "livemode")
    search_fields = ("=id", "=object_id", "type")
    date_hierarchy = "created"
    readonly_fields = ("stripe_dashboard", "related_rows", "payload_pretty")
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "type", "status", "attempts", "last_error")}),
        ("Times", {"fields": ("created", "received_at", "processed_at")}),
        ("Object", {"fields": ("object_id", "related_rows", "livemode", "api_version")}),
        ("Payload", {"fields": ("payload_pretty",)}),
    )
    actions = ("reprocess",)

    @admin.display(description="event id")
    def stripe_dashboard(self, event):
        return stripe_dashboard_link("events", event.id, livemode=event.livemode)

    @admin.display(description="rows in this app")
    def related_rows(self, event):
        """Links to the mirrored rows this event is about (its ``data.object``)."""
        if not event.object_id:
            return None
        links = [
            (row._meta.verbose_name, admin_link(row))
            for model, field in EVENT_OBJECT_ROWS
            for row in model.objects.filter(**{field: event.object_id})
        ]
        return format_html_join(mark_safe("<br>"), "{}: {}", links) or None

    @admin.display(description="payload")
    def payload_pretty(self, event):
        return format_html("<pre>{}</pre>", json.dumps(event.payload, indent=2, ensure_ascii=False))

    def has_reprocess_permission(self, request):
        return self.has_fix_permission(request)

    @admin.action(description="Re-process selected events", permissions=("reprocess",))
    def reprocess(self, request, queryset):
        """Run each event through the inbox again, oldest first, as a retry from Stripe would."""
        from billing.webhook.inbox import process_event  # imported late: the inbox imports the handlers

        for event_id in queryset.order_by("created").values_list("pk", flat=True):
            result = process_event(event_id)
            if result.status == "failed":
                self.message_user(request, f"{event_id}: failed: {result.error}", messages.ERROR)
            else:
                self.message_user(request, f"{event_id}: {result.status}", messages.SUCCESS)


# --- Money movements ----------------------------------------------------------------------


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


# --- What the app owes --------------------------------------------------------------------


@admin.register(OwedEmail)
class OwedEmailAdmin(WebhookOwnedAdminMixin, admin.ModelAdmin):
    """The outbox of e-mails: recorded with the change that owes them, sent by a task or the sweep."""

    list_display = ("key", "kind", "status", "account_link", "attempts", "created_at", "sent_at")
    list_select_related = ("account",)
    list_filter = ("kind", "status")
    search_fields = ("key", "account__name", "account__billing_email", "=invoice__stripe_id", "invoice__number")
    actions = ("send_now",)

    @admin.display(description="account", ordering="account__name")
    def account_link(self, owed):
        return admin_link(owed.account)

    def has_send_permission(self, request):
        return self.has_fix_permission(request)

    @admin.action(description="Send now", permissions=("send",))
    def send_now(self, request, queryset):
        """Hand each e-mail to the send task now instead of waiting for the sweep."""
        from billing.tasks import send_owed_email  # imported late: tasks load the Celery app

        pks = list(queryset.values_list("pk", flat=True))
        for pk in pks:
            send_owed_email.delay(pk)
        self.message_user(request, f"Asked to send {len(pks)} e-mail{'' if len(pks) == 1 else 's'}.", messages.SUCCESS)

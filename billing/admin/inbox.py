"""The inbox of Stripe events: the evidence behind every mirrored row, and its one fix (re-process)."""

import json

from django.contrib import admin, messages
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from provisioning.models import Account

from ..models import Dispute, Invoice, Payment, Refund, StripeEvent, Subscription
from .base import WebhookOwnedAdminMixin, admin_link, stripe_dashboard_link

# Where an event's object may be mirrored: (model, the field holding the Stripe id).
EVENT_OBJECT_ROWS = (
    (Subscription, "stripe_id"),
    (Invoice, "stripe_id"),
    (Account, "stripe_customer_id"),
    (Payment, "payment_intent_id"),
    (Refund, "stripe_id"),
    (Dispute, "stripe_id"),
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

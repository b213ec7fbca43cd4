"""The inbox of Stripe events: the evidence behind every mirrored row, and its one fix (re-process)."""

import json

from django.contrib import admin, messages
from django.db.models import Q
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from provisioning.models import Account

from ..models import Dispute, Invoice, Payment, Refund, StripeEvent, Subscription, events_about, events_of_customer
from .actions import support_action
from .base import WebhookOwnedAdminMixin
from .display import admin_link, last_line, stripe_dashboard_link, when_display

# Where an event's object may be mirrored: (model, the field holding the Stripe id).
EVENT_OBJECT_ROWS = (
    (Subscription, "stripe_id"),
    (Invoice, "stripe_id"),
    (Account, "stripe_customer_id"),
    (Payment, "payment_intent_id"),
    (Payment, "charge_id"),
    (Refund, "stripe_id"),
    (Dispute, "stripe_id"),
)


@admin.register(StripeEvent)
class StripeEventAdmin(WebhookOwnedAdminMixin, admin.ModelAdmin):
    """The inbox, exactly as Stripe sent it: nothing here may be added, edited or deleted.

    It is the evidence behind every mirrored row; the only fix is to re-process an event, which
    goes through the webhook's own exactly-once path (``billing.webhook.inbox.process_event``).

    The search box finds an event by its id; any other Stripe id finds the events about that
    object, and the invoice payments of an invoice; a customer's ``cus_`` id finds every event
    of that customer (``StripeEvent.objects.of_customer``).
    """

    list_display = ("id", "type", "status_display", "created_display")
    list_filter = ("status", "type", "livemode")
    list_lookups = ("object_id",)  # the "events" link of every mirrored row
    search_fields = ("type",)
    search_help_text = (
        "An event id (evt_), any Stripe object id (its events), a customer id (cus_: all its events), or a type."
    )
    date_hierarchy = "created"
    readonly_fields = ("stripe_dashboard", "related_rows", "payload_pretty")
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "type", "status", "attempts", "last_error")}),
        ("Times", {"fields": ("created", "received_at", "processed_at")}),
        ("Object", {"fields": ("object_id", "related_rows", "livemode", "api_version")}),
        ("Payload", {"fields": ("payload_pretty",)}),
    )
    support_actions = ("reprocess",)

    created_display = when_display("created", "created")

    @admin.display(description="status", ordering="status")
    def status_display(self, event):
        """The status, and how often a handler ran on an event that is not settled yet."""
        if event.status in (StripeEvent.Status.FAILED, StripeEvent.Status.RECEIVED) and event.attempts:
            return f"{event.get_status_display()} ({event.attempts} attempt{'' if event.attempts == 1 else 's'})"
        return event.get_status_display()

    def stripe_id_condition(self, kind, stripe_id):
        if kind == "evt":
            return Q(id=stripe_id)
        if kind == "cus":
            return events_of_customer(stripe_id)
        return events_about(stripe_id)

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

    def support_action_note(self, name, event):
        if event.status == StripeEvent.Status.PROCESSED:
            return "already processed: it will be left alone (an event is applied once)"
        last_error = last_line(event.last_error)
        return f"{event.attempts} attempt(s) so far" + (f"; last error: {last_error}" if last_error else "")

    @support_action(
        label="Re-process",
        permission="billing.reprocess_stripeevent",
        explanation=(
            "Each event is applied again by its handler, oldest first, exactly as a retry from Stripe would be: "
            "in one transaction, and only if it is not processed yet."
        ),
        ordering=("created", "pk"),
    )
    def reprocess(self, request, event):
        """Apply the event again through the inbox (``process_event``): the webhook's exactly-once path."""
        from billing.webhook.inbox import DUPLICATE, process_event  # late: the inbox imports the handlers

        outcome = process_event(event.pk)
        if outcome.status == DUPLICATE:
            return messages.INFO, f"Event {event.pk} was already processed: nothing was applied again."
        if outcome.status == StripeEvent.Status.FAILED:
            return messages.ERROR, f"Event {event.pk} failed again: {last_line(outcome.error, 'unknown error')}"
        if outcome.status == StripeEvent.Status.IGNORED:
            return messages.WARNING, f"Event {event.pk} has no handler ({event.type}): it is marked ignored."
        return messages.SUCCESS, f"Event {event.pk} ({event.type}) was re-processed: it is now processed."

"""Invoices: their lines, the payments that paid them, their refunds and disputes; re-sync, resend."""

from django.contrib import admin, messages

from ..emails import invoice_label
from ..models import Dispute, Invoice, InvoiceLineItem, OwedEmail, Refund
from ..money import format_amount
from ..outbox import ReceiptNotResent, resend_receipt
from ..services.resync import ResyncFailed, resync_invoice
from .actions import resync_message, support_action
from .base import SYNC_FIELDS, ReadOnlyInline, StripeMirrorAdmin
from .display import (
    account_display,
    admin_link,
    last_line,
    money_display,
    stripe_dashboard_link,
    table,
    when,
    when_display,
)
from .disputes import disputes_table


class InvoiceLineItemInline(ReadOnlyInline):
    model = InvoiceLineItem
    fields = ("stripe_id", "description", "amount_display", "quantity", "period_start", "period_end", "proration")
    show_change_link = False  # lines have no admin of their own
    amount_display = money_display("amount")


@admin.register(Invoice)
class InvoiceAdmin(StripeMirrorAdmin):
    """An invoice as Stripe last described it, with what paid it and what was refunded of it."""

    stripe_dashboard_path = "invoices"
    list_display = ("stripe_id", "number", "account_link", "status", "total_display", "paid")
    list_select_related = ("account",)
    list_filter = ("status", "billing_reason", "currency")
    search_fields = ("number", "customer_email")
    stripe_id_fields = {
        "in": ("stripe_id",),
        "cus": ("account__stripe_customer_id",),
        "sub": ("stripe_subscription_id",),
    }
    invoice_id_field = "stripe_id"  # pi_, ch_, re_, dp_: the invoice they paid
    amount_fields = (
        "total_display",
        "amount_due_display",
        "amount_paid_display",
        "amount_remaining_display",
        "amount_refunded_display",
    )
    readonly_fields = (*amount_fields, "payments_table", "refunds_table", "disputes", "receipts_table")
    fieldsets = (
        (None, {"fields": ("stripe_dashboard", "number", "status", "billing_reason", "account", "customer_email")}),
        (
            "Subscription",
            {"fields": ("subscription", "stripe_subscription_id", "period_start", "period_end", "line_quantity")},
        ),
        ("Amounts", {"fields": amount_fields}),
        ("Payments, refunds and disputes", {"fields": ("payments_table", "refunds_table", "disputes")}),
        (
            "Receipt",
            {"fields": ("paid_at", "receipt_sent_at", "receipts_table", "hosted_invoice_url", "invoice_pdf")},
        ),
        ("Sync", {"fields": SYNC_FIELDS}),
    )
    inlines = (InvoiceLineItemInline,)
    support_actions = ("resync", "resend_receipt")

    total_display = money_display("total")
    paid = when_display("paid_at", "paid")
    amount_due_display = money_display("amount_due", "amount due")
    amount_paid_display = money_display("amount_paid", "amount paid")
    amount_remaining_display = money_display("amount_remaining", "amount remaining")
    amount_refunded_display = money_display("amount_refunded", "amount refunded")

    account_link = account_display()

    @admin.display(description="payments")
    def payments_table(self, invoice):
        """The PaymentIntents that paid it (``invoice_payment.paid``), and what was refunded of each."""
        rows = [
            (
                admin_link(payment),
                stripe_dashboard_link("payments", payment.charge_id, payment.livemode),
                format_amount(payment.charge_amount_refunded, payment.currency or invoice.currency),
                when(payment.created_at),
            )
            for payment in invoice.payments.order_by("created_at", "pk")
        ]
        return table("invoice-payments", ("payment", "charge", "refunded", "recorded"), rows)

    @admin.display(description="refunds")
    def refunds_table(self, invoice):
        refunds = Refund.objects.of_payments(invoice.payments.all()).order_by("created_at", "pk")
        rows = [
            (admin_link(refund), format_amount(refund.amount, refund.currency), refund.status, when(refund.created_at))
            for refund in refunds
        ]
        return table("invoice-refunds", ("refund", "amount", "status", "recorded"), rows)

    @admin.display(description="disputes of its payments")
    def disputes(self, invoice):
        return disputes_table(Dispute.objects.for_invoice(invoice))

    @admin.display(description="receipts")
    def receipts_table(self, invoice):
        """Every receipt of the invoice: the one its payment owed, and each copy someone asked for."""
        receipts = invoice.owed_emails.filter(kind=OwedEmail.Kind.RECEIPT).select_related("requested_by")
        rows = [
            (
                admin_link(owed, owed.key),
                owed.get_status_display(),
                when(owed.sent_at),
                owed.requested_by.get_username() if owed.requested_by else "its payment",
            )
            for owed in receipts.order_by("created_at", "pk")
        ]
        return table("invoice-receipts", ("e-mail", "status", "sent", "asked by"), rows)

    # --- Support actions ------------------------------------------------------------------

    def support_action_note(self, name, invoice):
        label = f"{invoice.get_status_display().lower()}, {format_amount(invoice.total, invoice.currency)}"
        if name == "resend_receipt":
            to = invoice.customer_email or invoice.account.billing_email or "the account's owners and admins"
            return f"{label}; a copy of its receipt goes to {to}"
        return label

    @support_action(
        label="Re-sync from Stripe",
        permission="billing.resync_invoice",
        explanation=(
            "Each invoice is fetched from Stripe's API and applied as the newest snapshot, through the same "
            "services as its events: its status never moves backwards, and a paid invoice is settled once."
        ),
        max_rows=20,
    )
    def resync(self, request, invoice):
        try:
            return resync_message("Invoice", resync_invoice(invoice.stripe_id))
        except ResyncFailed as exc:
            return messages.ERROR, f"Invoice {invoice.stripe_id} was not re-synced: {exc}"

    @support_action(
        label="Resend receipt",
        permission="billing.resend_receipt",
        explanation=(
            "A new copy of each invoice's receipt is owed and sent like any receipt, recorded with your name. "
            "This is the only way a receipt is sent twice."
        ),
        max_rows=20,
    )
    def resend_receipt(self, request, invoice):
        label = invoice_label(invoice)
        try:
            owed = resend_receipt(invoice, requested_by=request.user)
        except ReceiptNotResent as exc:
            return messages.WARNING, str(exc)
        owed.refresh_from_db()
        if owed.status == OwedEmail.Status.SENT:
            return messages.SUCCESS, f"The receipt of invoice {label} was sent again (owed e-mail {owed.pk})."
        if owed.last_error:
            return (
                messages.WARNING,
                f"The receipt of invoice {label} could not be sent yet ({last_line(owed.last_error)}); "
                f"owed e-mail {owed.pk} is retried automatically.",
            )
        return messages.SUCCESS, f"A new copy of the receipt of invoice {label} is queued (owed e-mail {owed.pk})."

"""What the app owes: e-mails recorded with the change that owes them, and "Send now"."""

from django.contrib import admin, messages

from ..models import OwedEmail
from .actions import support_action
from .base import WebhookOwnedAdminMixin
from .display import account_display, last_line, when_display


@admin.register(OwedEmail)
class OwedEmailAdmin(WebhookOwnedAdminMixin, admin.ModelAdmin):
    """The outbox of e-mails: recorded with the change that owes them, sent by a task or the sweep.

    "Send now" sends a pending e-mail at once instead of waiting for the sweep; one already sent
    is left alone (a receipt is sent again only by "Resend receipt" on its invoice).
    """

    list_display = ("key", "kind", "status", "account_link", "sent")
    list_select_related = ("account",)
    list_filter = ("kind", "status")
    search_fields = ("key", "account__name", "account__billing_email", "invoice__number")
    stripe_id_fields = {
        "cus": ("account__stripe_customer_id",),
        "sub": ("subscription__stripe_id",),
        "in": ("invoice__stripe_id",),
    }
    invoice_id_field = "invoice__stripe_id"
    support_actions = ("send_now",)

    account_link = account_display()

    sent = when_display("sent_at", "sent")

    def support_action_note(self, name, owed):
        if owed.status == OwedEmail.Status.SENT:
            return "already sent: it will be left alone"
        if owed.status == OwedEmail.Status.FAILED:
            return f"given up after {owed.attempts} attempt(s): it will be left alone"
        return f"pending, {owed.attempts} attempt(s) so far"

    @support_action(
        label="Send now",
        permission="billing.send_owedemail",
        explanation="Each pending e-mail is sent now, as the sweep would send it. Sent and given-up ones are left alone.",
    )
    def send_now(self, request, owed):
        from billing.tasks import Outcome, deliver  # late: tasks load the Celery app

        if owed.status == OwedEmail.Status.SENT:
            hint = " (use Resend receipt on its invoice to send a receipt again)" if owed.invoice_id else ""
            return messages.INFO, f"E-mail {owed.key} was already sent: nothing was sent{hint}."
        if owed.status == OwedEmail.Status.FAILED:
            return (
                messages.WARNING,
                f"E-mail {owed.key} was given up after {owed.attempts} attempt(s): nothing was sent.",
            )
        delivery = deliver(owed.pk)
        if delivery.outcome == Outcome.SENT:
            return messages.SUCCESS, f"E-mail {owed.key} was sent."
        if delivery.outcome == Outcome.SKIPPED:
            return messages.INFO, f"E-mail {owed.key} is being sent by another worker right now: nothing more was sent."
        owed.refresh_from_db()
        error = last_line(owed.last_error, "unknown error")
        return (
            messages.ERROR,
            f"E-mail {owed.key} could not be sent ({error}); it is {owed.get_status_display().lower()}.",
        )

"""What the app owes: e-mails recorded with the change that owes them."""

from django.contrib import admin, messages

from ..models import OwedEmail
from .base import WebhookOwnedAdminMixin, admin_link


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

"""Admin of members: who of the SaaS's users belongs to which account, with which role.

The pages of accounts and entitlements show billing's mirror (subscriptions, invoices, disputes),
so they are registered by ``billing.admin.accounts``: billing uses provisioning, never the
reverse, and nothing here depends on the billing app.
"""

from django.contrib import admin
from simple_history.admin import SimpleHistoryAdmin

from .models import Membership


class MembershipInline(admin.TabularInline):
    """The members of an account, edited on the account's page."""

    model = Membership
    extra = 0
    autocomplete_fields = ("user",)
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)


@admin.register(Membership)
class MembershipAdmin(SimpleHistoryAdmin):
    list_display = ("user", "account", "role", "created_at")
    list_select_related = ("user", "account")
    list_filter = ("role",)
    search_fields = ("user__email", "user__username", "account__name", "=account__stripe_customer_id")
    autocomplete_fields = ("user", "account")

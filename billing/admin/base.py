"""What every billing admin page is built from: read-only mirrors, checked lists, support actions.

Rows here are written by webhook handlers from Stripe's snapshots. A hand edit would be silently
overwritten by the next event, or would make the mirror disagree with Stripe with no trace of
why, so, as in dj-stripe's admin, one base class (``StripeMirrorAdmin``, through
``WebhookOwnedAdminMixin``) derives every model field as read-only and only fields a model admin
names in ``editable_fields`` stay editable. Nobody deletes a mirrored row or an account here,
superusers included: Stripe is where objects end, and an event records it.

Every admin of this app is a ``BillingAdminMixin``: its list checks what its address asks
(``lists``), its search box finds any Stripe id (``search``), its fixes are support actions
behind a confirmation page (``actions``), and its pages show messages exactly as written.
"""

from django.contrib import admin
from django.utils.html import format_html
from simple_history.admin import SimpleHistoryAdmin

from ..models import StripeEvent
from .actions import SupportActionsMixin
from .display import changelist_url, stripe_dashboard_link
from .lists import CheckedListMixin
from .search import StripeIdSearchMixin

# How a mirrored row was last synced: shown after what Stripe says about the object.
SYNC_FIELDS = (
    "stripe_events",
    "livemode",
    "stripe_created",
    "last_event_created",
    "last_event_id",
    "created_at",
    "updated_at",
)


class BillingAdminMixin(CheckedListMixin, StripeIdSearchMixin, SupportActionsMixin):
    """Checked lists, Stripe id search, support actions, and templates that never capitalise a message."""

    change_list_template = "admin/billing/support/change_list.html"
    change_form_template = "admin/billing/support/change_form.html"


class WebhookOwnedAdminMixin(BillingAdminMixin):
    """Rows that webhook handlers own: people read them, and write only ``editable_fields``.

    Every concrete field not named in ``editable_fields`` is read-only. With nothing editable
    the admin is view-only (no add or change); nothing is ever deleted. The fix for a wrong row
    is in Stripe and a support action (re-process, re-sync), not a form; each action has a
    permission of its own (``billing.models``, given to the "Billing support" group).
    """

    editable_fields: tuple[str, ...] = ()

    def get_readonly_fields(self, request, obj=None):
        derived = [f.name for f in self.model._meta.fields if not f.auto_created and f.name not in self.editable_fields]
        declared = super().get_readonly_fields(request, obj)
        return [*derived, *(name for name in declared if name not in derived)]

    def has_add_permission(self, request):
        return bool(self.editable_fields) and super().has_add_permission(request)

    def has_change_permission(self, request, obj=None):
        return bool(self.editable_fields) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return False  # mirrored rows and accounts end in Stripe, never here (superusers included)


class StripeMirrorAdmin(WebhookOwnedAdminMixin, SimpleHistoryAdmin):
    """Base of the admin of every row mirrored from a Stripe object.

    On the change page the Stripe id (``stripe_id_field``) is shown as a link to the dashboard
    of the object's mode (``livemode_of``), followed by a link to the inbox events about that
    object. History (simple_history) shows which event changed what.
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

    def livemode_of(self, obj) -> bool:
        return obj.livemode

    @admin.display(description="Stripe id")
    def stripe_dashboard(self, obj):
        return stripe_dashboard_link(
            self.stripe_dashboard_path, getattr(obj, self.stripe_id_field), self.livemode_of(obj)
        )

    @admin.display(description="events")
    def stripe_events(self, obj):
        """The inbox rows whose ``data.object`` is this row: the history as Stripe told it."""
        stripe_id = getattr(obj, self.stripe_id_field)
        if not stripe_id:
            return None
        count = StripeEvent.objects.filter(object_id=stripe_id).count()
        url = changelist_url(StripeEvent, object_id=stripe_id)
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

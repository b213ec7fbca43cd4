"""What every billing admin page is built from: read-only mirrors, links, money.

Rows here are written by webhook handlers from Stripe's snapshots. A hand edit would be silently
overwritten by the next event, or would make the mirror disagree with Stripe with no trace of
why, so, as in dj-stripe's admin, one base class (``StripeMirrorAdmin``, through
``WebhookOwnedAdminMixin``) derives every model field as read-only and only fields a model admin
names in ``editable_fields`` stay editable.
"""

from urllib.parse import urlencode

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from simple_history.admin import SimpleHistoryAdmin

from ..models import StripeEvent
from ..money import format_amount

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
        derived = [f.name for f in self.model._meta.fields if not f.auto_created and f.name not in self.editable_fields]
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

"""Support actions: the fixes support staff apply (re-process, re-sync, resend, send now).

Each is a method of a model admin decorated with ``support_action``: it applies the fix to one
row and returns what happened, as a message level and a sentence. ``SupportActionsMixin``
offers it twice, always behind a confirmation page and only to users with its permission:

* on the row's page, as a button (``id="<name>-button"``, with "-" for "_": ``reprocess-button``,
  ``resend-receipt-button``) opening ``<row>/<name>/``: a confirmation page whose button
  (``id="confirm-<name>"``) applies it and returns to the row's page;
* on the list, as the action ``<name>``: choosing it shows the same confirmation page for the
  selected rows, whose button applies it to each and returns to the list.

Every outcome is a message of its own, written so that it never starts with a Stripe id:
Django's message templates capitalise a message's first letter, and Stripe ids are
case-sensitive (``evt_`` is not ``Evt_``). The billing admin templates show messages as they
are, too (``templates/admin/billing/support/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from .display import admin_link

CONFIRMATION_TEMPLATE = "admin/billing/support/action_confirmation.html"


@dataclass(frozen=True)
class SupportAction:
    name: str  # the method's name: URL <row>/<name>/, list action <name>, button <name>-button
    label: str  # the button's and the list action's text, e.g. "Re-process"
    permission: str  # e.g. "billing.reprocess_stripeevent"
    explanation: str  # what it will do, on the confirmation page
    max_rows: int  # a list action applies it to at most this many rows at once
    ordering: tuple[str, ...]  # the order a list action applies it in (empty: the list's)

    @property
    def dom_id(self) -> str:
        """The name in page element ids: ``resend-receipt`` (``resend-receipt-button``, ``confirm-resend-receipt``)."""
        return self.name.replace("_", "-")


def support_action(
    *, label: str, permission: str, explanation: str, max_rows: int = 50, ordering: tuple[str, ...] = ()
):
    """Declare ``method(self, request, obj) -> (message level, message)`` a support action."""

    def decorate(method):
        method.support_action = SupportAction(method.__name__, label, permission, explanation, max_rows, ordering)
        return method

    return decorate


class SupportActionsMixin:
    """Buttons, list actions and confirmation pages for the ``support_actions`` of a model admin."""

    support_actions: tuple[str, ...] = ()

    def permitted_support_actions(self, request) -> list[SupportAction]:
        declared = (getattr(self, name).support_action for name in self.support_actions)
        return [action for action in declared if request.user.has_perm(action.permission)]

    def support_action_note(self, name: str, obj) -> str:
        """A line about ``obj`` on the confirmation page (what the action will find); "" for none."""
        return ""

    # --- On the row's page ----------------------------------------------------------------

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        own = [
            path(
                f"<path:object_id>/{name}/",
                self.admin_site.admin_view(self._object_action_view),
                {"name": name},
                name=f"{info[0]}_{info[1]}_{name}",
            )
            for name in self.support_actions
        ]
        return own + super().get_urls()

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and obj.pk is not None:
            info = self.opts.app_label, self.opts.model_name
            context["support_actions"] = [
                {
                    "dom_id": action.dom_id,
                    "label": action.label,
                    "url": reverse(f"admin:{info[0]}_{info[1]}_{action.name}", args=[quote(obj.pk)]),
                }
                for action in self.permitted_support_actions(request)
            ]
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _object_action_view(self, request, object_id, name):
        action = next((a for a in self.permitted_support_actions(request) if a.name == name), None)
        if action is None:
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_permission(request, obj):
            raise PermissionDenied
        change_url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[quote(obj.pk)])
        if request.method == "POST" and request.POST.get("post") == "yes":
            level, message = getattr(self, name)(request, obj)
            self.message_user(request, message, level)
            return HttpResponseRedirect(change_url)
        return self._confirmation(request, action, [obj], cancel_url=change_url, list_action=False)

    # --- On the list ------------------------------------------------------------------------

    def get_actions(self, request):
        actions = super().get_actions(request)
        for action in self.permitted_support_actions(request):
            actions[action.name] = (self._list_action(action), action.name, action.label)
        return actions

    def _list_action(self, action: SupportAction):
        def run(modeladmin, request, queryset):
            if action.ordering:
                queryset = queryset.order_by(*action.ordering)
            rows = list(queryset[: action.max_rows + 1])
            if len(rows) > action.max_rows:
                modeladmin.message_user(
                    request,
                    f"{action.label} applies to at most {action.max_rows} rows at a time: nothing was done.",
                    messages.WARNING,
                )
                return None
            if request.POST.get("post") != "yes":
                return modeladmin._confirmation(
                    request, action, rows, cancel_url=request.get_full_path(), list_action=True
                )
            for obj in rows:
                level, message = getattr(modeladmin, action.name)(request, obj)
                modeladmin.message_user(request, message, level)
            return None

        return run

    # --- The confirmation page ---------------------------------------------------------------

    def _confirmation(self, request, action: SupportAction, rows: list, *, cancel_url: str, list_action: bool):
        context = {
            **self.admin_site.each_context(request),
            "title": f"{action.label}: are you sure?",
            "opts": self.opts,
            "action": action,
            "rows": [(admin_link(obj), self.support_action_note(action.name, obj)) for obj in rows],
            "list_action": list_action,
            "selected": [obj.pk for obj in rows],
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "cancel_url": cancel_url,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, CONFIRMATION_TEMPLATE, context)


def resync_message(kind: str, resynced) -> tuple[int, str]:
    """What a re-sync (``billing.services.resync.Resynced``) did, for support."""
    name = f"{kind} {resynced.stripe_id}"
    if resynced.new:
        return messages.SUCCESS, f"{name} was not mirrored yet: it is now, as Stripe has it."
    if not resynced.applied:
        return messages.INFO, f"{name} was fetched, but a newer event was applied meanwhile: nothing was written."
    if not resynced.changed:
        return messages.SUCCESS, f"{name} was re-synced from Stripe: it already agreed, nothing changed."
    changes = "; ".join(
        f"{field} {_shown(before)} → {_shown(after)}" for field, (before, after) in sorted(resynced.changed.items())
    )
    return messages.SUCCESS, f"{name} was re-synced from Stripe: {changes}."


def _shown(value) -> str:
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M} UTC"
    return str(value)

"""What a list page accepts from its address, so that nothing typed there answers 500.

Out of the box, Django's admin filters a list by any lookup on the model's own fields that a
query string names (``?last_error__regex=(``: PostgreSQL rejects the pattern, the page answers
500), lets a date hierarchy's year run past 9999, and trusts the ids an action posts. A list
built on ``CheckedListMixin`` accepts:

* the parameters of the filters it shows (``list_filter``) and of its date hierarchy, and the
  lookups it names in ``list_lookups`` (the inbox's ``object_id``, which the "events" links
  use): any other parameter is one the list does not offer. (A lookup across relations that no
  filter offers is refused by Django itself, with 400.)
* values the field can hold: what Django cannot turn into the field's type, a date out of
  range or a page that does not exist never reaches the database;
* a search of at most ``MAX_SEARCH_CHARS`` characters (a longer one finds nothing: no field it
  searches holds that much), here and in the autocomplete of related fields;

Whatever it does not accept ends where Django sends parameters it cannot use
(``IncorrectLookupParameters``): the whole list, under a warning saying why. A NUL byte, which
PostgreSQL's text cannot hold, is answered 400 before any view runs (``config.middleware``).
"""

from __future__ import annotations

from functools import cache

from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ERROR_FLAG, ChangeList
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect

MAX_SEARCH_CHARS = 255
# Lookups a list's own filters may be given directly (``?created__gte=2026-01-01``).
OFFERED_LOOKUPS = frozenset({"exact", "iexact", "isnull", "in", "gt", "gte", "lt", "lte"})
INVALID_PARAMETERS = (
    "That address asked this list for something it cannot show (a filter it does not offer, or a "
    "value it cannot use): here is the whole list."
)


class ChangeListChecks:
    """Mixed into a changelist class: every parameter it cannot use is ``IncorrectLookupParameters``."""

    def get_filters(self, request):
        try:
            specs, has_filters, remaining, may_have_duplicates, has_active = super().get_filters(request)
        except (ValueError, OverflowError) as exc:  # a date hierarchy's year 9999 runs out of datetimes
            raise IncorrectLookupParameters(exc) from exc
        # What the filters did not take: only the lookups the list names may remain.
        for key in remaining:
            if not self.model_admin.lookup_offered(key):
                raise IncorrectLookupParameters(f"{key} is not a filter of this list")
        return specs, has_filters, remaining, may_have_duplicates, has_active


@cache
def checked(changelist_class: type[ChangeList]) -> type[ChangeList]:
    """``changelist_class`` with the checks (an admin's own changelist class keeps what it adds)."""
    return type(f"Checked{changelist_class.__name__}", (ChangeListChecks, changelist_class), {})


class CheckedListMixin:
    """A ModelAdmin whose list, search, actions and history pages check what the address says."""

    list_lookups: tuple[str, ...] = ()

    def get_changelist(self, request, **kwargs):
        return checked(super().get_changelist(request, **kwargs))

    def lookup_offered(self, key: str) -> bool:
        """Whether ``key`` (left after the filters took theirs) is a lookup this list offers."""
        names = {*self.list_lookups, *([self.date_hierarchy] if self.date_hierarchy else [])}
        if key in names:
            return True
        path, _, lookup = key.rpartition("__")
        return path in names and lookup in OFFERED_LOOKUPS

    def get_search_results(self, request, queryset, search_term):
        if len(search_term) > MAX_SEARCH_CHARS:
            return queryset.none(), False  # no field it searches holds that much
        return super().get_search_results(request, queryset, search_term)

    def changelist_view(self, request, extra_context=None):
        if ERROR_FLAG in request.GET:
            self.message_user(request, INVALID_PARAMETERS, messages.WARNING)
        return super().changelist_view(request, extra_context)

    def response_action(self, request, queryset):
        """Ids that are not ids of this model (``_selected_action=abc``) select nothing."""
        if not all(self._is_pk(value) for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)):
            self.message_user(request, "The selection was not valid: nothing was done.", messages.WARNING)
            return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset)

    def history_view(self, request, object_id, extra_context=None):
        if not self._is_pk(unquote(object_id)):
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        return super().history_view(request, object_id, extra_context)

    def history_form_view(self, request, object_id, version_id, extra_context=None):
        """simple-history's page of one past version (only on models with history)."""
        version = str(version_id)
        if not (self._is_pk(unquote(object_id)) and version.isascii() and version.isdigit() and len(version) < 19):
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        return super().history_form_view(request, object_id, version_id, extra_context)

    def _is_pk(self, value: str) -> bool:
        try:
            self.opts.pk.to_python(value)
        except (ValidationError, ValueError):
            return False
        return True

"""Re-sync a subscription or an invoice from Stripe's API, through the webhook's own services.

Support uses it when the mirror disagrees with Stripe: an event Stripe gave up delivering, a
bug fixed since. The object is fetched first, outside any transaction (an HTTP call never
holds a lock), then applied in one transaction by the services its events go through
(``mirror_subscription``; ``mirror_invoice`` and, as on ``invoice.paid``,
``settle_paid_invoice``), so every rule of theirs holds: the locks and their order, history
rows (with the person who asked, through simple-history's request), entitlements and renewals
kept in step, a paid period granted once, a receipt owed once.

Which time the fetched object is applied as
-------------------------------------------
A mirrored row keeps Stripe's ``created`` of the event that last wrote it, and an older
snapshot never overwrites a newer one (docs/decisions/0002-inbox-and-ordering.rst). A fetched
object has no event; it is applied as a snapshot taken *when Stripe answered*: the ``Date`` of
the API's response, read on Stripe's own clock, the clock of every event's ``created``.

* An event created before that instant describes an older state. Once the fetch is applied,
  such an event delivered late (a retry, a replay) is older than the row and is not written
  over it; whatever else it owes (a receipt, a renewal) still happens, as for any stale event.
* An event created after it is newer, and is applied as usual. One created in the same second
  ties, and on a tie the later delivery wins, as between any two events.
* If a newer event was applied between the fetch and its application, the fetch is the older
  snapshot and is not written: the row already says more.
* An invoice's status never moves backwards, whatever the times (``mirror_invoice``): a
  re-sync cannot turn a paid invoice back into an open one.

Rejected: the object's own ``created`` (its creation: every later event would beat the fetch,
which would be written only on a row that has none), our own clock (it is not the clock of
Stripe's events, and a skew of seconds would misorder them), and "later than anything stored"
(an event created after the fetch but delivered after the re-sync would then lose to it).

The row's ``last_event_id`` becomes the API request's id (``req_...``, findable in Stripe's
logs), and its history rows give "re-synced from Stripe" as the reason.
"""

from __future__ import annotations

from typing import NamedTuple

import stripe
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.forms.models import model_to_dict

from .. import stripe_api
from ..errors import PrerequisiteMissing
from ..models import Invoice, Subscription
from ..stripe_payloads import Event, PayloadError
from .invoices import mirror_invoice, settle_paid_invoice
from .subscriptions import mirror_subscription

REASON = "re-synced from Stripe"
# Bookkeeping that moves on every re-sync; a change of these is no news to support.
# (``created_at`` and ``updated_at`` are not editable: ``model_to_dict`` leaves them out.)
_BOOKKEEPING = {"last_event_created", "last_event_id"}


class ResyncFailed(Exception):
    """The object could not be fetched or applied; the message says why, for support."""


class Resynced(NamedTuple):
    stripe_id: str
    applied: bool  # False: a newer event was applied meanwhile; the fetch was older than the row
    changed: dict  # field -> (before, after), for what the re-sync changed on the row
    new: bool  # the row did not exist before: Stripe's answer created it


def resync_subscription(stripe_id: str) -> Resynced:
    """Fetch subscription ``stripe_id`` and mirror it (entitlements and renewals follow)."""
    fetched = _fetch(stripe_api.retrieve_subscription, stripe_id, "subscription")
    before = _fields(Subscription.objects.filter(stripe_id=stripe_id).first())
    try:
        with transaction.atomic():
            sub, applied = mirror_subscription(_as_event(fetched))
    except (PrerequisiteMissing, PayloadError) as exc:
        raise ResyncFailed(f"Stripe's answer for {stripe_id} could not be applied: {exc}") from exc
    after = _fields(Subscription.objects.get(pk=sub.pk))
    return Resynced(stripe_id, applied, _changes(before, after), new=not before)


def resync_invoice(stripe_id: str) -> Resynced:
    """Fetch invoice ``stripe_id``, mirror it, and settle it if it is paid (as ``invoice.paid`` does)."""
    fetched = _fetch(stripe_api.retrieve_invoice, stripe_id, "invoice")
    before = _fields(Invoice.objects.filter(stripe_id=stripe_id).first())
    try:
        with transaction.atomic():
            mirrored = mirror_invoice(_as_event(fetched))
            settle_paid_invoice(mirrored.invoice, mirrored.renewal)
    except (PrerequisiteMissing, PayloadError) as exc:
        raise ResyncFailed(f"Stripe's answer for {stripe_id} could not be applied: {exc}") from exc
    after = _fields(Invoice.objects.get(pk=mirrored.invoice.pk))
    return Resynced(stripe_id, mirrored.applied, _changes(before, after), new=not before)


def _fetch(retrieve, stripe_id: str, kind: str) -> stripe_api.Fetched:
    try:
        return retrieve(stripe_id)
    except ImproperlyConfigured as exc:
        raise ResyncFailed(str(exc)) from exc
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            raise ResyncFailed(f"Stripe has no {kind} {stripe_id}.") from exc
        raise ResyncFailed(f"Stripe refused to return {kind} {stripe_id}: {exc.user_message or exc}") from exc
    except stripe.StripeError as exc:
        raise ResyncFailed(f"Stripe could not be asked for {kind} {stripe_id}: {exc.user_message or exc}") from exc


def _as_event(fetched: stripe_api.Fetched) -> Event:
    """The fetched object as the snapshot of an event created when Stripe answered (module docstring)."""
    return Event(
        id=fetched.request_id or "re-sync",
        type=REASON,
        created=fetched.answered_at,
        api_version="",
        livemode=bool(fetched.obj.get("livemode")),
        obj=fetched.obj,
        previous_attributes={},
    )


def _fields(row) -> dict:
    return {} if row is None else model_to_dict(row)


def _changes(before: dict, after: dict) -> dict:
    return {
        name: (before.get(name), value)
        for name, value in after.items()
        if name not in _BOOKKEEPING and before.get(name) != value
    }

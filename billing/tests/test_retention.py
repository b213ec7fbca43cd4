"""Retention (issue 21, item 6): the inbox pruned by ``prune_stripe_events``; history by
django-simple-history's own ``clean_old_history`` and ``clean_duplicate_history``.

Pruning deletes processed and ignored events received more than N days ago, in batches, and
never a failed or received one. It must break nothing that reads the inbox: mirrored rows keep
the id of the event that last wrote them (``last_event_id``) and their admin pages link to the
inbox, so those pages are opened after a prune.
"""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.apps import apps
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from billing.models import Invoice, StripeEvent, Subscription
from billing.simulation.objects import event_object, subscription_object
from billing.tests.factories import InvoiceFactory, StripeEventFactory, SubscriptionFactory
from provisioning.models import Account
from provisioning.tests.factories import AccountFactory, UserFactory

from .conftest import DAY, T0, database_state, first_invoice_paid_event

pytestmark = pytest.mark.django_db

Status = StripeEvent.Status


def aged_event(status: str, *, days: float, **fields) -> StripeEvent:
    """An inbox row of ``status`` that this app received ``days`` ago (``received_at`` is set on insert)."""
    event = StripeEventFactory(status=status, **fields)
    StripeEvent.objects.filter(pk=event.pk).update(received_at=timezone.now() - timedelta(days=days))
    return event


def prune(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("prune_stripe_events", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def remaining() -> set[str]:
    return set(StripeEvent.objects.values_list("pk", flat=True))


AGES = {"years": 700, "just_past": 90.01, "just_inside": 89.99, "recent": 2}


@pytest.fixture
def inbox_of_every_status_and_age() -> dict[tuple[str, str], str]:
    """An event of each status at each age of ``AGES`` (around the default window of 90 days): their ids."""
    return {(status, age): aged_event(status, days=days).pk for status in Status.values for age, days in AGES.items()}


def ids(events: dict, *, statuses=Status.values, ages=AGES) -> set[str]:
    return {pk for (status, age), pk in events.items() if status in statuses and age in ages}


# --- prune_stripe_events ---------------------------------------------------------------------


def test_only_processed_and_ignored_events_older_than_the_window_are_deleted(inbox_of_every_status_and_age):
    events = inbox_of_every_status_and_age
    pruned = ids(events, statuses=["processed", "ignored"], ages=["years", "just_past"])
    assert len(pruned) == 4

    out, _ = prune()

    assert remaining() == ids(events) - pruned
    assert "deleted 4 processed and ignored events" in out
    assert "(processed 2, ignored 2)" in out
    # Failed and received events stay, however old: they are work still to do.
    assert StripeEvent.objects.filter(status=Status.FAILED).count() == 4
    assert StripeEvent.objects.filter(status=Status.RECEIVED).count() == 4


def test_the_window_is_counted_from_when_the_event_was_received_not_created():
    """An event Stripe created long ago but that arrived recently (fetched after an outage) stays."""
    long_ago = timezone.now() - timedelta(days=400)
    late = aged_event(Status.PROCESSED, days=5, created=long_ago)
    old = aged_event(Status.PROCESSED, days=400, created=long_ago)

    prune("--older-than-days", "90")

    assert remaining() == {late.pk}
    assert old.pk not in remaining()


def test_a_longer_window_keeps_more(inbox_of_every_status_and_age):
    events = inbox_of_every_status_and_age

    out, _ = prune("--older-than-days", "365")

    assert remaining() == ids(events) - ids(events, statuses=["processed", "ignored"], ages=["years"])
    assert "(processed 1, ignored 1)" in out


def test_batches_delete_everything_prunable_and_step_over_what_stays():
    # Interleaved in key order: what stays sits between the batches' rows.
    prunable = set()
    for n in range(7):
        prunable.add(aged_event(Status.PROCESSED if n % 2 else Status.IGNORED, days=120, id=f"evt_{n:02d}a").pk)
        aged_event(Status.FAILED, days=120, id=f"evt_{n:02d}b")
    kept = remaining() - prunable

    out, err = prune("--batch-size", "3")

    assert remaining() == kept
    assert "deleted 7 processed and ignored events" in out
    assert "(processed 3, ignored 4) in 3 batch(es)" in out
    assert "pruning stripe events: 7/7" in err  # progress, on stderr
    assert err.rstrip().endswith("done")


def test_dry_run_reports_the_counts_and_deletes_nothing(inbox_of_every_status_and_age):
    before = database_state()

    out, _ = prune("--dry-run")

    assert database_state() == before
    assert "would delete 4 processed and ignored events" in out
    assert "(processed 2, ignored 2); dry run, nothing deleted" in out


def test_nothing_to_prune_says_so():
    aged_event(Status.PROCESSED, days=3)

    out, err = prune()

    assert "deleted 0 processed and ignored events" in out
    assert "in 0 batch(es)" in out
    assert "pruning stripe events: 0" in err and "done" in err
    assert StripeEvent.objects.count() == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("--older-than-days", "29"), "at least 30"),
        (("--older-than-days", "-1"), "at least 30"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
    ],
)
def test_unsafe_arguments_are_refused(args, message):
    event = aged_event(Status.PROCESSED, days=365)

    with pytest.raises(CommandError, match=message):
        prune(*args)

    assert remaining() == {event.pk}


def test_pruned_events_break_no_page_and_no_row(client, post_event):
    """Rows written by events that are then pruned keep working: their admin pages (which show
    ``last_event_id`` and link to the inbox), the inbox's own pages, and the rows themselves."""
    subscription = subscription_object(
        id="sub_retained",
        customer="cus_retained",
        status="active",
        created=T0,
        current_period_start=T0,
        current_period_end=T0 + 30 * DAY,
    )
    deliveries = [
        event_object(type="customer.subscription.created", obj=subscription, created=T0),
        first_invoice_paid_event(
            "in_retained", sub_id="sub_retained", customer="cus_retained", start=T0, end=T0 + 30 * DAY, created=T0 + 60
        ),
    ]
    for payload in deliveries:
        assert post_event(payload).status_code == 200
    failed = aged_event(Status.FAILED, days=365, object_id="sub_retained", type="customer.subscription.updated")
    StripeEvent.objects.exclude(pk=failed.pk).update(received_at=timezone.now() - timedelta(days=365))
    mirror_before = {label: rows for label, rows in database_state().items() if label != "billing.StripeEvent"}

    out, _ = prune()

    assert "deleted 2" in out
    assert remaining() == {failed.pk}
    assert {label: rows for label, rows in database_state().items() if label != "billing.StripeEvent"} == mirror_before
    sub, invoice = Subscription.objects.get(), Invoice.objects.get()
    assert not StripeEvent.objects.filter(pk__in=[sub.last_event_id, invoice.last_event_id]).exists()

    client.force_login(UserFactory(superuser=True))
    for url in [
        reverse("admin:billing_subscription_change", args=[sub.pk]),
        reverse("admin:billing_invoice_change", args=[invoice.pk]),
        reverse("admin:billing_subscription_history", args=[sub.pk]),
        reverse("admin:provisioning_account_change", args=[sub.account_id]),
        reverse("admin:billing_stripeevent_changelist"),
        reverse("admin:billing_stripeevent_change", args=[failed.pk]),
    ]:
        response = client.get(url)
        assert response.status_code == 200, url
    page = client.get(reverse("admin:billing_subscription_change", args=[sub.pk])).content.decode()
    assert sub.last_event_id in page  # the pruned event's id is still shown, as text
    assert "1 event in the inbox" in page  # the failed one; the pruned ones are no longer counted


# --- History: django-simple-history's own commands -------------------------------------------


def history_models():
    return [
        model
        for label in ("billing", "provisioning")
        for model in apps.get_app_config(label).get_models()
        if hasattr(model, "history") and not model.__name__.startswith("Historical")
    ]


def test_clean_old_history_deletes_history_older_than_the_window_from_every_history_model():
    account = AccountFactory(name="Old history")
    subscription = SubscriptionFactory(account=account)
    invoice = InvoiceFactory(subscription=subscription)
    for model in history_models():
        model.history.model.objects.update(history_date=timezone.now() - timedelta(days=400))
    # A change made today: its history row is recent.
    invoice.number = "RECENT-1"
    invoice.save()
    assert invoice.history.count() == 2
    old_rows = sum(model.history.model.objects.count() for model in history_models()) - 1

    out = StringIO()
    call_command("clean_old_history", "--auto", "--days", "365", stdout=out)

    assert [h.number for h in invoice.history.all()] == ["RECENT-1"]
    for model in history_models():
        assert model.history.model.objects.count() == (1 if model is Invoice else 0), model
    report = out.getvalue()
    assert "Removed 1 historical records for <class 'provisioning.models.Account'>" in report
    assert "Removed 1 historical records for <class 'billing.models.Invoice'>" in report  # the old one of two
    assert sum(int(line.split()[1]) for line in report.splitlines() if line.startswith("Removed")) == old_rows
    # The rows themselves are untouched.
    assert Account.objects.filter(pk=account.pk).exists() and Invoice.objects.filter(pk=invoice.pk).exists()


def test_clean_duplicate_history_removes_identical_consecutive_entries_only(client):
    subscription = SubscriptionFactory(quantity=1)
    subscription.save()  # saved again unchanged: a duplicate history entry
    subscription.save()
    subscription.quantity = 5
    subscription.save()  # a real change stays
    assert subscription.history.count() == 4

    out = StringIO()
    call_command("clean_duplicate_history", "--auto", stdout=out)

    assert [h.quantity for h in subscription.history.all()] == [5, 1]
    assert "Removed 2 historical records for <class 'billing.models.Subscription'>" in out.getvalue()
    client.force_login(UserFactory(superuser=True))
    assert client.get(reverse("admin:billing_subscription_history", args=[subscription.pk])).status_code == 200

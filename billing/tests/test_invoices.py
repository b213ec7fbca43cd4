"""Invoices and renewals: the orders Stripe really uses, and the guard on linked renewals."""

from __future__ import annotations

import logging

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import Invoice, InvoiceLineItem, OwedEmail, Renewal, StripeEvent
from billing.simulation.objects import event_object, invoice_line_object, invoice_object
from billing.tests.conftest import (
    DAY,
    T0,
    as_datetime,
    first_invoice_paid_event,
    subscription_event,
    trial_subscription,
)
from provisioning.models import Entitlement

pytestmark = pytest.mark.django_db

SUB, CUS = "sub_inv1", "cus_inv1"
TRIAL_END = T0 + 14 * DAY
PERIOD_END = TRIAL_END + 30 * DAY


def renewal_invoice(invoice_id, *, status, start=TRIAL_END, end=PERIOD_END, quantity=2, created=TRIAL_END, **extra):
    line = invoice_line_object(
        id=f"il_{invoice_id}",
        invoice=invoice_id,
        amount=2000 * quantity,
        quantity=quantity,
        period_start=start,
        period_end=end,
        subscription=SUB,
    )
    finalized = status != "draft"
    return invoice_object(
        id=invoice_id,
        customer=CUS,
        status=status,
        billing_reason="subscription_cycle",
        lines=[line],
        subscription=SUB,
        number=f"INV-{invoice_id[-4:]}" if finalized else None,
        created=created,
        finalized_at=created + 3600 if finalized else None,
        paid_at=created + 3605 if status == "paid" else None,
        customer_email="owner@example.com",
        **extra,
    )


def invoice_event(type, obj, created):
    return event_object(type=type, obj=obj, created=created)


def trial_started(post_event, quantity=2):
    response = post_event(
        subscription_event("customer.subscription.created", trial_subscription(SUB, CUS, quantity=quantity), created=T0)
    )
    assert response.status_code == 200
    return Renewal.objects.get(subscription__stripe_id=SUB)


def test_trial_start_plans_the_renewal_at_trial_end(post_event):
    renewal = trial_started(post_event)
    assert renewal.effective_date == as_datetime(TRIAL_END)
    assert renewal.stripe_invoice_id is None and renewal.processed_at is None
    trial = Entitlement.objects.get(kind="trial")
    assert (trial.starts_at, trial.expires_at, trial.seats) == (as_datetime(T0), as_datetime(TRIAL_END), 2)


def test_invoice_created_links_the_renewal_and_paid_processes_it_once(post_event):
    renewal = trial_started(post_event)
    created = invoice_event("invoice.created", renewal_invoice("in_r1", status="draft"), TRIAL_END)
    assert post_event(created).status_code == 200
    renewal.refresh_from_db()
    assert renewal.stripe_invoice_id == "in_r1" and renewal.processed_at is None

    paid = invoice_event("invoice.paid", renewal_invoice("in_r1", status="paid"), TRIAL_END + 3605)
    for _ in range(3):
        assert post_event(paid).status_code == 200
    renewal.refresh_from_db()
    assert renewal.processed_at is not None
    entitlement = Entitlement.objects.get(kind="paid")
    assert (entitlement.starts_at, entitlement.expires_at, entitlement.seats) == (
        as_datetime(TRIAL_END),
        as_datetime(PERIOD_END),
        2,
    )
    assert renewal.to_entitlement == entitlement and renewal.from_entitlement.kind == "trial"
    # The next renewal is planned at the end of the paid period; one receipt is owed.
    assert list(Renewal.objects.values_list("effective_date", flat=True)) == [
        as_datetime(TRIAL_END),
        as_datetime(PERIOD_END),
    ]
    assert OwedEmail.objects.filter(kind="receipt").count() == 1


def test_invoice_paid_before_invoice_created_links_then_and_a_late_created_changes_nothing(post_event):
    renewal = trial_started(post_event)
    assert (
        post_event(invoice_event("invoice.paid", renewal_invoice("in_r2", status="paid"), TRIAL_END + 3605)).status_code
        == 200
    )
    renewal.refresh_from_db()
    assert renewal.stripe_invoice_id == "in_r2" and renewal.processed_at is not None

    late = invoice_event("invoice.created", renewal_invoice("in_r2", status="draft"), TRIAL_END)
    assert post_event(late).status_code == 200
    invoice = Invoice.objects.get(stripe_id="in_r2")
    assert invoice.status == "paid" and invoice.amount_paid == 4000 and invoice.number == "INV-n_r2"
    assert StripeEvent.objects.get(pk=late["id"]).status == "processed"  # handled, changed nothing
    assert Entitlement.objects.filter(kind="paid").count() == 1


def test_same_second_snapshots_never_move_an_invoice_status_backwards(post_event):
    trial_started(post_event)
    paid = invoice_event("invoice.paid", renewal_invoice("in_r3", status="paid"), TRIAL_END + 3600)
    finalized = invoice_event("invoice.finalized", renewal_invoice("in_r3", status="open"), TRIAL_END + 3600)
    assert post_event(paid).status_code == 200
    assert post_event(finalized).status_code == 200  # same created, delivered later
    invoice = Invoice.objects.get(stripe_id="in_r3")
    assert (invoice.status, invoice.amount_paid, invoice.amount_remaining) == ("paid", 4000, 0)


def test_invoice_paid_before_its_subscription_is_retried_then_applied(post_event):
    paid = invoice_event("invoice.paid", renewal_invoice("in_r4", status="paid"), TRIAL_END + 3605)
    first = post_event(paid)
    assert first.status_code == 500
    event = StripeEvent.objects.get(pk=paid["id"])
    assert event.status == "failed" and "not known yet" in event.last_error
    assert not Invoice.objects.exists() and not OwedEmail.objects.exists()  # all or nothing

    trial_started(post_event)
    assert post_event(paid).status_code == 200
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("processed", 2)
    renewal = Renewal.objects.get(stripe_invoice_id="in_r4")
    assert renewal.effective_date == as_datetime(TRIAL_END) and renewal.processed_at is not None
    assert OwedEmail.objects.filter(kind="receipt", invoice__stripe_id="in_r4").count() == 1


def test_a_linked_renewal_keeps_its_invoice_and_a_conflicting_one_is_a_warning(post_event, caplog):
    renewal = trial_started(post_event)
    assert (
        post_event(invoice_event("invoice.created", renewal_invoice("in_first", status="draft"), TRIAL_END)).status_code
        == 200
    )
    # Same subscription, same period start: a second invoice (e.g. the first was voided and replaced).
    other = invoice_event(
        "invoice.created", renewal_invoice("in_second", status="draft", created=TRIAL_END + 60), TRIAL_END + 60
    )
    with caplog.at_level(logging.WARNING, logger="billing.services.renewals"):
        assert post_event(other).status_code == 200
    renewal.refresh_from_db()
    assert renewal.stripe_invoice_id == "in_first"
    assert Renewal.objects.filter(stripe_invoice_id="in_second").count() == 0
    assert any("conflicting invoice in_second" in r.getMessage() for r in caplog.records)
    assert StripeEvent.objects.get(pk=other["id"]).status == "processed"


def test_renewal_planned_after_its_invoice_arrived_is_linked_from_the_renewal_side(post_event):
    # invoice.created for the trial-end period arrives before the subscription itself.
    created = invoice_event("invoice.created", renewal_invoice("in_early", status="draft"), TRIAL_END)
    assert post_event(created).status_code == 200
    invoice = Invoice.objects.get(stripe_id="in_early")
    assert invoice.subscription is None and invoice.stripe_subscription_id == SUB
    renewal = trial_started(post_event)
    invoice.refresh_from_db()
    assert invoice.subscription is not None
    assert renewal.stripe_invoice_id == "in_early"


def test_same_utc_date_links_when_the_instant_drifts(post_event):
    renewal = trial_started(post_event)
    drifted = renewal_invoice("in_drift", status="draft", start=TRIAL_END + 7, end=PERIOD_END + 7)
    assert post_event(invoice_event("invoice.created", drifted, TRIAL_END + 7)).status_code == 200
    renewal.refresh_from_db()
    assert renewal.stripe_invoice_id == "in_drift"


def test_one_off_invoice_is_mirrored_with_its_lines_and_owes_a_receipt(post_event):
    line = invoice_line_object(
        id="il_once",
        invoice="in_once",
        amount=150000,
        currency="jpy",
        quantity=1,
        period_start=T0,
        period_end=T0,
        description="Workshop",
    )
    obj = invoice_object(
        id="in_once",
        customer="cus_once",
        status="paid",
        billing_reason="manual",
        lines=[line],
        currency="jpy",
        number="ONCE-1",
        created=T0,
        finalized_at=T0 + 1,
        paid_at=T0 + 2,
        customer_email="buyer@example.com",
        customer_name="Buyer Ltd",
    )
    assert post_event(invoice_event("invoice.paid", obj, T0 + 2)).status_code == 200
    invoice = Invoice.objects.get(stripe_id="in_once")
    assert (invoice.subscription, invoice.currency, invoice.total, invoice.amount_paid) == (None, "jpy", 150000, 150000)
    assert invoice.account.name == "Buyer Ltd" and invoice.paid_at == as_datetime(T0 + 2)
    assert list(InvoiceLineItem.objects.values_list("stripe_id", "amount")) == [("il_once", 150000)]
    assert OwedEmail.objects.get().key == "receipt:in_once"
    assert not Renewal.objects.exists() and not Entitlement.objects.exists()


def test_payment_failed_owes_one_billing_error_per_attempt(post_event):
    trial_started(post_event)
    failed = renewal_invoice("in_fail", status="open", attempt_count=1)
    event = invoice_event("invoice.payment_failed", failed, TRIAL_END + 3600)
    assert post_event(event).status_code == 200
    assert post_event(event).status_code == 200  # duplicate delivery
    assert list(OwedEmail.objects.values_list("key", flat=True)) == ["payment_failed:in_fail:1"]
    retry = invoice_event(
        "invoice.payment_failed", renewal_invoice("in_fail", status="open", attempt_count=2), TRIAL_END + 3 * DAY
    )
    assert post_event(retry).status_code == 200
    assert OwedEmail.objects.filter(kind="payment_failed").count() == 2
    assert not Entitlement.objects.filter(kind="paid").exists()


def test_created_finalized_and_paid_link_the_renewal_and_process_it_once(post_event):
    renewal = trial_started(post_event)
    created = invoice_event("invoice.created", renewal_invoice("in_r1", status="draft"), TRIAL_END)
    finalized = invoice_event("invoice.finalized", renewal_invoice("in_r1", status="open"), TRIAL_END + 3600)
    paid = invoice_event("invoice.paid", renewal_invoice("in_r1", status="paid"), TRIAL_END + 3605)

    for event in (created, finalized, paid, paid):
        assert post_event(event).status_code == 200

    renewal.refresh_from_db()
    assert renewal.stripe_invoice_id == "in_r1" and renewal.processed_at is not None
    assert Entitlement.objects.get(kind="paid").starts_at == as_datetime(TRIAL_END)


def test_a_paid_renewal_is_marked_processed_and_relinked_in_one_history_row_and_plans_the_next(post_event):
    """``invoice.paid`` of a linked renewal: one save marks it processed (its history row says
    by which invoice) and moves it to its paid window, and the next renewal is planned."""
    renewal = trial_started(post_event)
    assert (
        post_event(invoice_event("invoice.created", renewal_invoice("in_r1", status="draft"), TRIAL_END)).status_code
        == 200
    )
    rows_before = renewal.history.count()
    paid = invoice_event("invoice.paid", renewal_invoice("in_r1", status="paid"), TRIAL_END + 3605)
    assert post_event(paid).status_code == 200

    renewal.refresh_from_db()
    paid_window = Entitlement.objects.get(kind="paid")
    assert renewal.processed_at is not None
    assert (renewal.from_entitlement.kind, renewal.to_entitlement) == ("trial", paid_window)
    assert renewal.history.count() == rows_before + 1
    latest = renewal.history.latest("history_date")
    assert latest.history_change_reason == "processed by in_r1" and latest.processed_at == renewal.processed_at
    assert (latest.from_entitlement_id, latest.to_entitlement_id) == (renewal.from_entitlement_id, paid_window.pk)
    assert list(Renewal.objects.values_list("effective_date", "stripe_invoice_id")) == [
        (as_datetime(TRIAL_END), "in_r1"),
        (as_datetime(PERIOD_END), None),
    ]


def test_a_renewal_planned_after_its_invoice_arrived_is_linked_to_it(post_event):
    """The next period's invoice can arrive before the current one is paid: the renewal
    planned at the period's end is then created linked to it (the conditional INSERT steps
    aside for the way that links)."""
    trial_started(post_event)
    next_invoice = renewal_invoice(
        "in_r2", status="draft", start=PERIOD_END, end=PERIOD_END + 30 * DAY, created=PERIOD_END
    )
    assert post_event(invoice_event("invoice.created", next_invoice, PERIOD_END)).status_code == 200
    assert not Renewal.objects.filter(effective_date=as_datetime(PERIOD_END)).exists()

    paid = invoice_event("invoice.paid", renewal_invoice("in_r1", status="paid"), TRIAL_END + 3605)
    assert post_event(paid).status_code == 200
    assert list(Renewal.objects.order_by("effective_date").values_list("effective_date", "stripe_invoice_id")) == [
        (as_datetime(TRIAL_END), "in_r1"),
        (as_datetime(PERIOD_END), "in_r2"),
    ]


def _statements_during(post, event) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        assert post(event).status_code == 200
    return [q["sql"] for q in queries.captured_queries]


def test_draft_lines_are_rewritten_when_they_change_and_not_even_read_when_they_do_not(post_event):
    trial_started(post_event)
    draft = renewal_invoice("in_lines", status="draft")
    assert post_event(invoice_event("invoice.created", draft, TRIAL_END)).status_code == 200
    extra = invoice_line_object(
        id="il_extra", invoice="in_lines", amount=500, quantity=1, period_start=T0, period_end=T0, description="Extra"
    )
    edited = renewal_invoice("in_lines", status="draft", created=TRIAL_END)
    edited["lines"]["data"].append(extra)
    edited["lines"]["total_count"] = 2
    assert post_event(invoice_event("invoice.updated", edited, TRIAL_END + 10)).status_code == 200
    assert sorted(InvoiceLineItem.objects.values_list("stripe_id", flat=True)) == ["il_extra", "il_in_lines"]
    history_rows = InvoiceLineItem.history.count()

    finalized = renewal_invoice("in_lines", status="open", created=TRIAL_END)
    finalized["lines"] = edited["lines"]
    statements = _statements_during(post_event, invoice_event("invoice.finalized", finalized, TRIAL_END + 3600))
    assert not [s for s in statements if "billing_invoicelineitem" in s]  # same lines: neither read nor written
    assert InvoiceLineItem.history.count() == history_rows
    invoice = Invoice.objects.get(stripe_id="in_lines")
    assert invoice.status == "open" and invoice.lines.count() == 2


def test_an_invoice_with_no_renewal_on_its_date_reads_no_renewals(post_event):
    """The subscription's first invoice: no renewal can match, and invoice_read already knows."""
    trial_started(post_event)
    first = first_invoice_paid_event("in_first", sub_id=SUB, customer=CUS, start=T0, end=TRIAL_END, created=T0 + 5)
    statements = _statements_during(post_event, first)
    assert not [s for s in statements if s.startswith('SELECT "billing_renewal"')]  # the ORM's candidate read
    assert Renewal.objects.get().stripe_invoice_id is None  # the trial's renewal stays for its own invoice

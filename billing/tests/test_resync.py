"""Re-sync from Stripe's API (``billing.services.resync``): a fetched object is applied through the
webhook's services as a snapshot taken when Stripe answered.

stripe-python calls a local server in Stripe's shape (``stripe_server``); events are signed and
posted to the webhook. What must hold: the fetch wins over every event created before it and
loses to every event created after it; an invoice's status never moves backwards; a paid
invoice fetched from Stripe is settled once, as ``invoice.paid`` would settle it.
"""

from __future__ import annotations

import time

import pytest

from billing.models import Invoice, OwedEmail, StripeEvent, Subscription
from billing.services.resync import ResyncFailed, resync_invoice, resync_subscription
from billing.simulation.objects import event_object, invoice_line_object, invoice_object, subscription_object
from billing.tests.conftest import DAY, deliver
from provisioning.models import Entitlement

pytestmark = pytest.mark.django_db

NOW = int(time.time())
START = NOW - 3 * DAY


@pytest.fixture
def post(client, webhook_settings):
    def post(payload, expect=200):
        response = deliver(client, payload)
        assert response.status_code == expect, response.content
        return response

    return post


def subscription(quantity=1, **changes) -> dict:
    fields = dict(
        id="sub_rs",
        customer="cus_rs",
        status="active",
        quantity=quantity,
        created=START,
        current_period_start=START,
        current_period_end=START + 30 * DAY,
    )
    return subscription_object(**{**fields, **changes})


def invoice(status: str, **changes) -> dict:
    line = invoice_line_object(
        id="il_rs",
        invoice="in_rs",
        amount=2000,
        quantity=1,
        period_start=START,
        period_end=START + 30 * DAY,
        subscription="sub_rs",
    )
    paid = {"paid_at": START + 120} if status == "paid" else {}
    fields = dict(
        id="in_rs",
        customer="cus_rs",
        status=status,
        billing_reason="subscription_create",
        lines=[line],
        subscription="sub_rs",
        number="RS-0001",
        created=START,
        finalized_at=START + 1,
        customer_email="rs@example.com",
        **paid,
    )
    return invoice_object(**{**fields, **changes})


def test_the_fetch_wins_over_older_events_and_loses_to_newer_ones(fake_stripe, post):
    post(event_object(type="customer.subscription.created", obj=subscription(quantity=1), created=START))
    fake_stripe.subscriptions["sub_rs"] = subscription(quantity=4)

    resynced = resync_subscription("sub_rs")

    assert resynced.applied and resynced.changed == {"quantity": (1, 4)}
    sub = Subscription.objects.get(stripe_id="sub_rs")
    assert sub.quantity == 4 and abs(sub.last_event_created.timestamp() - time.time()) < 5
    assert sub.last_event_id.startswith("req_")
    assert fake_stripe.requests[-1][0] == "/v1/subscriptions/sub_rs"

    # A retry of an event created before the fetch: stored and processed, but older than the row.
    post(event_object(type="customer.subscription.updated", obj=subscription(quantity=2), created=START + 60))
    assert Subscription.objects.get(stripe_id="sub_rs").quantity == 4
    # An event created after the fetch is newer news.
    post(
        event_object(type="customer.subscription.updated", obj=subscription(quantity=6), created=int(time.time()) + 60)
    )
    assert Subscription.objects.get(stripe_id="sub_rs").quantity == 6


def test_a_paid_invoice_fetched_from_stripe_is_settled_once(fake_stripe, post):
    post(event_object(type="customer.subscription.created", obj=subscription(), created=START))
    post(event_object(type="invoice.finalized", obj=invoice("open"), created=START + 2))
    assert not Entitlement.objects.filter(kind=Entitlement.Kind.PAID).exists()
    fake_stripe.invoices["in_rs"] = invoice("paid")  # Stripe never delivered invoice.paid

    resynced = resync_invoice("in_rs")

    assert resynced.applied and resynced.changed["status"] == ("open", "paid")
    assert Invoice.objects.get(stripe_id="in_rs").status == Invoice.Status.PAID
    paid = Entitlement.objects.get(kind=Entitlement.Kind.PAID, stripe_invoice_id="in_rs")
    assert (paid.starts_at.timestamp(), paid.expires_at.timestamp()) == (START, START + 30 * DAY)
    assert OwedEmail.objects.filter(key="receipt:in_rs").count() == 1

    # invoice.paid arrives at last: older than the fetch, nothing is granted or owed twice.
    late = event_object(type="invoice.paid", obj=invoice("paid"), created=START + 120)
    post(late)
    assert StripeEvent.objects.get(pk=late["id"]).status == StripeEvent.Status.PROCESSED
    assert Entitlement.objects.filter(kind=Entitlement.Kind.PAID).count() == 1
    assert OwedEmail.objects.filter(invoice__stripe_id="in_rs").count() == 1


def test_a_re_sync_never_moves_an_invoices_status_backwards(fake_stripe, post):
    post(event_object(type="customer.subscription.created", obj=subscription(), created=START))
    post(event_object(type="invoice.paid", obj=invoice("paid"), created=START + 120))
    fake_stripe.invoices["in_rs"] = invoice("open", number="RS-CHANGED")

    resynced = resync_invoice("in_rs")

    row = Invoice.objects.get(stripe_id="in_rs")
    assert not resynced.applied and resynced.changed == {}
    assert (row.status, row.number) == (Invoice.Status.PAID, "RS-0001")


def test_an_object_never_mirrored_is_mirrored_in_its_mode(fake_stripe):
    fake_stripe.subscriptions["sub_rs"] = subscription(quantity=3, livemode=True)

    resynced = resync_subscription("sub_rs")

    sub = Subscription.objects.get(stripe_id="sub_rs")
    assert resynced.new and (sub.quantity, sub.livemode, sub.account.stripe_customer_id) == (3, True, "cus_rs")
    assert sub.history.get().history_change_reason == "re-synced from Stripe"


def test_what_cannot_be_fetched_or_applied_fails_and_writes_nothing(fake_stripe, settings):
    with pytest.raises(ResyncFailed, match="Stripe has no invoice in_missing"):
        resync_invoice("in_missing")

    fake_stripe.invoices["in_rs"] = invoice("paid")  # pays for sub_rs, which is not mirrored yet
    with pytest.raises(ResyncFailed, match="not known yet"):
        resync_invoice("in_rs")
    assert not Invoice.objects.exists() and not Entitlement.objects.exists()

    fake_stripe.fail_next = 10  # Stripe answers 500, even to stripe-python's retries
    with pytest.raises(ResyncFailed, match="could not be asked"):
        resync_subscription("sub_rs")

    settings.STRIPE_API_KEY = ""
    with pytest.raises(ResyncFailed, match="STRIPE_API_KEY is not set"):
        resync_subscription("sub_rs")

"""Operator commands: fetch_stripe_events (Events API via a local Stripe-shaped server) and
reprocess_stripe_events. stripe-python makes real HTTP requests; nothing is patched."""

import io
import json
import time

import pytest
import stripe
from django.core.management import call_command
from django.core.management.base import CommandError

from billing import stripe_api
from billing.models import StripeEvent, Subscription
from billing.simulation.objects import event_object, invoice_line_object, invoice_object, subscription_object

SECRET = "whsec_commands"
NOW = int(time.time())


def subscription_event(sub_id="sub_cmd1", customer="cus_cmd1", created=NOW - 3600, event_id=None):
    obj = subscription_object(
        id=sub_id,
        customer=customer,
        status="active",
        quantity=3,
        current_period_start=created,
        current_period_end=created + 30 * 86400,
        created=created,
    )
    return event_object(type="customer.subscription.created", obj=obj, created=created, id=event_id)


def paid_invoice_event(sub_id="sub_cmd1", customer="cus_cmd1", created=NOW - 3000):
    line = invoice_line_object(
        id="il_cmd1",
        invoice="in_cmd1",
        amount=3000,
        quantity=3,
        period_start=created,
        period_end=created + 30 * 86400,
        subscription=sub_id,
    )
    obj = invoice_object(
        id="in_cmd1",
        customer=customer,
        status="paid",
        billing_reason="subscription_create",
        lines=[line],
        subscription=sub_id,
        number="CMD-0001",
        created=created,
        finalized_at=created,
        paid_at=created,
    )
    return event_object(type="invoice.paid", obj=obj, created=created)


def post(client, settings, payload):
    settings.STRIPE_WEBHOOK_SECRETS = [SECRET]
    body = json.dumps(payload)
    header = stripe.WebhookSignature.generate_signature_header(body, SECRET, timestamp=int(time.time()))
    return client.post("/billing/stripe/webhook/", body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)


@pytest.mark.django_db
def test_fetch_stores_and_applies_missing_events_and_skips_known_ones(client, settings, fake_stripe):
    known = subscription_event(sub_id="sub_known", customer="cus_known")
    assert post(client, settings, known).status_code == 200
    missing = subscription_event()
    unknown_type = event_object(type="customer.created", obj={"id": "cus_x", "object": "customer"}, created=NOW - 10)
    fake_stripe.events = [known, missing, unknown_type]

    out = io.StringIO()
    call_command("fetch_stripe_events", "--since", "1d", stdout=out, stderr=io.StringIO())

    assert StripeEvent.objects.get(pk=missing["id"]).status == "processed"
    assert StripeEvent.objects.get(pk=unknown_type["id"]).status == "ignored"
    assert Subscription.objects.get(stripe_id="sub_cmd1").quantity == 3
    assert StripeEvent.objects.get(pk=known["id"]).attempts == 1  # not applied again
    assert "already in inbox 1" in out.getvalue() and "processed 1" in out.getvalue()
    path, query = fake_stripe.requests[0]
    asked_since = int(query["created[gte]"][0])
    assert path == "/v1/events" and abs(asked_since - (time.time() - 86400)) < 120


@pytest.mark.django_db
def test_fetch_follows_pagination(settings, fake_stripe):
    fake_stripe.events = [
        event_object(type="customer.created", obj={"id": f"cus_{i}", "object": "customer"}, created=NOW - i)
        for i in range(1, 231)
    ]
    call_command("fetch_stripe_events", stdout=io.StringIO(), stderr=io.StringIO())
    assert StripeEvent.objects.count() == 230
    assert len([r for r in fake_stripe.requests if r[0] == "/v1/events"]) == 3  # 100 + 100 + 30


@pytest.mark.django_db
def test_fetch_dry_run_stores_nothing(settings, fake_stripe):
    fake_stripe.events = [subscription_event()]
    out = io.StringIO()
    call_command("fetch_stripe_events", "--dry-run", stdout=out, stderr=io.StringIO())
    assert StripeEvent.objects.count() == 0
    assert "missing 1" in out.getvalue() and fake_stripe.events[0]["id"] in out.getvalue()


@pytest.mark.django_db
def test_fetch_reports_api_errors_and_missing_key_clearly(settings, fake_stripe):
    fake_stripe.fail_next = 10  # more than stripe-python's retries
    with pytest.raises(CommandError, match="Stripe API error"):
        call_command("fetch_stripe_events", stdout=io.StringIO(), stderr=io.StringIO())
    settings.STRIPE_API_KEY = ""
    with pytest.raises(CommandError, match="STRIPE_API_KEY"):
        call_command("fetch_stripe_events", stdout=io.StringIO(), stderr=io.StringIO())


@pytest.mark.django_db
def test_invoice_for_payment_intent_asks_the_invoice_payments_api(fake_stripe):
    fake_stripe.invoice_payments = [
        {
            "id": "inpay_1",
            "object": "invoice_payment",
            "invoice": "in_42",
            "payment": {"type": "payment_intent", "payment_intent": "pi_42"},
            "status": "paid",
        }
    ]
    assert stripe_api.invoice_for_payment_intent("pi_42") == "in_42"
    assert stripe_api.invoice_for_payment_intent("pi_other") is None


@pytest.mark.django_db
def test_reprocess_applies_failed_events_once_their_prerequisite_exists(client, settings):
    paid = paid_invoice_event()
    assert post(client, settings, paid).status_code == 500  # subscription not known yet
    assert StripeEvent.objects.get(pk=paid["id"]).status == "failed"

    out = io.StringIO()
    call_command("reprocess_stripe_events", "--dry-run", stdout=out, stderr=io.StringIO())
    assert f"would re-process {paid['id']}" in out.getvalue()
    assert StripeEvent.objects.get(pk=paid["id"]).status == "failed"

    with pytest.raises(CommandError, match="still failing"):
        call_command("reprocess_stripe_events", stdout=io.StringIO(), stderr=io.StringIO())
    assert StripeEvent.objects.get(pk=paid["id"]).attempts == 2

    assert post(client, settings, subscription_event()).status_code == 200
    out = io.StringIO()
    call_command("reprocess_stripe_events", stdout=out, stderr=io.StringIO())
    event = StripeEvent.objects.get(pk=paid["id"])
    assert (event.status, event.attempts) == ("processed", 3)
    assert "processed 1" in out.getvalue()
    # A processed event is never applied again, even when named explicitly.
    call_command("reprocess_stripe_events", "--id", paid["id"], stdout=io.StringIO(), stderr=io.StringIO())
    assert StripeEvent.objects.get(pk=paid["id"]).attempts == 3


@pytest.mark.django_db
def test_reprocess_rejects_unknown_ids():
    with pytest.raises(CommandError, match="unknown event id"):
        call_command("reprocess_stripe_events", "--id", "evt_nope", stdout=io.StringIO())


@pytest.mark.django_db
def test_reprocess_since_takes_a_date_or_datetime_and_rejects_garbage():
    out = io.StringIO()
    call_command("reprocess_stripe_events", "--since", "2020-01-01", "--dry-run", stdout=out)
    call_command("reprocess_stripe_events", "--since", "2020-01-01T10:00:00", "--dry-run", stdout=out)
    assert "0 event(s) would be re-processed" in out.getvalue()
    with pytest.raises(CommandError, match="is not a date"):
        call_command("reprocess_stripe_events", "--since", "yesterday-ish", stdout=io.StringIO())

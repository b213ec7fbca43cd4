"""The admin support staff use: find rows by Stripe id or e-mail, read them, never hand-edit them.

Rows are made with the factories (``billing.tests.factories``): these tests are about the admin,
not about webhooks.
"""

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import Invoice, OwedEmail, Payment, Refund, Renewal, StripeEvent, Subscription
from billing.money import format_amount
from billing.tests.factories import (
    InvoiceFactory,
    InvoiceLineItemFactory,
    OwedEmailFactory,
    PaymentFactory,
    RefundFactory,
    RenewalFactory,
    StripeEventFactory,
    SubscriptionFactory,
)
from provisioning.tests.factories import AccountFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(microsecond=0)


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(superuser=True))
    return client


def make_account(key, **fields):
    return AccountFactory(
        name=f"Account {key}", stripe_customer_id=f"cus_{key}", billing_email=f"billing-{key}@example.com", **fields
    )


def make_subscription(key, account=None, **fields):
    return SubscriptionFactory(stripe_id=f"sub_{key}", account=account or make_account(key), status="active", **fields)


def make_invoice(key, subscription=None, **fields):
    """An invoice of ``subscription`` (its account and ``stripe_subscription_id`` follow it)."""
    defaults = {
        "number": f"NUM-{key}",
        "status": "paid",
        "currency": "usd",
        "total": 1234,
        "customer_email": f"payer-{key}@example.com",
    }
    return InvoiceFactory(
        stripe_id=f"in_{key}", subscription=subscription or make_subscription(key), **{**defaults, **fields}
    )


def make_event(key, object_id="", livemode=False, type="invoice.paid", **fields):
    """An inbox row about ``object_id``; its payload (an event envelope) agrees with its columns."""
    return StripeEventFactory(id=f"evt_{key}", type=type, object_id=object_id, livemode=livemode, **fields)


def changelist(model):
    return reverse(f"admin:billing_{model._meta.model_name}_changelist")


def change_page(obj):
    return reverse(f"admin:billing_{obj._meta.model_name}_change", args=[obj.pk])


def listed(response):
    """The rows the changelist shows (its result list, not text that may echo the search)."""
    assert response.status_code == 200
    return set(response.context["cl"].result_list)


# --- Money --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount, currency, expected",
    [
        (1234, "usd", "12.34 USD"),
        (123456789, "eur", "1,234,567.89 EUR"),
        (5, "usd", "0.05 USD"),
        (1200, "jpy", "1,200 JPY"),
        (1200, "JPY", "1,200 JPY"),
        (50000, "krw", "50,000 KRW"),
        (1234, "kwd", "1.234 KWD"),
        (-1234, "usd", "-12.34 USD"),
        (-500, "jpy", "-500 JPY"),
        (100, "isk", "1.00 ISK"),  # whole krona, but two-decimal in Stripe's API
    ],
)
def test_format_amount(amount, currency, expected):
    assert format_amount(amount, currency) == expected


# --- Every model: list, search, change page -------------------------------------------------


def test_subscription_list_search_and_page(staff_client):
    wanted = make_subscription("wanted", cancel_at_period_end=True, livemode=True)
    other = make_subscription("other")

    assert listed(staff_client.get(changelist(Subscription))) == {wanted, other}
    for term in ("sub_wanted", "cus_wanted", "billing-wanted@example.com"):
        assert listed(staff_client.get(changelist(Subscription), {"q": term})) == {wanted}, term
    assert listed(staff_client.get(changelist(Subscription), {"cancel_at_period_end__exact": "1"})) == {wanted}

    page = staff_client.get(change_page(wanted))
    assert page.status_code == 200
    assert b"https://dashboard.stripe.com/subscriptions/sub_wanted" in page.content


def test_invoice_list_search_and_page_shows_money_and_lines(staff_client):
    wanted = make_invoice("wanted", total=120000, amount_due=120000, currency="jpy", livemode=True)
    other = make_invoice("other")
    InvoiceLineItemFactory(invoice=wanted, description="5 seats", currency="jpy", amount=120000)

    response = staff_client.get(changelist(Invoice))
    assert listed(response) == {wanted, other}
    assert b"120,000 JPY" in response.content and b"12.34 USD" in response.content
    for term in ("in_wanted", "NUM-wanted", "cus_wanted", "payer-wanted@example.com", "sub_wanted"):
        assert listed(staff_client.get(changelist(Invoice), {"q": term})) == {wanted}, term
    assert listed(staff_client.get(changelist(Invoice), {"currency": "jpy"})) == {wanted}

    page = staff_client.get(change_page(wanted))
    assert page.status_code == 200
    assert b"https://dashboard.stripe.com/invoices/in_wanted" in page.content
    assert b"5 seats" in page.content and b"120,000 JPY" in page.content


def test_renewal_list_filters_search_and_page(staff_client):
    processed = RenewalFactory(subscription=make_subscription("a"), stripe_invoice_id="in_a", processed_at=NOW)
    planned = RenewalFactory(subscription=make_subscription("b"), stripe_invoice_id=None, processed_at=None)
    make_invoice("a", subscription=processed.subscription)

    assert listed(staff_client.get(changelist(Renewal))) == {processed, planned}
    assert listed(staff_client.get(changelist(Renewal), {"processed": "yes"})) == {processed}
    assert listed(staff_client.get(changelist(Renewal), {"processed": "no"})) == {planned}
    assert listed(staff_client.get(changelist(Renewal), {"linked": "yes"})) == {processed}
    assert listed(staff_client.get(changelist(Renewal), {"linked": "no"})) == {planned}
    assert listed(staff_client.get(changelist(Renewal), {"q": "sub_b"})) == {planned}
    assert listed(staff_client.get(changelist(Renewal), {"q": "in_a"})) == {processed}

    page = staff_client.get(change_page(processed))
    assert page.status_code == 200
    assert change_page(Invoice.objects.get(stripe_id="in_a")).encode() in page.content


def test_payment_and_refund_lists_search_and_pages(staff_client):
    payment = PaymentFactory(payment_intent_id="pi_wanted", charge_id="ch_wanted")
    PaymentFactory()
    refund = RefundFactory(stripe_id="re_wanted", payment_intent_id="pi_wanted", amount=500, currency="usd")
    RefundFactory()

    assert listed(staff_client.get(changelist(Payment), {"q": "ch_wanted"})) == {payment}
    assert listed(staff_client.get(changelist(Refund), {"q": "re_wanted"})) == {refund}
    assert staff_client.get(change_page(payment)).status_code == 200
    page = staff_client.get(change_page(refund))
    assert page.status_code == 200 and b"5.00 USD" in page.content


def test_owed_email_list_filters_search_and_page(staff_client):
    invoice = make_invoice("wanted")
    receipt = OwedEmailFactory(kind="receipt", invoice=invoice)
    other = OwedEmailFactory(kind="trial_will_end", subscription=make_subscription("x"), status="sent")

    assert listed(staff_client.get(changelist(OwedEmail))) == {receipt, other}
    assert listed(staff_client.get(changelist(OwedEmail), {"kind__exact": "receipt"})) == {receipt}
    assert listed(staff_client.get(changelist(OwedEmail), {"status__exact": "sent"})) == {other}
    assert listed(staff_client.get(changelist(OwedEmail), {"q": "billing-wanted@example.com"})) == {receipt}
    assert staff_client.get(change_page(receipt)).status_code == 200


def test_history_page_answers(staff_client):
    subscription = make_subscription("h")
    url = reverse("admin:billing_subscription_history", args=[subscription.pk])
    assert staff_client.get(url).status_code == 200


# --- Mirrored rows are read-only --------------------------------------------------------------


def test_mirrored_rows_cannot_be_added_changed_or_deleted(staff_client):
    subscription = make_subscription("ro")
    page = staff_client.get(change_page(subscription))
    assert b'name="_save"' not in page.content

    post = staff_client.post(change_page(subscription), {"status": "canceled"})
    assert post.status_code == 403
    subscription.refresh_from_db()
    assert subscription.status == "active"
    assert staff_client.get(reverse("admin:billing_subscription_add")).status_code == 403
    assert staff_client.get(reverse("admin:billing_subscription_delete", args=[subscription.pk])).status_code == 403


def test_mirrored_row_links_to_its_events(staff_client):
    subscription = make_subscription("ev")
    event = make_event("about", object_id="sub_ev")
    make_event("unrelated", object_id="sub_other")

    page = staff_client.get(change_page(subscription))
    assert b"1 event in the inbox" in page.content
    assert listed(staff_client.get(changelist(StripeEvent), {"object_id": "sub_ev"})) == {event}


# --- The inbox --------------------------------------------------------------------------------


def test_inbox_list_filters_and_search(staff_client):
    failed = make_event("failed", object_id="in_1", status="failed", attempts=2, last_error="boom")
    live = make_event("live", object_id="sub_1", livemode=True, type="customer.subscription.updated")

    assert listed(staff_client.get(changelist(StripeEvent))) == {failed, live}
    assert listed(staff_client.get(changelist(StripeEvent), {"status__exact": "failed"})) == {failed}
    assert listed(staff_client.get(changelist(StripeEvent), {"livemode__exact": "1"})) == {live}
    assert listed(staff_client.get(changelist(StripeEvent), {"type": "customer.subscription.updated"})) == {live}
    assert listed(staff_client.get(changelist(StripeEvent), {"q": "evt_failed"})) == {failed}
    assert listed(staff_client.get(changelist(StripeEvent), {"q": "sub_1"})) == {live}


def test_inbox_page_shows_pretty_payload_error_and_related_rows_read_only(staff_client):
    invoice = make_invoice("rel")
    event = make_event("page", object_id="in_rel", status="failed", last_error="KeyError: 'lines'")

    page = staff_client.get(change_page(event))
    assert page.status_code == 200
    content = page.content.decode()
    stored = StripeEvent.objects.get(pk=event.pk).payload  # jsonb keeps its own key order
    pretty = json.dumps(stored, indent=2).replace('"', "&quot;")
    assert f"<pre>{pretty}</pre>" in content
    assert "KeyError: &#x27;lines&#x27;" in content
    assert change_page(invoice) in content  # the row this event is about
    assert "https://dashboard.stripe.com/test/events/evt_page" in content
    assert 'name="_save"' not in content and 'name="_continue"' not in content


def test_live_event_links_to_the_live_dashboard(staff_client):
    event = make_event("livemode", livemode=True)
    page = staff_client.get(change_page(event))
    assert b"https://dashboard.stripe.com/events/evt_livemode" in page.content


def test_inbox_forbids_add_change_and_delete(staff_client):
    event = make_event("locked")
    assert staff_client.get(reverse("admin:billing_stripeevent_delete", args=[event.pk])).status_code == 403
    delete = reverse("admin:billing_stripeevent_delete", args=[event.pk])
    assert staff_client.post(delete, {"post": "yes"}).status_code == 403
    assert staff_client.get(reverse("admin:billing_stripeevent_add")).status_code == 403
    assert staff_client.post(change_page(event), {"type": "forged"}).status_code == 403
    assert StripeEvent.objects.get(pk=event.pk).type == "invoice.paid"
    assert b'value="delete_selected"' not in staff_client.get(changelist(StripeEvent)).content


def test_reprocess_action_is_offered_only_to_staff_who_may_reprocess_events(staff_client, client):
    make_event("act")
    assert b'value="reprocess"' in staff_client.get(changelist(StripeEvent)).content

    viewer = UserFactory(staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_stripeevent"))
    client.force_login(viewer)
    response = client.get(changelist(StripeEvent))
    assert response.status_code == 200
    assert b'value="reprocess"' not in response.content


# --- No N+1 -------------------------------------------------------------------------------------


def add_subscriptions(start, stop):
    for i in range(start, stop):
        make_subscription(f"n{i}", current_period_end=NOW + timedelta(days=30))


def add_invoices(start, stop):
    for i in range(start, stop):
        make_invoice(f"n{i}")


def add_events(start, stop):
    for i in range(start, stop):
        make_event(f"n{i}", object_id=f"in_n{i}", type=f"type.{i % 5}")


@pytest.mark.parametrize(
    "model, add_rows", [(Subscription, add_subscriptions), (Invoice, add_invoices), (StripeEvent, add_events)]
)
def test_changelist_queries_do_not_grow_with_rows(staff_client, model, add_rows):
    add_rows(0, 3)
    staff_client.get(changelist(model))  # warm per-process caches (content types, session)
    with CaptureQueriesContext(connection) as few:
        assert len(listed(staff_client.get(changelist(model)))) == 3
    add_rows(3, 30)
    with CaptureQueriesContext(connection) as many:
        assert len(listed(staff_client.get(changelist(model)))) == 30
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]

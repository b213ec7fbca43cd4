"""Refunds find their invoice in the current API layout, in any order.

Since 2025-03-31.basil a charge names no invoice: ``invoice_payment.paid`` ties the invoice to
its PaymentIntent, and when that event is missing the InvoicePayments API is asked (here a
local server in Stripe's shape, called for real by stripe-python).
"""

import itertools

import pytest

from billing.models import Invoice, Payment, Refund
from billing.simulation.objects import (
    charge_object,
    event_object,
    invoice_line_object,
    invoice_object,
    invoice_payment_object,
    refund_object,
    setup_intent_object,
)
from billing.tests.conftest import T0
from billing.tests.factories import PaymentFactory, RefundFactory
from provisioning.models import Account

pytestmark = pytest.mark.django_db

CUS, INV, PI, CH = "cus_ref", "in_ref", "pi_ref", "ch_ref"


def paid_invoice():
    line = invoice_line_object(id="il_ref", invoice=INV, amount=9000, period_start=T0, period_end=T0)
    obj = invoice_object(
        id=INV,
        customer=CUS,
        status="paid",
        billing_reason="manual",
        lines=[line],
        number="R-1",
        created=T0,
        finalized_at=T0 + 1,
        paid_at=T0 + 2,
        customer_email="r@example.com",
    )
    return event_object(type="invoice.paid", obj=obj, created=T0 + 2)


def invoice_paid_by_intent():
    obj = invoice_payment_object(id="inpay_ref", invoice=INV, payment_intent=PI, amount_paid=9000, created=T0 + 2)
    return event_object(type="invoice_payment.paid", obj=obj, created=T0 + 2)


def charge_refunded(amount_refunded, created):
    obj = charge_object(
        id=CH, customer=CUS, payment_intent=PI, amount=9000, amount_refunded=amount_refunded, created=T0
    )
    return event_object(type="charge.refunded", obj=obj, created=created)


def refund_created(refund_id, amount, created, status="succeeded"):
    obj = refund_object(id=refund_id, charge=CH, payment_intent=PI, amount=amount, created=created, status=status)
    return event_object(type="refund.created", obj=obj, created=created)


STORY = [
    paid_invoice(),
    invoice_paid_by_intent(),
    charge_refunded(2500, T0 + 100),
    refund_created("re_1", 2500, T0 + 100),
    charge_refunded(4000, T0 + 200),
    refund_created("re_2", 1500, T0 + 200),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(STORY))))[::37])
def test_refunded_amount_reaches_the_invoice_in_any_order(post_event, order):
    for index in order:
        assert post_event(STORY[index]).status_code == 200
    assert Invoice.objects.get(stripe_id=INV).amount_refunded == 4000
    assert Payment.objects.get(payment_intent_id=PI).invoice.stripe_id == INV
    assert sorted(Refund.objects.values_list("stripe_id", "amount")) == [("re_1", 2500), ("re_2", 1500)]


def test_a_failed_refund_is_not_counted(post_event):
    post_event(paid_invoice())
    post_event(invoice_paid_by_intent())
    post_event(refund_created("re_f", 3000, T0 + 100))
    post_event(
        event_object(
            type="refund.failed",
            obj=refund_object(id="re_f", charge=CH, payment_intent=PI, amount=3000, created=T0 + 100, status="failed"),
            created=T0 + 300,
        )
    )
    assert Invoice.objects.get(stripe_id=INV).amount_refunded == 0


def test_without_invoice_payment_event_the_invoice_payments_api_resolves_it(
    post_event, fake_stripe, django_capture_on_commit_callbacks
):
    fake_stripe.invoice_payments = [
        {
            "id": "inpay_ref",
            "object": "invoice_payment",
            "invoice": INV,
            "payment": {"type": "payment_intent", "payment_intent": PI},
            "status": "paid",
        }
    ]
    assert post_event(paid_invoice()).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):  # the task runs after the commit
        assert post_event(charge_refunded(2500, T0 + 100)).status_code == 200
    assert Invoice.objects.get(stripe_id=INV).amount_refunded == 2500
    assert any(path == "/v1/invoice_payments" for path, _ in fake_stripe.requests)


def test_setup_intent_succeeded_puts_a_payment_method_on_file(post_event):
    obj = setup_intent_object(id="seti_1", customer=CUS, payment_method="pm_card", created=T0)
    assert post_event(event_object(type="setup_intent.succeeded", obj=obj, created=T0)).status_code == 200
    account = Account.objects.get(stripe_customer_id=CUS)
    assert account.has_payment_method and account.default_payment_method_id == "pm_card"
    older = setup_intent_object(id="seti_0", customer=CUS, payment_method="pm_old", created=T0 - 50)
    assert post_event(event_object(type="setup_intent.succeeded", obj=older, created=T0 - 50)).status_code == 200
    account.refresh_from_db()
    assert account.default_payment_method_id == "pm_card"


def test_a_payment_of_a_mirrored_invoice_is_created_attached_to_it(post_event):
    assert post_event(paid_invoice()).status_code == 200

    assert post_event(invoice_paid_by_intent()).status_code == 200

    payment = Payment.objects.get(payment_intent_id=PI)
    assert payment.invoice.stripe_id == INV
    assert [(h.history_type, h.invoice_id) for h in payment.history.all()] == [("+", payment.invoice_id)]


def test_a_payment_before_its_invoice_is_attached_when_the_invoice_arrives(post_event):
    assert post_event(invoice_paid_by_intent()).status_code == 200
    assert Payment.objects.get(payment_intent_id=PI).invoice is None  # the subquery found nothing

    assert post_event(paid_invoice()).status_code == 200
    assert Payment.objects.get(payment_intent_id=PI).invoice.stripe_id == INV


def test_a_new_payment_with_no_known_refund_writes_nothing_to_its_invoice(post_event):
    assert post_event(paid_invoice()).status_code == 200
    invoice = Invoice.objects.get(stripe_id=INV)
    history_before = invoice.history.count()

    assert post_event(invoice_paid_by_intent()).status_code == 200

    assert invoice.history.count() == history_before
    assert Invoice.objects.get(stripe_id=INV).amount_refunded == 0
    assert Payment.objects.get(payment_intent_id=PI).invoice == invoice


def test_a_new_payment_whose_refund_is_already_known_counts_it(post_event):
    """A refund row of the PaymentIntent that exists before its payment (written by an older
    version, or by hand) is counted when the payment arrives."""
    assert post_event(paid_invoice()).status_code == 200
    RefundFactory(payment_intent_id=PI, amount=700, currency="usd", status="succeeded")

    assert post_event(invoice_paid_by_intent()).status_code == 200
    assert Invoice.objects.get(stripe_id=INV).amount_refunded == 700


def test_any_later_event_of_the_invoice_attaches_a_payment_left_waiting(post_event):
    """A payment committed at the same instant as the invoice's creation can miss it, and be
    missed by it (payment writers take no account lock). Any later event of the invoice, even an
    older snapshot that changes nothing else, attaches it and counts its refund."""
    assert post_event(paid_invoice()).status_code == 200
    invoice = Invoice.objects.get(stripe_id=INV)
    # What such a race leaves: the payment names the invoice but is not attached to it.
    PaymentFactory(payment_intent_id=PI, invoice=None, stripe_invoice_id=INV, charge_id=CH, currency="usd")
    RefundFactory(payment_intent_id=PI, amount=900, currency="usd", status="succeeded")

    line = invoice_line_object(id="il_ref", invoice=INV, amount=9000, period_start=T0, period_end=T0)
    stale = invoice_object(id=INV, customer=CUS, status="draft", billing_reason="manual", lines=[line], created=T0)
    assert post_event(event_object(type="invoice.created", obj=stale, created=T0)).status_code == 200

    invoice.refresh_from_db()
    assert invoice.status == "paid"  # the stale snapshot changed nothing of the invoice itself
    assert Payment.objects.get(payment_intent_id=PI).invoice == invoice
    assert invoice.amount_refunded == 900


def test_a_charge_that_names_its_invoice_takes_the_invoices_lock_before_the_payments_row(post_event):
    """Pre-basil charges still name their invoice. Such a refund writes the payment's invoice,
    so it takes the invoice's advisory lock first, as every payment writer does (the invoice
    handlers take it before the account's; taken after a row lock it could deadlock)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    assert post_event(paid_invoice()).status_code == 200
    charge = charge_refunded(2500, T0 + 100)
    charge["data"]["object"]["invoice"] = INV
    with CaptureQueriesContext(connection) as captured:
        assert post_event(charge).status_code == 200
    statements = [q["sql"] for q in captured.captured_queries]

    lock = next(i for i, s in enumerate(statements) if f"hashtextextended('billing.invoice:{INV}', 0)" in s)
    payment_row = next(i for i, s in enumerate(statements) if '"billing_payment"' in s)
    assert lock < payment_row
    assert Invoice.objects.get(stripe_id=INV).amount_refunded == 2500

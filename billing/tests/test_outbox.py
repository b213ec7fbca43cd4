"""What a commit owes besides e-mails: the invoice look-up of a refund, published like the e-mails.

A refund whose invoice no event has named asks Stripe's InvoicePayments API (a local server in
Stripe's shape, ``stripe_server.FakeStripe``, called for real by stripe-python) once the
webhook's transaction commits. With a broker, that look-up is published by ``billing.outbox``'s
publisher thread, never by the request; one whose message was lost is asked again by
``billing.tasks.sweep_unresolved_payments``. (With the broker down, see ``test_broker_down``.)
"""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import Invoice, Payment
from billing.simulation.objects import event_object, invoice_payment_object, refund_object
from billing.tasks import (
    PAYMENT_LOOKUP_WINDOW,
    resolve_payment_invoice,
    resolve_payment_invoices,
    sweep_unresolved_payments,
    unresolved_payments,
)
from billing.tests.conftest import T0, runs_of
from billing.tests.factories import InvoiceFactory, PaymentFactory, RefundFactory
from billing.tests.processes import wait_until

pytestmark = pytest.mark.django_db


def stripe_knows(fake_stripe, invoice: Invoice, payment_intent_id: str) -> None:
    fake_stripe.invoice_payments.append(
        invoice_payment_object(
            id=f"inpay_{payment_intent_id}",
            invoice=invoice.stripe_id,
            payment_intent=payment_intent_id,
            amount_paid=invoice.total,
            created=T0,
        )
    )


def look_ups(fake_stripe) -> list[str]:
    """The PaymentIntents Stripe was asked about, in order."""
    return [
        query["payment[payment_intent]"][0] for path, query in fake_stripe.requests if path == "/v1/invoice_payments"
    ]


def waiting_payment(age: timedelta, **fields) -> Payment:
    """A payment refunded before anything named its invoice, first seen ``age`` ago."""
    payment = PaymentFactory(**fields)
    RefundFactory(payment_intent_id=payment.payment_intent_id, charge_id=payment.charge_id, amount=700)
    Payment.objects.filter(pk=payment.pk).update(created_at=timezone.now() - age)
    return payment


def test_the_sweep_asks_stripe_again_for_payments_whose_look_up_was_lost(fake_stripe):
    invoice = InvoiceFactory(total=5000)
    lost = waiting_payment(timedelta(hours=1))
    stripe_knows(fake_stripe, invoice, lost.payment_intent_id)
    waiting_payment(timedelta(seconds=1))  # too fresh: its own look-up, after commit, normally wins
    waiting_payment(PAYMENT_LOOKUP_WINDOW + timedelta(minutes=1))  # asked about for long enough
    waiting_payment(timedelta(hours=1), payment_intent_id="charge:ch_no_intent")  # no PaymentIntent to ask about
    waiting_payment(timedelta(hours=1), stripe_invoice_id="in_known_not_mirrored")  # its invoice is named already

    assert list(unresolved_payments()) == [lost]
    assert sweep_unresolved_payments() == 1  # no broker: the look-up runs here

    assert look_ups(fake_stripe) == [lost.payment_intent_id]
    lost.refresh_from_db()
    assert (lost.invoice, lost.stripe_invoice_id) == (invoice, invoice.stripe_id)
    invoice.refresh_from_db()
    assert invoice.amount_refunded == 700
    assert sweep_unresolved_payments() == 0


def test_without_an_api_key_the_sweep_asks_nothing(settings):
    settings.STRIPE_API_KEY = ""
    waiting_payment(timedelta(hours=1))

    assert sweep_unresolved_payments() == 0


def test_a_payment_stripe_knows_no_invoice_of_stays_unresolved_until_the_window_ends(fake_stripe):
    payment = waiting_payment(timedelta(hours=1))

    assert sweep_unresolved_payments() == 1
    assert look_ups(fake_stripe) == [payment.payment_intent_id]
    assert list(unresolved_payments()) == [payment]
    assert list(unresolved_payments(now=payment.created_at + PAYMENT_LOOKUP_WINDOW)) == []


@pytest.mark.django_db(transaction=True)
def test_with_a_broker_a_refunds_look_up_is_published_after_commit_by_the_publisher(
    redis_worker,
    fake_stripe,
    post_event,
):
    invoice = InvoiceFactory(total=5000)
    stripe_knows(fake_stripe, invoice, "pi_published")
    refund = refund_object(
        id="re_published", charge="ch_published", payment_intent="pi_published", amount=1200, created=T0
    )
    batches, single = runs_of(resolve_payment_invoices), runs_of(resolve_payment_invoice)

    assert post_event(event_object(type="refund.created", obj=refund, created=T0)).status_code == 200

    assert wait_until(lambda: Invoice.objects.filter(pk=invoice.pk, amount_refunded=1200).exists())
    assert Payment.objects.get(payment_intent_id="pi_published").invoice == invoice
    assert look_ups(fake_stripe) == ["pi_published"]
    # One batch from the web process's publisher; the worker split it into one look-up each.
    assert (runs_of(resolve_payment_invoices), runs_of(resolve_payment_invoice)) == (batches + 1, single + 1)

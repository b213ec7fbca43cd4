"""The paid lifecycle is right in any delivery order (issue: invoices, renewals, entitlements).

Lifecycles come from the simulator's generator (trial to paid to renewals to cancellation, a
failed payment then recovered, a seat change, a one-off invoice refunded). Delivered in order
they must imply their facts; delivered shuffled, with duplicates, every non-2xx re-delivered
later as Stripe does, they must leave exactly the rows in-order delivery leaves.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from billing.models import Invoice, OwedEmail, Renewal, StripeEvent, Subscription
from billing.simulation.delivery import arrange
from billing.simulation.lifecycles import SCENARIOS, generate_lifecycles
from billing.tests.lifecycle_state import clear_rows, deliver_until_accepted, snapshot
from provisioning.models import Entitlement

pytestmark = pytest.mark.django_db


def utc(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


def in_order(lifecycles):
    return sorted((e for lc in lifecycles for e in lc.events), key=lambda e: e["created"])


@pytest.fixture
def webhook(settings):
    from billing.tests.conftest import SECRET

    settings.STRIPE_WEBHOOK_SECRETS = [SECRET]


def assert_facts(lifecycles):
    """What each lifecycle implies, checked against the rows."""
    for lc in lifecycles:
        exp = lc.expected
        if exp.subscription_id:
            sub = Subscription.objects.get(stripe_id=exp.subscription_id)
            assert sub.account.stripe_customer_id == lc.customer_id
            assert (sub.status, sub.quantity) == (exp.final_status, exp.final_quantity)
            paid = Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id, kind="paid").order_by("starts_at")
            # One paid entitlement per paid period, for exactly that period, with its seats.
            assert [(e.starts_at, e.expires_at, e.seats, e.stripe_invoice_id) for e in paid] == [
                (utc(p.start), min(utc(p.end), sub.ended_at or utc(p.end)), p.quantity, p.invoice_id)
                for p in exp.paid_periods
            ]
            for period in exp.paid_periods:
                invoice = Invoice.objects.get(stripe_id=period.invoice_id)
                assert invoice.status == "paid"
                if invoice.billing_reason != "subscription_create":
                    # Each paid renewal invoice is linked to the renewal effective at its period start.
                    renewal = Renewal.objects.get(stripe_invoice_id=period.invoice_id)
                    assert renewal.effective_date == utc(period.start) and renewal.processed_at is not None
            trial = Entitlement.objects.filter(stripe_subscription_id=sub.stripe_id, kind="trial")
            if exp.trial:
                assert [(e.starts_at, e.expires_at) for e in trial] == [(utc(exp.trial[0]), utc(exp.trial[1]))]
            else:
                assert not trial.exists()
            # No renewal is processed twice or left planned after the subscription ended.
            if sub.ended_at:
                assert not Renewal.objects.filter(
                    subscription=sub,
                    effective_date__gte=sub.ended_at,
                    processed_at__isnull=True,
                    stripe_invoice_id__isnull=True,
                ).exists()
        receipts = set(
            OwedEmail.objects.filter(kind="receipt", account__stripe_customer_id=lc.customer_id).values_list(
                "invoice__stripe_id", flat=True
            )
        )
        assert receipts == exp.receipt_invoice_ids
        for invoice_id, amount in exp.refunded.items():
            assert Invoice.objects.get(stripe_id=invoice_id).amount_refunded == amount
    assert not StripeEvent.objects.filter(status="failed").exists()


def test_generated_lifecycles_in_order_imply_their_facts(client, webhook):
    lifecycles = generate_lifecycles(customers=10, seed=7)
    assert {lc.scenario for lc in lifecycles} == set(SCENARIOS)
    deliver_until_accepted(client, in_order(lifecycles))
    assert_facts(lifecycles)


@pytest.mark.slow
@hsettings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(seed=st.integers(0, 10_000), order_seed=st.integers(0, 2**32 - 1), duplicates=st.sampled_from([0.0, 0.3]))
def test_any_delivery_order_with_duplicates_ends_as_in_order(client, webhook, seed, order_seed, duplicates):
    lifecycles = generate_lifecycles(customers=5, seed=seed)
    clear_rows()
    deliver_until_accepted(client, in_order(lifecycles))
    expected = snapshot()

    clear_rows()
    shuffled = arrange(
        [lc.events for lc in lifecycles], rng=random.Random(order_seed), shuffle=True, duplicates=duplicates
    )
    deliver_until_accepted(client, shuffled)
    assert snapshot() == expected
    assert_facts(lifecycles)

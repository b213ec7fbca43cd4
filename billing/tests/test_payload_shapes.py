"""Simulated payloads carry only keys (and JSON types) that Stripe's own example objects have.

The reference is Stripe's fixtures3.json (see data/README.md): if the simulator invented a
key, the app could come to rely on a field Stripe never sends, and every test built on the
simulator would prove it works against a Stripe that does not exist.
"""

import copy
import importlib

import pytest

from billing.simulation import objects as o
from billing.simulation.lifecycles import generate_lifecycles
from billing.tests.stripe_shapes import OPTIONAL_KEYS, assert_keys_exist, key_problems

T = 1767225600  # 2026-01-01T00:00:00Z


def _sub(**overrides):
    args = dict(
        id="sub_1",
        customer="cus_1",
        status="active",
        quantity=3,
        current_period_start=T,
        current_period_end=T + 31 * 86400,
        created=T,
    )
    return o.subscription_object(**{**args, **overrides})


def _line(**overrides):
    args = dict(
        id="il_1",
        invoice="in_1",
        amount=6000,
        quantity=3,
        period_start=T,
        period_end=T + 31 * 86400,
        subscription="sub_1",
    )
    return o.invoice_line_object(**{**args, **overrides})


def _invoice(**overrides):
    args = dict(
        id="in_1",
        customer="cus_1",
        status="paid",
        billing_reason="subscription_cycle",
        lines=[_line()],
        subscription="sub_1",
        number="ABC-0001",
        created=T,
        finalized_at=T + 3600,
        paid_at=T + 3700,
        customer_email="ada@example.com",
        customer_name="Ada",
        attempt_count=1,
    )
    return o.invoice_object(**{**args, **overrides})


BUILT = {
    "subscription active": (_sub(), "subscription"),
    "subscription trialing": (_sub(status="trialing", trial_start=T, trial_end=T + 14 * 86400), "subscription"),
    "subscription canceled": (
        _sub(status="canceled", cancel_at_period_end=True, cancel_at=T + 99, canceled_at=T + 9, ended_at=T + 99),
        "subscription",
    ),
    "line of a subscription item": (_line(), "line_item"),
    "proration line from an invoice item": (_line(proration=True, invoice_item="ii_1", amount=-500), "line_item"),
    "line of a one-off invoice item": (_line(subscription=None), "line_item"),
    "invoice paid": (_invoice(), "invoice"),
    "invoice draft": (_invoice(status="draft", number=None, finalized_at=None, paid_at=None), "invoice"),
    "one-off invoice": (
        _invoice(subscription=None, billing_reason="manual", lines=[_line(subscription=None)]),
        "invoice",
    ),
    "price": (o.price_object(id="price_standard", unit_amount=2000), "price"),
    "checkout session": (
        o.checkout_session_object(
            id="cs_test_1",
            customer="cus_1",
            subscription="sub_1",
            client_reference_id="42",
            created=T,
            customer_email="ada@example.com",
            customer_name="Ada",
            amount_total=2000,
        ),
        "checkout.session",
    ),
    "charge": (
        o.charge_object(
            id="ch_1", customer="cus_1", payment_intent="pi_1", amount=5000, amount_refunded=100, created=T
        ),
        "charge",
    ),
    "refund": (o.refund_object(id="re_1", charge="ch_1", payment_intent="pi_1", amount=100, created=T), "refund"),
    "setup intent": (
        o.setup_intent_object(id="seti_1", customer="cus_1", payment_method="pm_1", created=T),
        "setup_intent",
    ),
    "invoice payment": (
        o.invoice_payment_object(id="inpay_1", invoice="in_1", payment_intent="pi_1", amount_paid=5000, created=T),
        "invoice_payment",
    ),
    "customer": (o.customer_object(id="cus_1", created=T, email="ada@example.com", name="Ada"), "customer"),
    "event with previous attributes": (
        o.event_object(
            type="customer.subscription.updated",
            obj=_sub(quantity=4),
            created=T,
            previous_attributes={"items": _sub()["items"]},
            request_id="req_1",
            idempotency_key="k",
        ),
        "event",
    ),
}


@pytest.mark.parametrize("name", BUILT)
def test_every_builder_emits_only_keys_of_its_stripe_resource(name):
    obj, resource = BUILT[name]
    assert_keys_exist(obj, resource)


@pytest.mark.parametrize("seed", [1, 20260101])
def test_every_simulated_event_and_its_object_match_stripe_fixtures(seed):
    lifecycles = generate_lifecycles(customers=12, seed=seed, client_reference_ids=["7"] * 12)
    events = [event for lifecycle in lifecycles for event in lifecycle.events]
    problems = []
    for event in events:
        problems += key_problems(event, "event")
        problems += key_problems(event["data"]["object"], event["data"]["object"]["object"])
    assert not problems, "\n".join(sorted(set(problems)))
    # The check ran over every kind of object the simulator sends, not over a lucky few.
    kinds = {event["data"]["object"]["object"] for event in events}
    assert kinds >= {
        "subscription",
        "invoice",
        "invoice_payment",
        "charge",
        "refund",
        "setup_intent",
        "checkout.session",
        "customer",
    }


def test_checker_rejects_an_invented_top_level_key():
    sub = _sub()
    sub["quantity_legacy"] = 3
    with pytest.raises(AssertionError, match="quantity_legacy"):
        assert_keys_exist(sub, "subscription")


def test_checker_rejects_an_invented_key_nested_in_a_list_of_objects():
    invoice = _invoice()
    invoice["lines"]["data"][0]["parent"]["subscription_item_details"]["renewal_id"] = "x"
    with pytest.raises(AssertionError, match="renewal_id"):
        assert_keys_exist(invoice, "invoice")


def test_checker_rejects_pricing_price_details_while_fixtures3_lacks_it():
    line = _line()
    line["pricing"]["price_details"] = {"price": "price_standard", "product": "prod_standard"}
    assert any("price_details" in problem for problem in key_problems(line, "line_item"))


def test_checker_rejects_an_invented_key_inside_an_events_data_object_and_previous_attributes():
    event = copy.deepcopy(BUILT["event with previous attributes"][0])
    event["data"]["object"]["invented"] = True
    event["data"]["previous_attributes"]["also_invented"] = 1
    problems = key_problems(event, "event")
    assert any("invented" in problem and "also" not in problem for problem in problems)
    assert any("also_invented" in problem for problem in problems)


def test_checker_rejects_a_value_of_another_json_type():
    sub = _sub()
    sub["cancel_at_period_end"] = "no"
    with pytest.raises(AssertionError, match="cancel_at_period_end"):
        assert_keys_exist(sub, "subscription")


@pytest.mark.parametrize("resource,path", sorted(OPTIONAL_KEYS))
def test_keys_allowed_beyond_fixtures3_are_declared_by_stripe_python(resource, path):
    module_name, _, class_path = OPTIONAL_KEYS[(resource, path)].partition(".")
    cls = importlib.import_module(module_name)
    for part in class_path.split("."):
        cls = getattr(cls, part)
    assert path.rsplit(".", 1)[-1] in cls.__annotations__

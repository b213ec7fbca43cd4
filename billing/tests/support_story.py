"""One customer's billing story, delivered as Stripe would deliver it, for the support admin's tests.

Every event is built in Stripe's shape (``billing.simulation``), signed with stripe-python's
helper and posted to the webhook, so the rows support looks at, and the inbox behind them, are
the ones the app really writes. ``cus_story`` has a subscription, a paid first invoice (with its
receipt sent), an invoice payment, a refund, a dispute, a saved payment method and a checkout
session; ``sub_late``'s invoice came before the subscription, so its ``invoice.paid`` failed and
waits for a re-process. ``cus_other`` is another customer, whose rows must never be found for
``cus_story``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

from django.apps import apps
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Group
from django.db import connection
from django.urls import reverse

from billing.models import Invoice, OwedEmail, StripeEvent
from billing.simulation.objects import event_object, invoice_payment_object
from billing.simulation.payment_objects import (
    charge_object,
    checkout_session_object,
    dispute_object,
    refund_object,
    setup_intent_object,
)
from billing.tasks import deliver as send_owed
from billing.tests.conftest import DAY, active_subscription, deliver, first_invoice_paid_event, subscription_event
from provisioning.tests.factories import UserFactory

SUPPORT_GROUP = "Billing support"
NOW = int(time.time())
START = NOW - 5 * DAY  # the story began five days ago: its entitlement is current


@dataclass
class Story:
    events: dict  # name -> event id, for every event delivered
    failed_event: str  # the invoice.paid of sub_late, failed until re-processed

    def event(self, name: str) -> StripeEvent:
        return StripeEvent.objects.get(pk=self.events[name])


def support_group() -> Group:
    """The group migration 0008 creates (made again the same way if a test flushed the database)."""
    group = Group.objects.filter(name=SUPPORT_GROUP).first()
    if group is None:
        migration = importlib.import_module("billing.migrations.0008_billing_support_group")
        migration.create_support_group(apps, connection.schema_editor())
        group = Group.objects.get(name=SUPPORT_GROUP)
    return group


def support_user(**fields):
    """A plain staff user (not a superuser) in the "Billing support" group."""
    user = UserFactory(staff=True, **fields)
    user.groups.add(support_group())
    return user


def changelist(model) -> str:
    """The admin list of ``model``."""
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def change_page(obj) -> str:
    """The admin page of ``obj`` (its primary key quoted as the admin quotes it: Stripe ids may hold ``_``)."""
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[quote(obj.pk)])


def deliver_story(client) -> Story:
    """Post the story's events (signed) to the webhook; every one but ``failed_event`` is processed."""
    events: dict[str, str] = {}

    def post(name, payload, expect=200):
        response = deliver(client, payload)
        assert response.status_code == expect, (name, response.content)
        events[name] = payload["id"]

    end = START + 30 * DAY
    post(
        "sub_created",
        subscription_event(
            "customer.subscription.created",
            active_subscription("sub_story", "cus_story", start=START, quantity=2),
            created=START,
        ),
    )
    paid = first_invoice_paid_event(
        "in_story1", sub_id="sub_story", customer="cus_story", start=START, end=end, created=START + 60, quantity=2
    )
    paid["data"]["object"]["number"] = "STORY-0001"
    post("invoice_paid", paid)
    post(
        "invoice_payment",
        event_object(
            type="invoice_payment.paid",
            obj=invoice_payment_object(
                id="inpay_story1", invoice="in_story1", payment_intent="pi_story1", amount_paid=4000, created=START + 61
            ),
            created=START + 61,
        ),
    )
    charge = charge_object(
        id="ch_story1",
        customer="cus_story",
        payment_intent="pi_story1",
        amount=4000,
        amount_refunded=500,
        created=START + 50,
    )
    post("charge_refunded", event_object(type="charge.refunded", obj=charge, created=START + DAY))
    post(
        "refund",
        event_object(
            type="refund.created",
            obj=refund_object(
                id="re_story1", charge="ch_story1", payment_intent="pi_story1", amount=500, created=START + DAY
            ),
            created=START + DAY,
        ),
    )
    dispute = dispute_object(
        id="dp_story1",
        charge="ch_story1",
        payment_intent="pi_story1",
        amount=3500,
        created=START + 2 * DAY,
        evidence_due_by=START + 9 * DAY,
    )
    post("dispute", event_object(type="charge.dispute.created", obj=dispute, created=START + 2 * DAY))
    post(
        "setup_intent",
        event_object(
            type="setup_intent.succeeded",
            obj=setup_intent_object(
                id="seti_story", customer="cus_story", payment_method="pm_story", created=START + 3 * DAY
            ),
            created=START + 3 * DAY,
        ),
    )
    post(
        "checkout",
        event_object(
            type="checkout.session.completed",
            obj=checkout_session_object(
                id="cs_test_story", customer="cus_story", subscription="sub_story", created=START - 60
            ),
            created=START - 60,
        ),
    )

    # sub_late's first invoice arrives before the subscription: its invoice.paid fails (500) ...
    late_paid = first_invoice_paid_event(
        "in_late1",
        sub_id="sub_late",
        customer="cus_story",
        start=START + 3 * DAY,
        end=START + 33 * DAY,
        created=START + 3 * DAY + 60,
    )
    post("late_paid", late_paid, expect=500)
    # ... and the subscription comes after: support re-processes the failed event.
    post(
        "late_sub",
        subscription_event(
            "customer.subscription.created",
            active_subscription("sub_late", "cus_story", start=START + 3 * DAY),
            created=START + 3 * DAY,
        ),
    )

    other_end = START + 30 * DAY
    post(
        "other_sub",
        subscription_event(
            "customer.subscription.created", active_subscription("sub_other", "cus_other", start=START), created=START
        ),
    )
    post(
        "other_paid",
        first_invoice_paid_event(
            "in_other1", sub_id="sub_other", customer="cus_other", start=START, end=other_end, created=START + 60
        ),
    )

    # The first receipt goes out, through the mail backend, as the task after commit would send it.
    receipt = OwedEmail.objects.get(key="receipt:in_story1")
    send_owed(receipt.pk)
    assert Invoice.objects.get(stripe_id="in_story1").receipt_sent_at is not None
    return Story(events=events, failed_event=late_paid["id"])

"""Disputes: mirrored from every ``charge.dispute.*`` event, in any order, shown to support.

Every event goes through the real webhook, signed by stripe-python (``post_event``); payloads
are built by ``billing.simulation.objects.dispute_object`` in the shape of Stripe's own example
dispute. A dispute is found on its invoice and account through its payment, whichever of the
three arrives first (docs/decisions/0006-disputes.rst).
"""

from __future__ import annotations

import ast
import io
import random
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from billing.models import Dispute, Invoice, StripeEvent
from billing.simulation.delivery import arrange
from billing.simulation.objects import (
    charge_object,
    checkout_session_object,
    dispute_object,
    event_object,
    invoice_line_object,
    invoice_object,
    invoice_payment_object,
)
from billing.stripe_payloads import read_dispute
from billing.tests.conftest import DAY, T0, WEBHOOK_URL, as_datetime, post_all_at_once
from billing.tests.lifecycle_state import clear_rows, deliver_until_accepted, snapshot
from billing.tests.stripe_shapes import FIXTURES, assert_keys_exist
from billing.tests.support_story import change_page, changelist
from billing.webhook import registry
from provisioning.models import Account, Entitlement
from provisioning.tests.factories import AccountFactory, UserFactory

pytestmark = pytest.mark.django_db

CUS, INV, PI, CH, DP = "cus_dp", "in_dp", "pi_dp", "ch_dp", "dp_1QdispUTEd00000000000001"
OPENED = T0 + DAY  # when the cardholder's bank opened the dispute
AMOUNT = 4500


# --- Stripe-shaped events ---------------------------------------------------------------------


def dispute_event(type: str, created: int, *, dispute_id: str = DP, charge: str = CH, payment_intent=PI, **fields):
    obj = dispute_object(
        id=dispute_id, charge=charge, payment_intent=payment_intent, amount=AMOUNT, created=OPENED, **fields
    )
    return event_object(type=type, obj=obj, created=created)


def stranger_event(type: str, created: int, **fields):
    """An event of a dispute of a charge this app never saw paid: shown on no invoice."""
    return dispute_event(
        type, created, dispute_id="dp_stranger", charge="ch_stranger", payment_intent="pi_stranger", **fields
    )


def paid_invoice(invoice_id: str = INV, customer: str = CUS, number: str = "DP-0001"):
    line = invoice_line_object(id=f"il_{invoice_id}", invoice=invoice_id, amount=9000, period_start=T0, period_end=T0)
    obj = invoice_object(
        id=invoice_id,
        customer=customer,
        status="paid",
        billing_reason="manual",
        lines=[line],
        number=number,
        created=T0,
        finalized_at=T0 + 1,
        paid_at=T0 + 2,
        customer_email="payer@example.com",
    )
    return event_object(type="invoice.paid", obj=obj, created=T0 + 2)


def invoice_paid_by_intent():
    obj = invoice_payment_object(id="inpay_dp", invoice=INV, payment_intent=PI, amount_paid=9000, created=T0 + 2)
    return event_object(type="invoice_payment.paid", obj=obj, created=T0 + 2)


# A dispute's life (https://docs.stripe.com/disputes/how-disputes-work): opened and the money
# withdrawn, evidence submitted, won, the money given back. Each event carries the whole dispute.
STORY = {
    "charge.dispute.created": dispute_event(
        "charge.dispute.created", OPENED, status="needs_response", is_charge_refundable=True
    ),
    "charge.dispute.funds_withdrawn": dispute_event(
        "charge.dispute.funds_withdrawn", OPENED + 1, status="needs_response", funds_withdrawn=True
    ),
    "charge.dispute.updated": dispute_event(
        "charge.dispute.updated",
        OPENED + 3600,
        status="under_review",
        funds_withdrawn=True,
        has_evidence=True,
        submission_count=1,
    ),
    "charge.dispute.closed": dispute_event(
        "charge.dispute.closed",
        OPENED + 20 * DAY,
        status="won",
        funds_withdrawn=True,
        has_evidence=True,
        submission_count=1,
    ),
    "charge.dispute.funds_reinstated": dispute_event(
        "charge.dispute.funds_reinstated",
        OPENED + 20 * DAY + 1,
        status="won",
        funds_withdrawn=True,
        funds_reinstated=True,
        has_evidence=True,
        submission_count=1,
    ),
}


def mirrored(dispute: Dispute) -> tuple:
    return (
        dispute.status,
        dispute.amount,
        dispute.currency,
        dispute.reason,
        dispute.evidence_due_by,
        dispute.is_charge_refundable,
        dispute.charge_id,
        dispute.payment_intent_id,
        dispute.stripe_created,
    )


def as_snapshot(event: dict) -> tuple:
    obj = event["data"]["object"]
    return (
        obj["status"],
        obj["amount"],
        obj["currency"],
        obj["reason"],
        as_datetime(obj["evidence_details"]["due_by"]),
        obj["is_charge_refundable"],
        obj["charge"],
        obj["payment_intent"] or "",
        as_datetime(obj["created"]),
    )


# --- Reading the payload ----------------------------------------------------------------------


def test_built_disputes_have_only_keys_of_stripes_example_dispute():
    for event in STORY.values():
        assert_keys_exist(event["data"]["object"], "dispute")
        assert_keys_exist(event, "event")


def test_read_dispute_reads_stripes_own_example():
    snap = read_dispute(FIXTURES["dispute"])

    assert (snap.stripe_id, snap.charge_id, snap.payment_intent_id) == (
        "dp_1Pgc71B7WZ01zgkWMevJiAUx",
        "ch_1PgafuB7WZ01zgkWXYmPNZs8",
        "",
    )
    assert (snap.amount, snap.currency, snap.reason, snap.status) == (1000, "usd", "general", "warning_needs_response")
    assert snap.evidence_due_by == as_datetime(1723679999) and snap.evidence_due_by.utcoffset().total_seconds() == 0
    assert snap.is_charge_refundable is True


def test_a_due_by_of_zero_means_no_response_is_allowed():
    obj = dispute_object(id=DP, charge=CH, payment_intent=PI, amount=1, created=OPENED, evidence_due_by=0)
    assert read_dispute(obj).evidence_due_by is None


# --- Each event through the webhook -----------------------------------------------------------


@pytest.mark.parametrize("event_type", list(STORY))
def test_each_dispute_event_mirrors_the_dispute(post_event, event_type):
    event = STORY[event_type]

    assert post_event(event).status_code == 200

    dispute = Dispute.objects.get(stripe_id=DP)
    assert mirrored(dispute) == as_snapshot(event)
    assert (dispute.last_event_id, dispute.last_event_created) == (event["id"], as_datetime(event["created"]))
    assert StripeEvent.objects.get(pk=event["id"]).status == StripeEvent.Status.PROCESSED
    assert [(h.history_type, h.history_change_reason) for h in dispute.history.all()] == [("+", event_type)]


def test_the_story_in_order_ends_won_with_one_history_row_per_change(post_event):
    for event in STORY.values():
        assert post_event(event).status_code == 200

    dispute = Dispute.objects.get(stripe_id=DP)
    assert mirrored(dispute) == as_snapshot(STORY["charge.dispute.funds_reinstated"])
    assert dispute.status == Dispute.Status.WON and dispute.is_charge_refundable is False
    # funds_withdrawn and funds_reinstated change nothing the mirror keeps: no history row of their own.
    reasons = [h.history_change_reason for h in dispute.history.order_by("history_date", "history_id")]
    assert reasons == [
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.updated",
        "charge.dispute.closed",
    ]
    assert dispute.last_event_id == STORY["charge.dispute.funds_reinstated"]["id"]


def test_a_duplicate_delivery_changes_nothing(post_event):
    event = STORY["charge.dispute.created"]
    assert post_event(event).status_code == 200
    assert post_event(event).status_code == 200

    assert Dispute.objects.count() == 1
    assert Dispute.objects.get().history.count() == 1


def test_an_older_snapshot_never_overwrites_a_newer_one(post_event):
    closed, updated = STORY["charge.dispute.closed"], STORY["charge.dispute.updated"]
    assert post_event(closed).status_code == 200

    assert post_event(updated).status_code == 200  # older: answered 200, stored, not applied

    dispute = Dispute.objects.get(stripe_id=DP)
    assert dispute.status == Dispute.Status.WON
    assert (dispute.last_event_id, dispute.last_event_created) == (closed["id"], as_datetime(closed["created"]))
    assert dispute.history.count() == 1
    assert StripeEvent.objects.get(pk=updated["id"]).status == StripeEvent.Status.PROCESSED


def test_a_dispute_changes_no_entitlement_and_creates_no_account(post_event):
    assert post_event(STORY["charge.dispute.created"]).status_code == 200

    assert not Account.objects.exists()  # a dispute names no customer: nothing to create or lock
    assert not Invoice.objects.exists() and not Entitlement.objects.exists()


def test_dispute_events_stored_before_the_handler_existed_are_applied_by_reprocessing(post_event):
    """Deployed after Stripe already sent disputes: they were kept ``ignored``, and re-processing applies them."""
    path = registry.path_for("charge.dispute.created")
    registry.unregister(*STORY)
    try:
        for event in (STORY["charge.dispute.updated"], STORY["charge.dispute.created"]):
            assert post_event(event).status_code == 200
        assert set(StripeEvent.objects.values_list("status", flat=True)) == {"ignored"}
        assert not Dispute.objects.exists()
    finally:
        registry.register(path, *STORY)

    call_command(
        "reprocess_stripe_events",
        "--status",
        "ignored",
        "--type",
        "charge.dispute.created",
        "--type",
        "charge.dispute.updated",
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )

    assert mirrored(Dispute.objects.get(stripe_id=DP)) == as_snapshot(STORY["charge.dispute.updated"])
    assert set(StripeEvent.objects.values_list("status", flat=True)) == {"processed"}


# --- Its invoice and account, whichever arrives first ------------------------------------------


@pytest.mark.parametrize(
    "after_the_dispute",
    [("invoice_payment", "invoice"), ("invoice", "invoice_payment")],
    ids=["payment-then-invoice", "invoice-then-payment"],
)
def test_a_dispute_before_its_payment_and_invoice_is_shown_on_them(post_event, after_the_dispute):
    builders = {"invoice_payment": invoice_paid_by_intent, "invoice": paid_invoice}
    assert post_event(STORY["charge.dispute.created"]).status_code == 200
    dispute = Dispute.objects.get(stripe_id=DP)
    assert list(dispute.invoices()) == []

    for name in after_the_dispute:
        assert post_event(builders[name]()).status_code == 200

    invoice = Invoice.objects.get(stripe_id=INV)
    assert list(Dispute.objects.for_invoice(invoice)) == [dispute]
    assert list(Dispute.objects.for_account(invoice.account)) == [dispute]
    assert list(dispute.invoices()) == [invoice]


def test_a_dispute_of_a_charge_without_payment_intent_is_found_by_its_charge(post_event):
    post_event(paid_invoice())
    post_event(invoice_paid_by_intent())
    charge = charge_object(id=CH, customer=CUS, payment_intent=PI, amount=9000, amount_refunded=1000, created=T0 + 5)
    post_event(event_object(type="charge.refunded", obj=charge, created=T0 + 50))  # tells the payment its charge

    assert post_event(dispute_event("charge.dispute.created", OPENED, payment_intent=None)).status_code == 200

    dispute = Dispute.objects.get(stripe_id=DP)
    assert dispute.payment_intent_id == ""
    assert list(Dispute.objects.for_invoice(Invoice.objects.get(stripe_id=INV))) == [dispute]


def test_a_dispute_of_another_payment_is_not_shown(post_event):
    post_event(paid_invoice())
    post_event(invoice_paid_by_intent())
    post_event(stranger_event("charge.dispute.created", OPENED))

    invoice = Invoice.objects.get(stripe_id=INV)
    assert Dispute.objects.filter(stripe_id="dp_stranger").exists()
    assert not Dispute.objects.for_invoice(invoice).exists()
    assert not Dispute.objects.for_account(invoice.account).exists()


def test_a_dispute_follows_its_invoice_when_checkout_merges_the_account(post_event):
    post_event(STORY["charge.dispute.created"])
    post_event(invoice_paid_by_intent())
    post_event(paid_invoice())  # creates a placeholder account for the customer
    named = AccountFactory(name="Named at checkout", stripe_customer_id=None)
    session = checkout_session_object(
        id="cs_dp", customer=CUS, subscription="sub_dp", client_reference_id=str(named.pk), created=T0 + 10
    )

    assert post_event(event_object(type="checkout.session.completed", obj=session, created=T0 + 10)).status_code == 200

    assert Account.objects.get() == named  # the placeholder was merged away
    assert list(Dispute.objects.for_account(named)) == [Dispute.objects.get(stripe_id=DP)]


# --- Any order, with duplicates, at once ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_concurrent_first_deliveries_of_a_dispute_make_one_row(live_server, webhook_settings):
    """Every event of a dispute never seen, four times each, all at once: get_or_create's race."""
    answers = post_all_at_once(live_server.url + WEBHOOK_URL, list(STORY.values()) * 4)

    assert [status for status, _ in answers] == [200] * 4 * len(STORY)
    dispute = Dispute.objects.get()
    assert mirrored(dispute) == as_snapshot(STORY["charge.dispute.funds_reinstated"])
    assert dispute.last_event_id == STORY["charge.dispute.funds_reinstated"]["id"]
    assert sorted(StripeEvent.objects.values_list("status", flat=True)) == ["processed"] * len(STORY)


# The story, its payment and invoice, and a dispute of a charge this app never saw paid.
LIFECYCLE = [
    paid_invoice(),
    invoice_paid_by_intent(),
    *STORY.values(),
    stranger_event("charge.dispute.created", OPENED + 5, status="warning_needs_response"),
    stranger_event("charge.dispute.closed", OPENED + 9 * DAY, status="warning_closed"),
]


def dispute_state() -> dict:
    """Every dispute as mirrored, which of them its invoice and account show, and all other rows."""
    invoice = Invoice.objects.get(stripe_id=INV)
    return {
        "disputes": sorted(
            (d.stripe_id, *mirrored(d), d.last_event_created, d.last_event_id) for d in Dispute.objects.all()
        ),
        "on_invoice": sorted(Dispute.objects.for_invoice(invoice).values_list("stripe_id", flat=True)),
        "on_account": sorted(Dispute.objects.for_account(invoice.account).values_list("stripe_id", flat=True)),
        "rows": snapshot(),
    }


@hsettings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(order_seed=st.integers(0, 2**32 - 1), duplicates=st.sampled_from([0.0, 0.3, 0.6]))
def test_any_delivery_order_with_duplicates_ends_as_in_order(client, webhook_settings, order_seed, duplicates):
    clear_rows()
    deliver_until_accepted(client, sorted(LIFECYCLE, key=lambda e: e["created"]))
    expected = dispute_state()
    assert expected["on_invoice"] == expected["on_account"] == [DP]  # the stranger is on neither
    assert [d[1] for d in expected["disputes"]] == ["won", "warning_closed"]

    clear_rows()
    shuffled = arrange(LIFECYCLE, rng=random.Random(order_seed), shuffle=True, duplicates=duplicates)
    deliver_until_accepted(client, shuffled)

    assert dispute_state() == expected


# --- The admin ----------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(superuser=True))
    return client


@pytest.fixture
def disputed_invoice(post_event):
    """A paid invoice whose payment is disputed, delivered dispute first; and a stranger's dispute."""
    for event in (
        STORY["charge.dispute.created"],
        STORY["charge.dispute.updated"],
        invoice_paid_by_intent(),
        paid_invoice(),
    ):
        assert post_event(event).status_code == 200
    post_event(stranger_event("charge.dispute.created", OPENED, status="lost", reason="duplicate"))
    return Invoice.objects.get(stripe_id=INV)


def listed(response):
    assert response.status_code == 200
    return {d.stripe_id for d in response.context["cl"].result_list}


def test_dispute_list_shows_money_and_filters_by_status(staff_client, disputed_invoice):
    response = staff_client.get(changelist(Dispute))
    assert listed(response) == {DP, "dp_stranger"}
    assert b"45.00 USD" in response.content

    assert listed(staff_client.get(changelist(Dispute), {"status__exact": "under_review"})) == {DP}
    assert listed(staff_client.get(changelist(Dispute), {"status__exact": "lost"})) == {"dp_stranger"}
    assert listed(staff_client.get(changelist(Dispute), {"reason": "duplicate"})) == {"dp_stranger"}


@pytest.mark.parametrize("term", [DP, CH, PI, INV, "DP-0001", CUS, f"  {DP}  "])
def test_dispute_search_by_any_stripe_id_it_leads_to(staff_client, disputed_invoice, term):
    assert listed(staff_client.get(changelist(Dispute), {"q": term})) == {DP}


@pytest.mark.parametrize("page_of", ["invoice", "account"])
def test_invoice_and_account_lists_find_them_by_their_dispute(staff_client, post_event, disputed_invoice, page_of):
    assert post_event(paid_invoice(invoice_id="in_other", customer="cus_other", number="DP-0002")).status_code == 200
    model = Invoice if page_of == "invoice" else Account
    url = changelist(model)
    expected = disputed_invoice if page_of == "invoice" else disputed_invoice.account

    assert list(staff_client.get(url, {"q": f" {DP} "}).context["cl"].result_list) == [expected]
    assert list(staff_client.get(url, {"q": "dp_stranger"}).context["cl"].result_list) == []  # paid nothing here
    assert len(staff_client.get(url).context["cl"].result_list) == 2


def test_dispute_search_with_a_filter_keeps_the_filter(staff_client, disputed_invoice):
    assert listed(staff_client.get(changelist(Dispute), {"q": CUS, "status__exact": "lost"})) == set()
    assert listed(staff_client.get(changelist(Dispute), {"q": "in_nobody"})) == set()


def test_dispute_page_links_its_payment_invoice_account_and_dashboard(staff_client, disputed_invoice):
    dispute = Dispute.objects.get(stripe_id=DP)
    page = staff_client.get(change_page(dispute))

    assert page.status_code == 200
    content = page.content.decode()
    assert f"https://dashboard.stripe.com/test/disputes/{DP}" in content  # a test-mode dispute
    assert f"https://dashboard.stripe.com/test/payments/{CH}" in content
    assert change_page(dispute.payments().get()) in content
    assert change_page(disputed_invoice) in content
    assert change_page(disputed_invoice.account) in content
    assert "45.00 USD" in content and "Under Review" in content
    assert 'name="_save"' not in content


def test_dispute_is_read_only_in_the_admin(staff_client, disputed_invoice):
    dispute = Dispute.objects.get(stripe_id=DP)

    assert staff_client.post(change_page(dispute), {"status": "won"}).status_code == 403
    assert staff_client.get(reverse("admin:billing_dispute_add")).status_code == 403
    assert staff_client.get(reverse("admin:billing_dispute_delete", args=[dispute.pk])).status_code == 403
    dispute.refresh_from_db()
    assert dispute.status == "under_review"


def test_dispute_history_names_the_events(staff_client, disputed_invoice):
    dispute = Dispute.objects.get(stripe_id=DP)
    page = staff_client.get(reverse("admin:billing_dispute_history", args=[dispute.pk]))
    assert page.status_code == 200
    assert b"charge.dispute.created" in page.content and b"charge.dispute.updated" in page.content


def test_the_event_page_links_to_its_dispute(staff_client, disputed_invoice):
    event = StripeEvent.objects.get(pk=STORY["charge.dispute.created"]["id"])
    page = staff_client.get(change_page(event))
    assert change_page(Dispute.objects.get(stripe_id=DP)) in page.content.decode()


def _disputes_row(content: str, dispute: Dispute) -> str:
    """The row of ``dispute`` in a page's disputes table."""
    start = content.index(f'<a href="{change_page(dispute)}">{dispute.stripe_id}</a>')
    return content[start : content.index("</tr>", start)]


@pytest.mark.parametrize("page_of", ["invoice", "account"])
def test_invoice_and_account_pages_list_the_dispute(staff_client, disputed_invoice, page_of):
    obj = disputed_invoice if page_of == "invoice" else disputed_invoice.account
    dispute = Dispute.objects.get(stripe_id=DP)

    page = staff_client.get(change_page(obj))

    assert page.status_code == 200
    content = page.content.decode()
    row = _disputes_row(content, dispute)
    due = as_datetime(OPENED + 7 * DAY)
    for cell in ("45.00 USD", "Under Review", "fraudulent", f"{due:%Y-%m-%d %H:%M}"):
        assert f"<td>{cell}</td>" in row, cell
    assert "dp_stranger" not in content


@pytest.mark.parametrize("page_of", ["invoice", "account"])
def test_pages_without_disputes_show_no_table(staff_client, post_event, page_of):
    post_event(paid_invoice())
    post_event(invoice_paid_by_intent())
    invoice = Invoice.objects.get(stripe_id=INV)

    page = staff_client.get(change_page(invoice if page_of == "invoice" else invoice.account))

    assert page.status_code == 200
    assert b"Disputes of its payments" in page.content and b"<th>evidence due by</th>" not in page.content


def test_dispute_changelist_queries_do_not_grow_with_rows(staff_client, post_event):
    def add(start, stop):
        for i in range(start, stop):
            post_event(
                dispute_event(
                    "charge.dispute.created",
                    OPENED,
                    dispute_id=f"dp_n{i}",
                    charge=f"ch_n{i}",
                    payment_intent=f"pi_n{i}",
                )
            )

    add(0, 3)
    staff_client.get(changelist(Dispute))  # warm per-process caches
    with CaptureQueriesContext(connection) as few:
        assert len(listed(staff_client.get(changelist(Dispute)))) == 3
    add(3, 30)
    with CaptureQueriesContext(connection) as many:
        assert len(listed(staff_client.get(changelist(Dispute)))) == 30
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]


def test_provisioning_imports_nothing_of_billing():
    """Apps depend one way: billing uses provisioning (its admin included), never the reverse."""
    offenders = []
    for path in sorted((Path(__file__).resolve().parents[2] / "provisioning").rglob("*.py")):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "billing"]
    assert offenders == []

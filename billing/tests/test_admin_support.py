"""Support staff in the admin: the "Billing support" group, finding a customer by any Stripe id,
the account page as the hub, the invoice page, and what nobody may do.

The rows are written by the webhook from one customer's story (``support_story``); a plain staff
user in the group (not a superuser) does what support does, and a staff user outside it is refused.
"""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.urls import reverse

from billing.models import Dispute, Invoice, OwedEmail, Payment, Refund, Renewal, StripeEvent, Subscription
from billing.simulation.objects import event_object, invoice_payment_object
from billing.simulation.payment_objects import dispute_object, refund_object
from billing.tests.conftest import DAY, T0, active_subscription, deliver, first_invoice_paid_event, subscription_event
from billing.tests.factories import InvoiceFactory, PaymentFactory, SubscriptionFactory
from billing.tests.support_story import change_page, changelist, support_group
from provisioning.models import Account, Entitlement
from provisioning.tests.factories import AccountFactory, UserFactory

pytestmark = pytest.mark.django_db

SUPPORT_PERMISSIONS = {
    "billing.view_subscription",
    "billing.resync_subscription",
    "billing.view_invoice",
    "billing.view_invoicelineitem",
    "billing.resync_invoice",
    "billing.resend_receipt",
    "billing.view_renewal",
    "billing.view_payment",
    "billing.view_refund",
    "billing.view_dispute",
    "billing.view_stripeevent",
    "billing.reprocess_stripeevent",
    "billing.view_owedemail",
    "billing.send_owedemail",
    "provisioning.view_account",
    "provisioning.change_account",
    "provisioning.view_entitlement",
    "provisioning.view_membership",
    "provisioning.add_membership",
    "provisioning.change_membership",
    "provisioning.delete_membership",
    "auth.view_user",
}


def found(client, model, term) -> set:
    response = client.get(changelist(model), {"q": term})
    assert response.status_code == 200, (model, term)
    return set(response.context["cl"].result_list)


# --- The group ------------------------------------------------------------------------------


def test_the_support_group_holds_exactly_what_support_needs():
    granted = {f"{p.content_type.app_label}.{p.codename}" for p in support_group().permissions.all()}
    assert granted == SUPPORT_PERMISSIONS


def test_a_support_user_sees_billing_and_provisioning_on_the_admin_index(support):
    page = support.get(reverse("admin:index"))
    assert page.status_code == 200
    assert b"permission to view or edit anything" not in page.content
    for model in (
        Account,
        Entitlement,
        Subscription,
        Invoice,
        Renewal,
        Payment,
        Refund,
        Dispute,
        StripeEvent,
        OwedEmail,
    ):
        assert changelist(model).encode() in page.content, model


# --- Finding the customer by any Stripe id --------------------------------------------------------


def test_every_kind_of_stripe_id_finds_the_customer_on_every_list(story, support):
    account = Account.objects.get(stripe_customer_id="cus_story")
    sub, late = Subscription.objects.get(stripe_id="sub_story"), Subscription.objects.get(stripe_id="sub_late")
    invoice = Invoice.objects.get(stripe_id="in_story1")
    payment, refund = Payment.objects.get(payment_intent_id="pi_story1"), Refund.objects.get(stripe_id="re_story1")
    dispute = Dispute.objects.get(stripe_id="dp_story1")
    evt = story.events
    expectations = {
        Account: {
            term: {account}
            for term in (
                "cus_story",
                "sub_story",
                "sub_late",
                "in_story1",
                "pi_story1",
                "ch_story1",
                "re_story1",
                "dp_story1",
                evt["invoice_paid"],
                evt["dispute"],
                "STORY-0001",
            )
        },
        Subscription: {
            "sub_story": {sub},
            "cus_story": {sub, late},
            "in_story1": {sub},
            "pi_story1": {sub},
            "dp_story1": {sub},
            evt["sub_created"]: {sub},
        },
        Invoice: {
            term: {invoice}
            for term in (
                "in_story1",
                "cus_story",
                "sub_story",
                "pi_story1",
                "ch_story1",
                "re_story1",
                "dp_story1",
                evt["invoice_paid"],
                evt["invoice_payment"],
                "STORY-0001",
            )
        },
        Payment: {
            term: {payment} for term in ("pi_story1", "ch_story1", "in_story1", "cus_story", "re_story1", "dp_story1")
        },
        Refund: {term: {refund} for term in ("re_story1", "pi_story1", "ch_story1", "in_story1", "cus_story")},
        Dispute: {
            term: {dispute} for term in ("dp_story1", "ch_story1", "pi_story1", "in_story1", "cus_story", "STORY-0001")
        },
        Renewal: {term: set(Renewal.objects.filter(subscription=sub)) for term in ("sub_story", "cus_story")},
        Entitlement: {term: set(Entitlement.objects.filter(account=account)) for term in ("cus_story", "sub_story")},
        OwedEmail: {term: set(OwedEmail.objects.filter(account=account)) for term in ("cus_story", "in_story1")},
    }
    for model, terms in expectations.items():
        for term, expected in terms.items():
            assert expected, (model, term)  # the story made rows for every expectation
            assert found(support, model, term) == expected, (model.__name__, term)


def test_a_customer_id_finds_all_of_that_customers_events_and_no_other(story, support):
    mine = {"sub_created", "invoice_paid", "invoice_payment", "charge_refunded", "refund", "dispute"}
    mine |= {"setup_intent", "checkout", "late_paid", "late_sub"}
    expected = {story.event(name) for name in mine}
    assert found(support, StripeEvent, "cus_story") == expected
    assert found(support, StripeEvent, "cus_other") == {story.event("other_sub"), story.event("other_paid")}
    assert found(support, StripeEvent, "in_story1") == {story.event("invoice_paid"), story.event("invoice_payment")}
    assert found(support, StripeEvent, story.events["dispute"]) == {story.event("dispute")}
    assert found(support, StripeEvent, "dp_story1") == {story.event("dispute")}


def test_stripe_ids_are_matched_exactly(story, support):
    assert found(support, Invoice, "IN_STORY1") == set()  # Stripe ids are case-sensitive
    assert found(support, Invoice, "in_story") == set()  # and whole: "in_story" is not in_story1
    assert found(support, Account, "evt_doesnotexist") == set()


# --- The account page: the hub -----------------------------------------------------------------


def test_the_account_page_shows_everything_about_the_customer(story, support):
    account = Account.objects.get(stripe_customer_id="cus_story")
    invoice = Invoice.objects.get(stripe_id="in_story1")
    page = support.get(change_page(account))
    assert page.status_code == 200
    html = page.content.decode()

    assert "https://dashboard.stripe.com/test/customers/cus_story" in html  # a test-mode customer
    for table_id in ("account-subscriptions", "account-entitlements", "account-invoices", "account-renewals"):
        assert f'id="{table_id}"' in html, table_id
    assert f'<a href="{change_page(invoice)}">STORY-0001</a>' in html  # number, linked to the invoice's page
    assert "40.00 USD" in html and "Paid" in html  # total with currency, status
    for renewal in Renewal.objects.filter(subscription__stripe_id="sub_story"):
        assert change_page(renewal) in html
    assert 'id="disputes"' in html and "dp_story1" in html
    assert 'id="account-events"' in html
    for name in ("invoice_paid", "dispute", "late_paid"):
        assert change_page(story.event(name)) in html, name  # recent events, each linked
    assert change_page(story.event("other_paid")) not in html
    assert "sub_story" in html and "sub_late" in html
    assert 'name="_save"' in html  # support may fix the name and billing e-mail


def test_support_edits_an_accounts_name_and_nothing_stripe_owns(story, support):
    account = Account.objects.get(stripe_customer_id="cus_story")
    data = {
        "name": "Story Ltd",
        "billing_email": "accounts@story.example",
        "stripe_customer_id": "cus_forged",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
    }
    response = support.post(change_page(account), data)
    assert response.status_code == 302, response.content[:2000]
    account.refresh_from_db()
    assert (account.name, account.billing_email, account.stripe_customer_id) == (
        "Story Ltd",
        "accounts@story.example",
        "cus_story",
    )


def test_the_invoice_page_shows_its_payments_refunds_disputes_and_receipts(story, support):
    invoice = Invoice.objects.get(stripe_id="in_story1")
    page = support.get(change_page(invoice))
    assert page.status_code == 200
    html = page.content.decode()
    payment = Payment.objects.get(payment_intent_id="pi_story1")
    refund = Refund.objects.get(stripe_id="re_story1")
    assert 'id="invoice-payments"' in html and change_page(payment) in html
    assert "https://dashboard.stripe.com/test/payments/ch_story1" in html
    assert 'id="invoice-refunds"' in html and change_page(refund) in html and "5.00 USD" in html
    assert 'id="disputes"' in html and change_page(Dispute.objects.get(stripe_id="dp_story1")) in html
    assert 'id="invoice-receipts"' in html and "receipt:in_story1" in html
    assert "https://dashboard.stripe.com/test/invoices/in_story1" in html


# --- Dashboard links follow the object's mode ---------------------------------------------------


@pytest.mark.parametrize("livemode, prefix", [(True, ""), (False, "test/")])
def test_dashboard_links_follow_the_objects_livemode(admin_client, livemode, prefix):
    account = AccountFactory(stripe_customer_id=f"cus_mode{int(livemode)}")
    sub = SubscriptionFactory(account=account, stripe_id=f"sub_mode{int(livemode)}", livemode=livemode)
    invoice = InvoiceFactory(subscription=sub, stripe_id=f"in_mode{int(livemode)}", livemode=livemode)
    payment = PaymentFactory(invoice=invoice, payment_intent_id=f"pi_mode{int(livemode)}", livemode=livemode)
    for obj, path, stripe_id in (
        (account, "customers", account.stripe_customer_id),
        (sub, "subscriptions", sub.stripe_id),
        (invoice, "invoices", invoice.stripe_id),
        (payment, "payments", payment.payment_intent_id),
    ):
        page = admin_client.get(change_page(obj))
        assert f"https://dashboard.stripe.com/{prefix}{path}/{stripe_id}".encode() in page.content, path


def test_mirrored_rows_take_their_mode_from_stripe(client, webhook_settings):
    """Each service that mirrors an object stores the mode of the event it came in."""
    live = [
        subscription_event("customer.subscription.created", active_subscription("sub_live", "cus_live"), created=T0),
        first_invoice_paid_event("in_live", sub_id="sub_live", customer="cus_live", start=T0, end=T0 + DAY, created=T0),
        event_object(
            type="invoice_payment.paid",
            obj=invoice_payment_object(
                id="inpay_live", invoice="in_live", payment_intent="pi_live", amount_paid=2000, created=T0
            ),
            created=T0,
        ),
        event_object(
            type="refund.created",
            obj=refund_object(id="re_live", charge="ch_live", payment_intent="pi_live", amount=100, created=T0),
            created=T0,
        ),
        event_object(
            type="charge.dispute.created",
            obj=dispute_object(id="dp_live", charge="ch_live", payment_intent="pi_live", amount=100, created=T0),
            created=T0,
        ),
    ]
    for payload in live:
        payload["livemode"] = True
        assert deliver(client, payload).status_code == 200, payload["type"]
    for model, field, stripe_id in (
        (Subscription, "stripe_id", "sub_live"),
        (Invoice, "stripe_id", "in_live"),
        (Payment, "payment_intent_id", "pi_live"),
        (Refund, "stripe_id", "re_live"),
        (Dispute, "stripe_id", "dp_live"),
    ):
        assert model.objects.get(**{field: stripe_id}).livemode is True, model.__name__


# --- What nobody may do ---------------------------------------------------------------------------


def test_a_staff_user_outside_the_group_is_refused(story, client):
    client.force_login(UserFactory(staff=True))
    account = Account.objects.get(stripe_customer_id="cus_story")
    assert client.get(changelist(Invoice)).status_code == 403
    assert client.get(change_page(account)).status_code == 403
    event = StripeEvent.objects.get(pk=story.failed_event)
    reprocess = reverse("admin:billing_stripeevent_reprocess", args=[event.pk])
    assert client.get(reprocess).status_code == 403
    assert client.post(reprocess, {"post": "yes"}).status_code == 403
    assert StripeEvent.objects.get(pk=event.pk).status == StripeEvent.Status.FAILED


def test_viewing_events_does_not_allow_re_processing_them(story, client):
    viewer = UserFactory(staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_stripeevent"))
    client.force_login(viewer)
    event = StripeEvent.objects.get(pk=story.failed_event)
    assert b'value="reprocess"' not in client.get(changelist(StripeEvent)).content
    page = client.get(change_page(event))
    assert page.status_code == 200 and b'id="reprocess-button"' not in page.content
    response = client.post(
        changelist(StripeEvent), {"action": "reprocess", "_selected_action": [event.pk], "post": "yes"}
    )
    assert StripeEvent.objects.get(pk=event.pk).status == StripeEvent.Status.FAILED
    assert response.status_code in (200, 302)


def test_not_even_a_superuser_deletes_accounts_or_mirrored_rows(story, admin_client):
    rows = [
        Account.objects.get(stripe_customer_id="cus_story"),
        Subscription.objects.get(stripe_id="sub_story"),
        Invoice.objects.get(stripe_id="in_story1"),
        Payment.objects.get(payment_intent_id="pi_story1"),
        Refund.objects.get(stripe_id="re_story1"),
        Dispute.objects.get(stripe_id="dp_story1"),
        Renewal.objects.filter(subscription__stripe_id="sub_story").first(),
        Entitlement.objects.filter(account__stripe_customer_id="cus_story").first(),
        StripeEvent.objects.get(pk=story.events["invoice_paid"]),
        OwedEmail.objects.get(key="receipt:in_story1"),
    ]
    for row in rows:
        opts = row._meta
        delete = reverse(f"admin:{opts.app_label}_{opts.model_name}_delete", args=[row.pk])
        assert admin_client.post(delete, {"post": "yes"}).status_code == 403, opts.label
        assert type(row).objects.filter(pk=row.pk).exists(), opts.label
        assert b'value="delete_selected"' not in admin_client.get(changelist(type(row))).content, opts.label
        assert b"deletelink" not in admin_client.get(change_page(row)).content, opts.label


def test_an_account_added_by_hand_needs_only_a_name(admin_client):
    """An account that checkout will link to its customer (its primary key is the session's reference)."""
    add = reverse("admin:provisioning_account_add")
    assert admin_client.get(add).status_code == 200
    data = {"name": "Newco", "billing_email": "", "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0"}
    assert admin_client.post(add, data).status_code == 302
    assert Account.objects.get(name="Newco").stripe_customer_id is None


def test_list_columns_fit_a_1400_pixel_window():
    """At most six short columns (and the selection box) on every list of billing and provisioning."""
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label in ("billing", "provisioning"):
            assert len(model_admin.list_display) <= 6, model._meta.label

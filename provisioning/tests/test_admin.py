"""Admin of accounts: support finds a customer by any e-mail or Stripe id and sees what it may use."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import Subscription
from billing.tests.factories import InvoiceFactory, SubscriptionFactory
from provisioning.models import Account, Entitlement, Membership
from provisioning.tests.factories import AccountFactory, EntitlementFactory, MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = timezone.now().replace(microsecond=0)


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(superuser=True))
    return client


def make_customer(key, seats=3):
    """An account with a member, a subscription, an invoice and a paid entitlement in force."""
    account = AccountFactory(
        name=f"Org {key}", stripe_customer_id=f"cus_{key}", billing_email=f"billing-{key}@example.com"
    )
    MembershipFactory(
        account=account, role="owner", user__username=f"user-{key}", user__email=f"member-{key}@example.com"
    )
    subscription = SubscriptionFactory(stripe_id=f"sub_{key}", account=account, status="active", quantity=seats)
    InvoiceFactory(stripe_id=f"in_{key}", subscription=subscription, number=f"NUM-{key}", status="paid", currency="usd")
    EntitlementFactory(
        account=account,
        kind="paid",
        seats=seats,
        starts_at=NOW - timedelta(days=1),
        expires_at=NOW + timedelta(days=29),
        stripe_subscription_id=subscription.stripe_id,
        stripe_invoice_id=f"in_{key}",
    )
    return account


def changelist(model):
    return reverse(f"admin:provisioning_{model._meta.model_name}_changelist")


def change_page(obj):
    return reverse(f"admin:provisioning_{obj._meta.model_name}_change", args=[obj.pk])


def listed(response):
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def test_account_list_shows_current_entitlement(staff_client):
    account = make_customer("list", seats=7)
    # A trial overlapping the paid window: the SaaS's rule says paid wins.
    EntitlementFactory(
        account=account,
        kind="trial",
        seats=1,
        starts_at=NOW - timedelta(days=2),
        expires_at=NOW + timedelta(days=60),
        stripe_subscription_id="sub_list",
    )
    AccountFactory(name="Nothing yet", stripe_customer_id=None)

    response = staff_client.get(changelist(Account))
    assert len(listed(response)) == 2
    assert b"paid, 7 seat(s), until" in response.content


@pytest.mark.parametrize(
    "term",
    [
        "Org wanted",
        "cus_wanted",
        "billing-wanted@example.com",
        "member-wanted@example.com",
        "sub_wanted",
        "in_wanted",
        "NUM-wanted",
    ],
)
def test_account_search_by_any_email_or_stripe_id(staff_client, term):
    wanted = make_customer("wanted")
    make_customer("other")
    InvoiceFactory(stripe_id="in_second", account=wanted, number="NUM-wanted-2", status="open", currency="usd")

    assert listed(staff_client.get(changelist(Account), {"q": term})) == [wanted]  # once, even with two invoices


def test_account_page_shows_members_entitlements_and_subscriptions(staff_client):
    account = make_customer("page")
    page = staff_client.get(change_page(account))
    assert page.status_code == 200
    content = page.content.decode()
    assert "user-page" in content  # the member, in the memberships inline
    assert "in_page" in content  # the invoice that bought the entitlement, in the entitlements inline
    assert "https://dashboard.stripe.com/test/customers/cus_page" in content  # its subscription is in test mode
    subscription = Subscription.objects.get(stripe_id="sub_page")
    assert reverse("admin:billing_subscription_change", args=[subscription.pk]) in content
    assert "paid, 3 seat(s), until" in content


def test_support_edits_name_but_not_the_stripe_customer(staff_client):
    account = make_customer("edit")
    page = staff_client.get(change_page(account))
    data = {"name": "Renamed", "billing_email": "ap@example.com", "stripe_customer_id": "cus_forged"}
    for inline in page.context["inline_admin_formsets"]:
        formset = inline.formset
        data.update({f"{formset.prefix}-{k}": v for k, v in formset.management_form.initial.items()})
        for form in formset.forms:
            data.update({bf.html_name: bf.value() for bf in form if bf.value() is not None})

    response = staff_client.post(change_page(account), data)
    assert response.status_code == 302, response.context and response.context.get("errors")
    account.refresh_from_db()
    assert (account.name, account.billing_email) == ("Renamed", "ap@example.com")
    assert account.stripe_customer_id == "cus_edit"  # Stripe's, not support's
    assert account.history.count() == 2  # the edit is in the account's history


def test_support_adds_an_account_that_checkout_will_link(staff_client):
    add = reverse("admin:provisioning_account_add")
    assert staff_client.get(add).status_code == 200
    data = {"name": "Newco", "billing_email": "", "stripe_customer_id": "cus_forged"}
    for prefix in ("memberships", "entitlements", "subscriptions"):
        data.update({f"{prefix}-TOTAL_FORMS": 0, f"{prefix}-INITIAL_FORMS": 0})
    assert staff_client.post(add, data).status_code == 302
    assert Account.objects.get(name="Newco").stripe_customer_id is None


def test_membership_list_filter_search_and_page(staff_client):
    make_customer("m1")
    other = make_customer("m2").memberships.get()
    other.role = "member"
    other.save()
    owner = Membership.objects.get(account__name="Org m1")

    assert listed(staff_client.get(changelist(Membership), {"role__exact": "owner"})) == [owner]
    assert listed(staff_client.get(changelist(Membership), {"q": "member-m2@example.com"})) == [other]
    assert staff_client.get(change_page(owner)).status_code == 200
    assert staff_client.get(reverse("admin:provisioning_membership_add")).status_code == 200


def test_entitlement_list_filter_search_and_read_only_page(staff_client):
    paid = make_customer("e1").entitlements.get()
    make_customer("e2")
    trial = EntitlementFactory(
        account=paid.account,
        kind="trial",
        starts_at=NOW - timedelta(days=40),
        expires_at=NOW - timedelta(days=30),
        stripe_subscription_id="sub_e1",
    )

    assert listed(staff_client.get(changelist(Entitlement), {"kind__exact": "trial"})) == [trial]
    assert {*listed(staff_client.get(changelist(Entitlement), {"q": "Org e1"}))} == {paid, trial}
    assert {*listed(staff_client.get(changelist(Entitlement), {"q": "sub_e1"}))} == {paid, trial}
    assert listed(staff_client.get(changelist(Entitlement), {"q": "in_e1"})) == [paid]
    by_year = {"starts_at__year": trial.starts_at.year, "kind__exact": "trial"}  # the date hierarchy
    assert listed(staff_client.get(changelist(Entitlement), by_year)) == [trial]

    page = staff_client.get(change_page(paid))
    assert page.status_code == 200 and b'name="_save"' not in page.content


def test_account_changelist_queries_do_not_grow_with_rows(staff_client):
    for i in range(3):
        make_customer(f"q{i}")
    staff_client.get(changelist(Account))  # warm per-process caches
    with CaptureQueriesContext(connection) as few:
        assert len(listed(staff_client.get(changelist(Account)))) == 3
    for i in range(3, 30):
        make_customer(f"q{i}")
    with CaptureQueriesContext(connection) as many:
        assert len(listed(staff_client.get(changelist(Account)))) == 30
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]

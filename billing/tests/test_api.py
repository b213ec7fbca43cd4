"""REST API: an account's owners and admins see its invoices and subscription, nobody else."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from billing.models import Subscription
from billing.tests.factories import InvoiceFactory, SubscriptionFactory
from provisioning.tests.factories import AccountFactory, EntitlementFactory, MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def world():
    now = timezone.now()
    mine = AccountFactory(name="Mine")
    theirs = AccountFactory(name="Theirs")
    sub = SubscriptionFactory(
        stripe_id="sub_mine",
        account=mine,
        status="active",
        quantity=4,
        current_period_start=now - timedelta(days=3),
        current_period_end=now + timedelta(days=27),
    )
    EntitlementFactory(
        account=mine,
        kind="paid",
        seats=4,
        starts_at=now - timedelta(days=3),
        expires_at=now + timedelta(days=27),
        stripe_subscription_id="sub_mine",
    )
    for i, account in enumerate([mine, mine, theirs]):
        InvoiceFactory(
            stripe_id=f"in_{i}",
            account=account,
            status="paid",
            currency="usd",
            total=1000 * (i + 1),
            stripe_created=now - timedelta(days=10 - i),
        )
    users = {role: MembershipFactory(account=mine, role=role).user for role in ("owner", "admin", "member")}
    return {"mine": mine, "theirs": theirs, "sub": sub, **users}


def as_user(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.mark.parametrize("role", ["owner", "admin"])
def test_owners_and_admins_see_only_their_accounts_invoices_newest_first(world, role):
    response = as_user(world[role]).get("/api/billing/invoices/")
    assert response.status_code == 200
    assert [row["id"] for row in response.json()["results"]] == ["in_1", "in_0"]
    assert response.json()["results"][0]["total"] == 2000


def test_members_and_strangers_are_refused(world):
    assert as_user(world["member"]).get("/api/billing/invoices/").status_code == 403
    for url in ("/api/billing/invoices/", "/api/billing/subscription/"):
        response = APIClient().get(url)
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == "Token"


def test_invoices_carry_their_subscription_id(world):
    subscribed = InvoiceFactory(
        subscription=world["sub"], stripe_created=timezone.now(), stripe_subscription_id="sub_mine"
    )
    rows = as_user(world["owner"]).get("/api/billing/invoices/").json()["results"]
    by_id = {row["id"]: row["subscription"] for row in rows}
    assert by_id == {subscribed.stripe_id: "sub_mine", "in_1": None, "in_0": None}


def test_an_invoice_names_its_subscription_before_the_subscription_is_mirrored(world):
    InvoiceFactory(account=world["mine"], stripe_id="in_early", stripe_subscription_id="sub_not_yet_seen")
    rows = as_user(world["owner"]).get("/api/billing/invoices/").json()["results"]
    assert {row["id"]: row["subscription"] for row in rows}["in_early"] == "sub_not_yet_seen"


def test_invoices_come_in_pages_of_fifty(world):
    now = timezone.now()
    for i in range(53):
        InvoiceFactory(account=world["mine"], stripe_id=f"in_page{i:02d}", stripe_created=now + timedelta(minutes=i))
    client = as_user(world["owner"])

    first = client.get("/api/billing/invoices/").json()
    assert first["count"] == 55 and first["previous"] is None
    assert len(first["results"]) == 50
    assert first["results"][0]["id"] == "in_page52"  # newest first

    second = client.get(first["next"]).json()
    assert second["next"] is None
    assert [row["id"] for row in second["results"]] == ["in_page02", "in_page01", "in_page00", "in_1", "in_0"]
    assert client.get("/api/billing/invoices/?page=3").status_code == 404


def test_subscription_with_current_entitlement(world):
    data = as_user(world["owner"]).get("/api/billing/subscription/").json()
    assert (data["id"], data["status"], data["quantity"]) == ("sub_mine", "active", 4)
    assert (data["entitlement"]["kind"], data["entitlement"]["seats"]) == ("paid", 4)


def test_token_authentication(world):
    token = Token.objects.create(user=world["owner"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert client.get("/api/billing/invoices/").status_code == 200


def test_a_user_of_several_accounts_names_one(world):
    MembershipFactory(user=world["owner"], account=world["theirs"], role="owner")
    client = as_user(world["owner"])
    assert client.get("/api/billing/invoices/").status_code == 400
    response = client.get(f"/api/billing/invoices/?account={world['theirs'].pk}")
    assert [row["id"] for row in response.json()["results"]] == ["in_2"]


@pytest.mark.parametrize("value", ["", "abc", "²", "-1", "0", "1.5", "9" * 30, "1 OR 1=1"])
def test_a_bad_account_parameter_is_a_400(world, value):
    response = as_user(world["owner"]).get("/api/billing/invoices/", {"account": value})
    assert response.status_code == 400
    assert "account" in response.json()


def test_an_account_the_caller_does_not_administer_is_refused(world):
    response = as_user(world["owner"]).get(f"/api/billing/invoices/?account={world['theirs'].pk}")
    assert response.status_code == 403


def test_no_subscription_is_404(world):
    Subscription.objects.all().delete()
    assert as_user(world["owner"]).get("/api/billing/subscription/").status_code == 404


def test_openapi_schema_describes_both_endpoints(world):
    response = as_user(world["owner"]).get("/api/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/billing/invoices/" in paths and "/api/billing/subscription/" in paths

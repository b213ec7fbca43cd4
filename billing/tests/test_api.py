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
    assert APIClient().get("/api/billing/invoices/").status_code in (401, 403)
    assert APIClient().get("/api/billing/subscription/").status_code in (401, 403)


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


def test_no_subscription_is_404(world):
    Subscription.objects.all().delete()
    assert as_user(world["owner"]).get("/api/billing/subscription/").status_code == 404


def test_openapi_schema_describes_both_endpoints(world):
    response = as_user(world["owner"]).get("/api/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/billing/invoices/" in paths and "/api/billing/subscription/" in paths

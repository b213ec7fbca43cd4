"""Who may use the API, and how: every role with each way in (the login page's session, a token).

Sessions are opened by posting the real login page with its CSRF token (the client enforces
CSRF like a browser's would); tokens are obtained from ``POST /api/auth/token/`` with the
user's password. Nobody is ``force_authenticate``d here.
"""

import re

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from billing.tests.factories import InvoiceFactory, SubscriptionFactory
from provisioning.tests.factories import AccountFactory, MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct-horse-battery-staple"
INVOICES = "/api/billing/invoices/"
SUBSCRIPTION = "/api/billing/subscription/"
ROLES = ["owner", "admin", "member", "outsider"]
SEES_BILLING = {"owner": True, "admin": True, "member": False, "outsider": False}


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Real password checks, with a hasher cheap enough for some forty logins."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def world():
    account = AccountFactory(name="Acme")
    subscription = SubscriptionFactory(account=account, stripe_id="sub_acme", quantity=3)
    InvoiceFactory(subscription=subscription, stripe_id="in_acme_1", stripe_subscription_id="sub_acme")
    InvoiceFactory(account=AccountFactory(name="Other"), stripe_id="in_other")
    users = {
        role: MembershipFactory(account=account, role=role, user__password=PASSWORD).user
        for role in ("owner", "admin", "member")
    }
    users["outsider"] = UserFactory(password=PASSWORD)  # signed in, member of no account
    return {"account": account, **users}


def csrf_token_of(client) -> str:
    return client.cookies["csrftoken"].value


def session_client(user) -> Client:
    """A browser that signed in on the login page, CSRF enforced as in production."""
    client = Client(enforce_csrf_checks=True)
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    response = client.post(
        "/accounts/login/",
        {"username": user.username, "password": PASSWORD, "csrfmiddlewaretoken": csrf_token_of(client)},
    )
    assert response.status_code == 302 and response["Location"] == "/billing/"
    return client


def token_client(user) -> APIClient:
    """A script that exchanged the user's password for their token."""
    response = APIClient().post("/api/auth/token/", {"username": user.username, "password": PASSWORD}, format="json")
    assert response.status_code == 200
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    return client


CLIENTS = {"session": session_client, "token": token_client}


@pytest.mark.parametrize("auth", sorted(CLIENTS))
@pytest.mark.parametrize("role", ROLES)
def test_each_role_with_each_way_in(world, role, auth):
    client = CLIENTS[auth](world[role])

    invoices = client.get(INVOICES)
    subscription = client.get(SUBSCRIPTION)

    if SEES_BILLING[role]:
        assert invoices.status_code == 200 and subscription.status_code == 200
        assert [(row["id"], row["subscription"]) for row in invoices.json()["results"]] == [("in_acme_1", "sub_acme")]
        assert (subscription.json()["id"], subscription.json()["quantity"]) == ("sub_acme", 3)
    else:
        assert invoices.status_code == 403 and subscription.status_code == 403
        assert "owners and admins" in invoices.json()["detail"]


@pytest.mark.parametrize("url", [INVOICES, SUBSCRIPTION])
def test_no_credentials_is_401_with_www_authenticate(world, url):
    response = Client().get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response.json() == {"detail": "Authentication credentials were not provided."}


def test_a_wrong_token_is_401(world):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    response = client.get(INVOICES)
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"


def test_a_wrong_password_signs_nobody_in(world):
    client = Client(enforce_csrf_checks=True)
    client.get("/accounts/login/")
    response = client.post(
        "/accounts/login/",
        {"username": world["owner"].username, "password": "nope", "csrfmiddlewaretoken": csrf_token_of(client)},
    )
    assert response.status_code == 200
    assert b"didn't match" in response.content
    assert client.get(INVOICES).status_code == 401


def test_the_login_page_refuses_a_post_without_its_csrf_token(world):
    client = Client(enforce_csrf_checks=True)
    response = client.post("/accounts/login/", {"username": world["owner"].username, "password": PASSWORD})
    assert response.status_code == 403
    assert client.get(INVOICES).status_code == 401


def test_session_auth_checks_csrf_on_unsafe_methods(world):
    client = session_client(world["owner"])
    without = client.post(INVOICES)
    assert without.status_code == 403 and "CSRF" in without.json()["detail"]
    # With the token the request passes authentication and meets the endpoint: read-only.
    with_token = client.post(INVOICES, headers={"X-CSRFToken": csrf_token_of(client)})
    assert with_token.status_code == 405


def test_a_token_needs_no_csrf_token(world):
    client = token_client(world["owner"])
    assert client.post(INVOICES).status_code == 405  # authenticated; the endpoint is read-only


def test_obtaining_a_token(world):
    owner = world["owner"]
    first = Client().post("/api/auth/token/", {"username": owner.username, "password": PASSWORD})
    again = Client().post("/api/auth/token/", {"username": owner.username, "password": PASSWORD})
    assert first.status_code == again.status_code == 200
    assert first.json()["token"] == again.json()["token"] == Token.objects.get(user=owner).key

    wrong = Client().post("/api/auth/token/", {"username": owner.username, "password": "nope"})
    assert wrong.status_code == 400
    assert "token" not in wrong.json()
    assert Client().get("/api/auth/token/").status_code == 405


def test_an_inactive_user_gets_no_token_and_no_session(world):
    owner = world["owner"]
    owner.is_active = False
    owner.save()
    assert APIClient().post("/api/auth/token/", {"username": owner.username, "password": PASSWORD}).status_code == 400
    client = Client()
    assert not client.login(username=owner.username, password=PASSWORD)


def test_logging_out_ends_the_session(world):
    client = session_client(world["owner"])
    assert client.get(INVOICES).status_code == 200
    response = client.post("/accounts/logout/", {"csrfmiddlewaretoken": csrf_token_of(client)})
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"
    assert client.get(INVOICES).status_code == 401


def test_staff_without_membership_sees_no_account_billing(world):
    staff = UserFactory(superuser=True, password=PASSWORD)
    assert session_client(staff).get(INVOICES).status_code == 403


# --- The page owners land on ------------------------------------------------------------------


def test_my_billing_asks_to_sign_in_first():
    response = Client().get("/billing/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/?next=/billing/"


def test_my_billing_links_owners_to_their_billing(world):
    page = session_client(world["owner"]).get("/billing/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Acme" in text and "Owner" in text
    assert f'href="{INVOICES}"' in text and f'href="{SUBSCRIPTION}"' in text
    assert "/api/auth/token/" in text


def test_my_billing_tells_a_member_who_can_see_billing(world):
    text = session_client(world["member"]).get("/billing/").content.decode()
    assert "Acme" in text and "Member" in text
    assert f'href="{INVOICES}"' not in text
    assert "only the account's owners and admins see its billing" in text


def test_my_billing_names_the_account_when_the_user_administers_several(world):
    second = AccountFactory(name="Second")
    MembershipFactory(account=second, user=world["owner"], role="admin")
    text = session_client(world["owner"]).get("/billing/").content.decode()
    assert f'href="{INVOICES}?account={world["account"].pk}"' in text
    assert f'href="{INVOICES}?account={second.pk}"' in text


def test_the_login_page_is_not_the_admins(world):
    text = Client().get("/accounts/login/").content.decode()
    assert re.search(r'<form method="post" action="/accounts/login/">', text)
    assert "Django administration" not in text

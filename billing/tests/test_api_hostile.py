"""Nothing a caller can put in a query string (or a form) makes the API's pages answer 5xx.

Hypothesis builds query strings from the parameters the views read (``page``, ``account``,
``format``, the schema's ``lang`` and ``version``, the login page's ``next``) and from
unknown ones, with hostile values: NUL bytes, text of any script, values of thousands of
characters, numbers out of every range, broken percent-encoding. Each goes to every endpoint an
account owner meets, as an anonymous caller, with a session and with a token. Query strings
arrive percent-encoded, so a NUL byte in one does reach the view (a NUL in a header does not:
gunicorn refuses such a request).
"""

from datetime import timedelta
from urllib.parse import quote

import pytest
from django.test import Client
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token

from billing.tests.factories import InvoiceFactory, OwedEmailFactory, StripeEventFactory, SubscriptionFactory
from provisioning.tests.factories import AccountFactory, MembershipFactory

pytestmark = pytest.mark.django_db

GET_ENDPOINTS = [
    "/api/billing/invoices/",
    "/api/billing/subscription/",
    "/api/schema/",
    "/api/docs/",
    "/api/auth/token/",
    "/accounts/login/",
    "/billing/",
    "/healthz",
]
POST_ENDPOINTS = ["/api/auth/token/", "/accounts/login/"]
KNOWN_PARAMS = ["page", "account", "format", "lang", "version", "next", "username", "password", "page_size"]

HOSTILE_LITERALS = [
    "",
    "\x00",
    "1\x00",
    "abc",
    "0",
    "-1",
    "999999",
    "9" * 5000,
    "1e400",
    "1.5",
    "²",
    "١٢",
    "last",
    "json",
    "openapi-json",
    "yaml",
    "api",
    "html",
    "../../etc/passwd",
    "https://evil.example/",
    "/accounts/login/",
    "//evil.example/",
    "' OR 1=1 --",
    "__proto__",
]
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_LITERALS),
    st.text(max_size=40),
    st.text(min_size=1000, max_size=6000, alphabet=st.characters(codec="utf-8")),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
KEYS = st.one_of(st.sampled_from(KNOWN_PARAMS), st.text(max_size=20), st.sampled_from(["page__gt", "a[b]", "%", "&"]))
# Percent-escapes that decode to no valid UTF-8, and stray ``%``, which Django decodes leniently.
RAW_TAILS = st.sampled_from(["", "&page=%ff%fe", "&account=%c0%80", "&%zz=1", "&page=%", "&&&=", "&page=1&page=abc"])


@st.composite
def query_strings(draw) -> str:
    pairs = draw(st.lists(st.tuples(KEYS, HOSTILE_VALUES), max_size=4))
    encoded = "&".join(f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in pairs)
    return encoded + draw(RAW_TAILS)


@pytest.fixture
def callers(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    account = AccountFactory()
    subscription = SubscriptionFactory(account=account)
    for i in range(3):
        InvoiceFactory(subscription=subscription, stripe_created=timezone.now() - timedelta(days=i))
    OwedEmailFactory(invoice=InvoiceFactory(account=account))
    StripeEventFactory(status="failed")
    owner = MembershipFactory(account=account, role="owner", user__password="pw-for-hostile-tests").user
    member = MembershipFactory(account=account, role="member").user

    session, member_session = Client(raise_request_exception=False), Client(raise_request_exception=False)
    assert session.login(username=owner.username, password="pw-for-hostile-tests")
    member_session.force_login(member)
    token = Client(
        raise_request_exception=False, headers={"Authorization": f"Token {Token.objects.create(user=owner).key}"}
    )
    return {
        "anonymous": Client(raise_request_exception=False),
        "session": session,
        "member": member_session,
        "token": token,
    }


def test_every_known_parameter_with_every_hostile_literal(callers):
    """The sweep Hypothesis might miss in a few hundred examples: each literal in each parameter."""
    for path in GET_ENDPOINTS:
        for key in KNOWN_PARAMS:
            for i, value in enumerate(HOSTILE_LITERALS):
                caller = ("session", "token")[i % 2]  # both ways in reach the same views
                response = callers[caller].get(path, {key: value})
                assert response.status_code < 500, (path, caller, key, value[:20], response.status_code)


def test_hostile_query_strings_never_answer_5xx(callers):
    @hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        path=st.sampled_from(GET_ENDPOINTS),
        caller=st.sampled_from(sorted(callers)),
        query=query_strings(),
    )
    def check(path, caller, query):
        response = callers[caller].get(f"{path}?{query}")
        assert response.status_code < 500, (path, caller, query, response.status_code)

    check()


def test_hostile_forms_never_answer_5xx(callers):
    @hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        path=st.sampled_from(POST_ENDPOINTS),
        caller=st.sampled_from(sorted(callers)),
        query=query_strings(),
        form=st.dictionaries(KEYS, HOSTILE_VALUES, max_size=4),
        as_json=st.booleans(),
    )
    def check(path, caller, query, form, as_json):
        client = callers[caller]
        if as_json:
            response = client.post(f"{path}?{query}", form, content_type="application/json")
        else:
            response = client.post(f"{path}?{query}", form)
        assert response.status_code < 500, (path, caller, query, form, response.status_code)
        assert response.status_code != 200 or path != "/api/auth/token/", "no hostile form is a valid login"

    check()


@pytest.mark.parametrize(
    "query, status",
    [
        ("page=abc", 404),
        ("page=999999", 404),
        ("page=0", 404),
        ("page=-1", 404),
        ("page=" + "9" * 5000, 404),
        ("page=last", 200),
        ("account=abc", 400),
        ("account=" + "9" * 5000, 400),
        ("account=99999999999999999999", 400),
        ("format=nope", 404),
        ("unknown=1&page_size=100000", 200),
        # A NUL byte anywhere in a query string: 400 from config.middleware, before any view.
        ("page=%00", 400),
        ("account=1%00", 400),
        ("unknown=%00", 400),
    ],
)
def test_the_answers_to_known_hostile_values(callers, query, status):
    response = callers["session"].get(f"/api/billing/invoices/?{query}")
    assert response.status_code == status

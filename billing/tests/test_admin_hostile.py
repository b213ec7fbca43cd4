"""Whatever a staff user types into an admin address, no list or page answers 5xx.

Every registered changelist (billing's, provisioning's, Django's users and groups) gets the query
strings that used to reach PostgreSQL and fail there (a NUL byte, a broken regular expression,
a date hierarchy past year 9999), then what hypothesis makes of field names, lookups, ``__``
chains, Django's own parameters (``q``, ``o``, ``p``, ``e``, ``_facets``, ``_to_field``) and
hostile values. Change, history and action pages get hostile ids and parameters too.

A list answers a parameter it cannot use by sending the browser to the whole list (302 to
``?e=1``, with a warning), and a NUL byte or a forbidden lookup with 400: both are fine, a 5xx
is not.
"""

from __future__ import annotations

from urllib.parse import quote as urlquote

import pytest
from django.contrib import admin
from django.contrib.admin.utils import quote
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token

from billing.tests.factories import (
    DisputeFactory,
    InvoiceFactory,
    InvoiceLineItemFactory,
    OwedEmailFactory,
    PaymentFactory,
    RefundFactory,
    RenewalFactory,
    StripeEventFactory,
    SubscriptionFactory,
)
from provisioning.tests.factories import EntitlementFactory, MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db

REGISTERED = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)
LISTS = [reverse(f"admin:{m._meta.app_label}_{m._meta.model_name}_changelist") for m, _ in REGISTERED]

LONG = "x" * 5000
# Query strings that answered 500 before, or could: (name, value) pairs, each tried on every list.
KNOWN_HOSTILE = [
    ("status__exact", "\x00"),
    ("q", "cus_\x00"),
    ("q", LONG),
    ("q", "a " * 2000),
    ("q", '"unbalanced'),
    ("type", LONG),
    ("status__exact", LONG),
    ("id__regex", "("),
    ("last_error__iregex", "[a-"),
    ("username__regex", "("),
    ("name__regex", "*"),
    ("created__year", "9999"),
    ("created__year", "99999999999999999999"),
    ("created__year", "2026"),
    ("created__month", "13"),
    ("starts_at__year", "9999"),
    ("starts_at__day", "0"),
    ("created__gte", "2026-02-30"),
    ("created__lt", "yesterday"),
    ("id__in", "1,abc"),
    ("id__range", "1"),
    ("pk", "abc"),
    ("account__id__exact", "abc"),
    ("account__memberships__user__password__startswith", "pbkdf2"),
    ("payload__data__object__customer", "cus_1"),
    ("__", "x"),
    ("unknown_field", "1"),
    ("livemode__exact", "maybe"),
    ("quantity__exact", "9" * 40),
    ("o", "99.-98.abc.--1"),
    ("o", "9" * 5000),
    ("p", "abc"),
    ("p", "-1"),
    ("p", "9" * 30),
    ("p", "9" * 5000),
    ("e", "1"),
    ("all", ""),
    ("_facets", "1"),
    ("_to_field", "password"),
    ("_popup", "1"),
    ("_changelist_filters", "status__exact=\x00"),
]


@pytest.fixture
def rows():
    """A row of every kind, so each list has something to show, filter and order."""
    subscription = SubscriptionFactory(trialing=True)
    invoice = InvoiceFactory(subscription=subscription)
    InvoiceLineItemFactory(invoice=invoice)
    RenewalFactory(subscription=subscription, stripe_invoice_id=invoice.stripe_id)
    payment = PaymentFactory(invoice=invoice)
    RefundFactory(payment_intent_id=payment.payment_intent_id)
    DisputeFactory(payment=payment)
    StripeEventFactory(object_id=invoice.stripe_id, status="failed")
    OwedEmailFactory(invoice=invoice)
    EntitlementFactory(account=subscription.account)
    MembershipFactory(account=subscription.account)
    Token.objects.create(user=UserFactory())


@pytest.fixture
def staff(client, rows):
    client.force_login(UserFactory(superuser=True))
    return client


def assert_answered(client, url: str, params=None) -> None:
    response = client.get(url, params or {})
    assert response.status_code < 500, (url, params)
    if response.status_code == 302 and response["Location"].endswith("?e=1"):
        landing = client.get(response["Location"])
        assert landing.status_code == 200, (url, params)
        assert b"cannot show" in landing.content  # the warning says why the whole list is shown


def test_known_hostile_query_strings_on_every_list(staff):
    for url in LISTS:
        for name, value in KNOWN_HOSTILE:
            assert_answered(staff, url, {name: value})


def test_a_nul_byte_is_refused_with_400_before_any_database(staff):
    for url in LISTS:
        assert staff.get(url, {"status__exact": "\x00"}).status_code == 400
        assert staff.get(f"{url}?q=%00").status_code == 400


def test_a_lookup_no_filter_offers_shows_the_whole_list_with_a_warning(staff):
    url = reverse("admin:billing_stripeevent_changelist")
    response = staff.get(url, {"last_error__regex": "("}, follow=True)
    assert response.status_code == 200 and response.redirect_chain[-1][0].endswith("?e=1")
    assert b"That address asked this list for something it cannot show" in response.content


# --- Whatever hypothesis makes of it ----------------------------------------------------------------

FIELD_NAMES = sorted({f.name for model, _ in REGISTERED for f in model._meta.get_fields()})
LOOKUPS = ["", "exact", "iexact", "in", "isnull", "regex", "iregex", "contains", "gte", "lt", "year", "month", "day"]
LOOKUPS += ["range", "date", "week_day", "startswith", "id", "pk", "id__exact", "search", "has_key", "0", ""]
DJANGO_PARAMETERS = ["q", "o", "p", "e", "all", "_facets", "_to_field", "_popup", "_changelist_filters"]

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
names = st.one_of(
    st.sampled_from(DJANGO_PARAMETERS),
    st.builds(
        lambda parts, lookup: "__".join([*parts, lookup] if lookup else parts),
        st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=3),
        st.sampled_from(LOOKUPS),
    ),
    text,
)
values = st.one_of(
    text,
    st.integers().map(str),
    st.dates().map(str),
    st.datetimes().map(str),
    st.sampled_from(["\x00", "(", "[", "*", "%", "\\", "'", '"', "9999", "-1", "0", "1e309", "NaN", LONG, "True"]),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(url=st.sampled_from(LISTS), params=st.dictionaries(names, values, min_size=1, max_size=4))
def test_no_query_string_makes_a_list_answer_5xx(staff, url, params):
    assert_answered(staff, url, params)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(url=st.sampled_from(LISTS), raw=st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=40)), max_size=4))
def test_no_raw_bytes_in_a_query_string_make_a_list_answer_5xx(staff, url, raw):
    """Bytes that are not UTF-8 (``%ff``), encoded by hand: what a browser's address bar may send."""
    query = "&".join(f"{urlquote(k)}={urlquote(v)}" for k, v in raw)
    assert staff.get(f"{url}?{query}").status_code < 500, query


# --- Pages of one row -------------------------------------------------------------------------------

BAD_IDS = ["abc", "-1", "9" * 30, "9" * 5000, "_5F", "evt_" + "x" * 300, "1_2F2", "%ff", "%00", "0"]


def test_hostile_ids_on_change_history_and_action_pages(staff):
    for model, model_admin in REGISTERED:
        info = f"admin/{model._meta.app_label}/{model._meta.model_name}"
        for bad in BAD_IDS:
            for page in ("change", "history", "delete", *getattr(model_admin, "support_actions", ())):
                response = staff.get(f"/{info}/{bad}/{page}/")
                assert response.status_code < 500, (info, bad, page)
            if hasattr(model_admin, "history_form_view"):
                row = model.objects.first()
                if row is not None:
                    response = staff.get(f"/{info}/{quote(row.pk)}/history/{bad}/")
                    assert response.status_code < 500, (info, bad, "history version")


# What a change page reads from its query string (the list's filters, to go back; popups).
ON_CHANGE_PAGES = [
    ("_changelist_filters", "status__exact=\x00"),
    ("_changelist_filters", "last_error__regex=("),
    ("_to_field", "password"),
    ("_popup", "1"),
    ("status__exact", "\x00"),
    ("p", "9" * 5000),
    ("q", LONG),
]


def test_hostile_query_strings_on_change_pages_and_autocomplete(staff):
    for model, _ in REGISTERED:
        row = model.objects.first()
        if row is None:  # e.g. no API token was made
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[quote(row.pk)])
        for name, value in ON_CHANGE_PAGES:
            assert staff.get(url, {name: value}).status_code < 500, (url, name, value)
    autocomplete = reverse("admin:autocomplete")
    for term in ("\x00", LONG, "(", "cus_"):
        for app_label, model_name, field_name in (
            ("provisioning", "membership", "user"),
            ("provisioning", "membership", "account"),
        ):
            params = {"app_label": app_label, "model_name": model_name, "field_name": field_name, "term": term}
            assert staff.get(autocomplete, params).status_code < 500, params

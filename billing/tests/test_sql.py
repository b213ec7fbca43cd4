"""``billing.sql``: the hand-written statements do what the ORM and django-simple-history would.

Each write that carries its history row is compared with the same change made the ORM's way
(``Model.save()``, whose ``post_save`` receiver makes simple-history's own row): the rows
written, and their history rows, must be equal field by field (but the ids and times of the
history rows themselves).
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from simple_history.models import HistoricalRecords

from billing import sql
from billing.models import Invoice, Renewal, Subscription
from billing.tests.factories import InvoiceFactory, RenewalFactory, SubscriptionFactory
from provisioning.models import Account
from provisioning.tests.factories import AccountFactory, EntitlementFactory

pytestmark = pytest.mark.django_db

HISTORY_OWN = {"history_id", "history_date"}


def history_values(model, pk) -> list[dict]:
    """The history rows of one row, oldest first, without their own id and time."""
    rows = model.history.filter(id=pk).order_by("history_date", "history_id").values()
    return [{k: v for k, v in row.items() if k not in HISTORY_OWN} for row in rows]


def row_values(obj) -> dict:
    return {
        k: v
        for k, v in type(obj).objects.filter(pk=obj.pk).values()[0].items()
        if k not in ("id", "created_at", "updated_at")
    }


def comparable(rows: list[dict], pk) -> list[dict]:
    return [{**row, "id": None, "created_at": None, "updated_at": None} for row in rows]


def test_create_with_history_writes_what_save_and_simple_history_write():
    account = AccountFactory()
    at = datetime(2026, 3, 1, 12, tzinfo=UTC)
    values = dict(
        account=account,
        status="active",
        quantity=3,
        current_period_start=at,
        current_period_end=at + timedelta(days=30),
    )
    by_orm = Subscription(stripe_id="sub_by_orm", **values)
    by_orm._change_reason = "customer.subscription.created"
    by_orm.save()
    by_sql = Subscription(stripe_id="sub_by_sql", **values)

    assert sql.create_with_history(by_sql, reason="customer.subscription.created") is True

    assert by_sql.pk is not None and not by_sql._state.adding
    assert {**row_values(by_sql), "stripe_id": None} == {**row_values(by_orm), "stripe_id": None}
    orm_history, sql_history = history_values(Subscription, by_orm.pk), history_values(Subscription, by_sql.pk)
    assert len(sql_history) == 1 and sql_history[0]["history_type"] == "+"
    for rows in (orm_history, sql_history):
        for row in rows:
            row["stripe_id"] = None
    assert comparable(sql_history, by_sql.pk) == comparable(orm_history, by_orm.pk)


def test_save_with_history_writes_what_save_and_simple_history_write():
    by_orm, by_sql = InvoiceFactory(status="open", number="A-1"), InvoiceFactory(status="open", number="A-1")
    for invoice in (by_orm, by_sql):
        invoice.status, invoice.amount_paid, invoice.number = "paid", invoice.total, "B-2"
    by_orm._change_reason = "invoice.paid"
    by_orm.save(update_fields=["status", "amount_paid", "number", "updated_at"])

    sql.save_with_history(by_sql, ["status", "amount_paid", "number"], reason="invoice.paid")

    differs = ("stripe_id", "account_id", "hosted_invoice_url", "invoice_pdf", "customer_email")

    def same(values):
        return {k: v for k, v in values.items() if k not in differs}

    assert same(row_values(by_sql)) == same(row_values(by_orm))
    orm_latest, sql_latest = history_values(Invoice, by_orm.pk)[-1], history_values(Invoice, by_sql.pk)[-1]
    assert sql_latest["history_type"] == orm_latest["history_type"] == "~"
    assert sql_latest["history_change_reason"] == orm_latest["history_change_reason"] == "invoice.paid"
    assert same(comparable([sql_latest], 0)[0]) == same(comparable([orm_latest], 0)[0])
    assert Invoice.objects.get(pk=by_sql.pk).updated_at > by_sql.created_at  # auto_now written too


def test_a_history_row_names_the_signed_in_user_as_simple_history_would(rf):
    user = get_user_model().objects.create_user("support")
    request = rf.post("/admin/")
    request.user = user
    HistoricalRecords.context.request = request
    try:
        renewal = RenewalFactory()
        renewal.stripe_invoice_id = "in_support_fix"
        sql.save_with_history(renewal, ["stripe_invoice_id"], reason="linked by support")
    finally:
        del HistoricalRecords.context.request
    latest = renewal.history.latest("history_date")
    assert (latest.history_user_id, latest.history_change_reason) == (user.pk, "linked by support")


def test_create_with_history_unless_exists_writes_nothing_for_a_row_that_exists():
    account = AccountFactory(stripe_customer_id="cus_exists")
    twin = Account(name="twin", stripe_customer_id="cus_exists")

    assert sql.create_with_history(twin, reason=None, unless_exists=["stripe_customer_id"]) is False

    assert twin.pk is None and Account.objects.filter(stripe_customer_id="cus_exists").count() == 1
    assert account.history.count() == 1  # the factory's own, nothing for the skipped row


def test_the_relink_update_moves_processed_renewals_and_marks_one_processed_with_its_reason():
    sub = SubscriptionFactory()
    start = sub.current_period_start
    trial = EntitlementFactory(
        account=sub.account,
        stripe_subscription_id=sub.stripe_id,
        kind="trial",
        starts_at=start - timedelta(days=14),
        expires_at=start,
    )
    paid = EntitlementFactory(
        account=sub.account,
        stripe_subscription_id=sub.stripe_id,
        kind="paid",
        starts_at=start,
        expires_at=start + timedelta(days=30),
    )
    renewal = RenewalFactory(subscription=sub, effective_date=start, processed_at=None)
    untouched = RenewalFactory(subscription=sub, effective_date=start + timedelta(days=30), processed_at=None)
    processed_at = start + timedelta(hours=1)

    sql.relink_renewal_entitlements(sub, processing=(renewal.pk, processed_at, "processed by in_1"))

    renewal.refresh_from_db()
    assert (renewal.from_entitlement_id, renewal.to_entitlement_id, renewal.processed_at) == (
        trial.pk,
        paid.pk,
        processed_at,
    )
    latest = renewal.history.latest("history_date")
    assert (latest.history_change_reason, latest.processed_at, latest.to_entitlement_id) == (
        "processed by in_1",
        processed_at,
        paid.pk,
    )
    assert untouched.history.count() == 1  # not processed, not moved: no write, no history row
    assert Renewal.objects.get(pk=untouched.pk).from_entitlement_id is None

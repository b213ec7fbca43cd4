"""``billing.sql``'s deferred writes: a handler's write that reads nothing back goes out with
its next statement, and nothing can tell, because every statement that could see the write
is sent after it."""
import datetime

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from billing import sql
from billing.models import Invoice, InvoiceLineItem, Subscription
from provisioning.models import Account

pytestmark = pytest.mark.django_db

AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


@pytest.fixture
def account():
    return Account.objects.create(name="Deferred", stripe_customer_id="cus_deferred")


def _rename(account, name):
    sql.table(Account).update(account, {"name": name}, reason="test")


def test_a_write_waits_and_goes_out_with_the_next_statement(account):
    with CaptureQueriesContext(connection) as captured, sql.deferred_writes():
        _rename(account, "Renamed")
        assert captured.captured_queries == []  # not sent yet
        assert sql.one(f"SELECT count(*) FROM {sql.table(Subscription)}") == (0,)
        assert len(captured.captured_queries) == 1
    statement = captured.captured_queries[0]["sql"]
    assert statement.startswith('WITH _deferred0 AS (UPDATE "provisioning_account" SET "name" = \'Renamed\'')
    assert "_deferred0_history AS (INSERT INTO \"provisioning_historicalaccount\"" in statement
    account.refresh_from_db()
    assert account.name == "Renamed"
    assert account.history.latest("history_date").history_change_reason == "test"


def test_a_statement_that_names_the_written_table_is_sent_after_the_write_and_sees_it(account):
    with CaptureQueriesContext(connection) as captured, sql.deferred_writes():
        _rename(account, "Seen")
        assert sql.one(f"SELECT name FROM {sql.table(Account)} WHERE id = %s", [account.pk]) == ("Seen",)
    first, second = (q["sql"] for q in captured.captured_queries)
    assert first.startswith("WITH _deferred0 AS (UPDATE") and first.endswith("SELECT 1")
    assert second.startswith('SELECT name FROM "provisioning_account"')


def test_a_table_whose_name_only_contains_the_written_tables_name_does_not_flush(account):
    invoice = Invoice.objects.create(stripe_id="in_deferred", currency="usd", account=account)
    with CaptureQueriesContext(connection) as captured, sql.deferred_writes():
        sql.table(Invoice).update(invoice, {"amount_due": 5})
        sql.rows(f"SELECT id FROM {sql.table(InvoiceLineItem)} WHERE invoice_id = %s", [invoice.pk])
    assert len(captured.captured_queries) == 1  # billing_invoicelineitem is not billing_invoice
    invoice.refresh_from_db()
    assert invoice.amount_due == 5


def test_an_orm_query_sends_the_waiting_writes_first(account):
    with sql.deferred_writes():
        _rename(account, "ORM sees it")
        assert Account.objects.get(pk=account.pk).name == "ORM sees it"


def test_leaving_the_block_sends_what_still_waits(account):
    with CaptureQueriesContext(connection) as captured:
        with sql.deferred_writes():
            _rename(account, "Flushed at the end")
            assert captured.captured_queries == []
        assert len(captured.captured_queries) == 1
    account.refresh_from_db()
    assert account.name == "Flushed at the end"


def test_leaving_the_block_by_an_exception_drops_the_waiting_writes(account):
    with pytest.raises(RuntimeError), transaction.atomic():
        with sql.deferred_writes():
            _rename(account, "Never written")
            raise RuntimeError("handler failed")
    account.refresh_from_db()
    assert account.name == "Deferred"
    assert not account.history.filter(history_change_reason="test").exists()


def test_a_savepoint_sends_the_waiting_writes_before_it(account):
    """A write queued before a savepoint must not be undone by rolling back to that savepoint."""
    with transaction.atomic(), sql.deferred_writes():
        _rename(account, "Before the savepoint")
        try:
            with transaction.atomic():
                sql.one("SELECT 1")  # would carry the write, were it still waiting
                raise RuntimeError("rolled back to the savepoint")
        except RuntimeError:
            pass
    account.refresh_from_db()
    assert account.name == "Before the savepoint"


def test_outside_the_block_writes_go_out_at_once(account):
    with CaptureQueriesContext(connection) as captured:
        _rename(account, "At once")
        assert len(captured.captured_queries) == 1
    assert captured.captured_queries[0]["sql"].startswith('WITH written AS (UPDATE "provisioning_account"')

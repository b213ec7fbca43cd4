"""Timestamps read through psycopg's C loader are the values Django's own loader gives."""
import datetime

import psycopg
import pytest
from django.db import connection

from billing import db
from billing.models import StripeEvent

pytestmark = pytest.mark.django_db


def _loader():
    return connection.connection.adapters.get_loader(
        psycopg.adapters.types["timestamptz"].oid, psycopg.pq.Format.TEXT
    )


def test_a_utc_connection_reads_timestamps_with_the_c_loader():
    connection.ensure_connection()
    assert psycopg.pq.__impl__ == "binary"  # requirements pin psycopg[binary]
    assert db._LOADER and _loader() is db._LOADER  # not Django's pure-Python SpecificTzLoader


@pytest.mark.parametrize("value", [
    datetime.datetime(2026, 3, 29, 1, 30, 0, 123456, tzinfo=datetime.timezone.utc),
    datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc),
    datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.timezone.utc),
    datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-7))),
])
def test_timestamps_come_back_aware_in_utc_and_equal_to_what_was_written(value):
    StripeEvent.objects.create(id="evt_ts", type="x", created=value, payload={})

    with connection.cursor() as cursor:  # raw SQL: the loader, not the ORM's converters
        cursor.execute("SELECT created FROM billing_stripeevent WHERE id = %s", ["evt_ts"])
        (read,) = cursor.fetchone()
    orm = StripeEvent.objects.get(pk="evt_ts").created

    assert read == value == orm
    assert read.tzinfo is datetime.timezone.utc and orm.tzinfo is datetime.timezone.utc


def test_the_hot_paths_statements_share_one_cursor_until_the_connection_is_replaced():
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from billing import sql

    first = sql.cursor()
    assert sql.cursor() is first
    assert sql.one("SELECT 41 + 1") == (42,) and sql.rows("SELECT 1 UNION ALL SELECT 2") == [(1,), (2,)]
    assert sql.cursor() is first

    with CaptureQueriesContext(connection) as captured:  # logged statements go through a debug cursor
        assert sql.cursor() is not first
        sql.execute("SELECT 7")
    assert [q["sql"] for q in captured.captured_queries] == ["SELECT 7"]

    wrapper = connections["default"]
    wrapper._billing_cursor = (object(), first)  # kept for a connection since replaced (a reconnect)
    replaced = sql.cursor()
    assert replaced is not first and sql.one("SELECT 3") == (3,)
    assert sql.cursor() is replaced and wrapper._billing_cursor[0] is wrapper.connection


def test_each_thread_gets_the_cursor_of_its_own_connection():
    import threading

    from django.db import connections

    from billing import sql

    mine = sql.cursor()
    seen = {}

    def other():
        try:
            seen["cursor"] = sql.cursor()
            seen["pid"] = sql.one("SELECT pg_backend_pid()")[0]
        finally:
            connections.close_all()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["cursor"] is not mine
    assert seen["pid"] != sql.one("SELECT pg_backend_pid()")[0]

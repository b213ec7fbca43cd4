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

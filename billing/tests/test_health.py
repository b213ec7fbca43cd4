"""``GET /healthz``: its figures from real rows, 503 on a real database failure, cheap on a big inbox.

The failures are real ones: the connection pointed at a port where nothing listens, and a
backend terminated by PostgreSQL under an open connection. Nothing in the view is patched.
"""

import re
import socket
from datetime import timedelta

import factory
import pytest
from django.db import close_old_connections, connection, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import health
from billing.models import OwedEmail, StripeEvent
from billing.tests.factories import InvoiceFactory, OwedEmailFactory, StripeEventFactory

FIELDS = {"status", "database", "failed_events", "oldest_unprocessed_event_age_seconds", "overdue_owed_emails"}


def healthz(client=None):
    response = (client or Client()).get("/healthz")
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"]
    return response


def owed_email(status: str, age: timedelta) -> OwedEmail:
    owed = OwedEmailFactory(status=status)
    OwedEmail.objects.filter(pk=owed.pk).update(created_at=timezone.now() - age)  # auto_now_add on create
    return owed


@pytest.mark.django_db
def test_an_empty_inbox_is_healthy():
    response = healthz()
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "failed_events": 0,
        "oldest_unprocessed_event_age_seconds": None,
        "overdue_owed_emails": 0,
    }


@pytest.mark.django_db
def test_the_figures_count_real_rows(settings):
    settings.BILLING_OUTBOX_SWEEP_INTERVAL = 30
    now = timezone.now()
    StripeEventFactory.create_batch(2, status=StripeEvent.Status.FAILED, created=now - timedelta(days=2))
    StripeEventFactory(status=StripeEvent.Status.PROCESSED, created=now - timedelta(days=9))
    StripeEventFactory(status=StripeEvent.Status.IGNORED, created=now - timedelta(days=8))
    StripeEventFactory(status=StripeEvent.Status.RECEIVED, created=now - timedelta(seconds=600))
    StripeEventFactory(status=StripeEvent.Status.RECEIVED, created=now - timedelta(seconds=5))
    owed_email(OwedEmail.Status.PENDING, timedelta(seconds=90))  # the sweep should have sent it
    owed_email(OwedEmail.Status.PENDING, timedelta(seconds=120))
    owed_email(OwedEmail.Status.PENDING, timedelta(seconds=3))  # the on-commit task's to send
    owed_email(OwedEmail.Status.SENT, timedelta(hours=1))
    owed_email(OwedEmail.Status.FAILED, timedelta(hours=1))

    body = healthz().json()

    assert set(body) == FIELDS
    assert (body["status"], body["database"]) == ("ok", "ok")
    assert body["failed_events"] == 2
    assert 600 <= body["oldest_unprocessed_event_age_seconds"] < 630
    assert body["overdue_owed_emails"] == 2


@pytest.mark.django_db
def test_the_sweep_interval_decides_what_is_overdue(settings):
    owed_email(OwedEmail.Status.PENDING, timedelta(seconds=90))
    settings.BILLING_OUTBOX_SWEEP_INTERVAL = 120
    assert healthz().json()["overdue_owed_emails"] == 0
    settings.BILLING_OUTBOX_SWEEP_INTERVAL = 60
    assert healthz().json()["overdue_owed_emails"] == 1


@pytest.mark.django_db
def test_anyone_may_ask_and_the_answer_names_no_secret(settings):
    settings.STRIPE_API_KEY = "sk_test_health_secret_51"
    settings.STRIPE_WEBHOOK_SECRETS = ["whsec_health_secret_52"]
    StripeEventFactory(status=StripeEvent.Status.FAILED, last_error="KeyError: cus_secretcustomer")
    text = healthz(Client()).content.decode()
    for secret in ("sk_test_", "whsec_", "cus_", connection.settings_dict["NAME"], settings.SECRET_KEY):
        assert secret not in text
    assert Client().post("/healthz").status_code == 405
    assert Client().head("/healthz").status_code == 200


# --- When the database does not answer -------------------------------------------------------------


def closed_port() -> int:
    """A local port where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_503_when_the_database_is_unreachable(caplog):
    port = closed_port()
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(port))
    try:
        response = healthz()
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)

    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "unreachable"}
    assert "health check: the database did not answer (OperationalError)" in caplog.text
    assert str(port) not in caplog.text and str(port) not in response.content.decode()
    assert healthz().status_code == 200  # the same process, back on the real database


@pytest.mark.django_db(transaction=True)
def test_503_when_postgresql_drops_the_connection_then_200_on_a_new_one():
    client = Client()
    assert healthz(client).status_code == 200
    backend = connection.connection.info.backend_pid  # the web request's connection, kept open
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
            assert cursor.fetchone() == (True,)
    finally:
        other.close()

    try:
        assert healthz(client).status_code == 503
        # What a WSGI server's end of request runs (the test client leaves it out): Django
        # drops the connection that failed, and the next request opens a new one.
        close_old_connections()
        assert healthz(client).status_code == 200
        assert connection.connection.info.backend_pid != backend
    finally:
        connection.close()  # whatever happened, the test database is flushed on a live connection


# --- Cheap on a big inbox --------------------------------------------------------------------------


def plan_of(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.mark.django_db
def test_each_figure_is_an_index_scan_on_a_realistic_inbox():
    """With the inbox as it is in production (nearly every event processed or ignored, a handful
    failed or waiting) and fresh statistics, PostgreSQL answers each figure from an index."""
    now = timezone.now()
    bulk = dict(created=factory.LazyFunction(lambda: now - timedelta(days=30)), payload={})
    StripeEvent.objects.bulk_create(
        StripeEventFactory.build_batch(20_000, status=StripeEvent.Status.PROCESSED, **bulk), batch_size=5000
    )
    StripeEvent.objects.bulk_create(
        StripeEventFactory.build_batch(3000, status=StripeEvent.Status.IGNORED, **bulk), batch_size=5000
    )
    StripeEventFactory.create_batch(3, status=StripeEvent.Status.FAILED)
    StripeEventFactory.create_batch(2, status=StripeEvent.Status.RECEIVED)
    invoice = InvoiceFactory()
    OwedEmail.objects.bulk_create(
        OwedEmailFactory.build_batch(
            5000,
            invoice=invoice,
            status=OwedEmail.Status.SENT,
            key=factory.Sequence(lambda n: f"receipt:bulk{n}"),
        )
    )
    owed_email(OwedEmail.Status.PENDING, timedelta(minutes=5))
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {StripeEvent._meta.db_table}")
        cursor.execute(f"ANALYZE {OwedEmail._meta.db_table}")

    with CaptureQueriesContext(connection) as queries:
        figures = health.status()
    assert (figures["failed_events"], figures["overdue_owed_emails"]) == (3, 1)
    assert len(queries) == 3

    plans = [plan_of(query["sql"]) for query in queries]
    events, owed = [p for p in plans if "billing_stripeevent" in p], [p for p in plans if "billing_owedemail" in p]
    assert len(events) == 2 and len(owed) == 1, plans
    for plan in events:
        assert "Seq Scan" not in plan, plan
        assert "stripeevent_unsettled" in plan, plan
    assert "Seq Scan" not in owed[0], owed[0]
    assert re.search(r"Index.* on billing_owedemail", owed[0]), owed[0]


@pytest.mark.django_db
def test_the_plan_check_would_see_a_seq_scan():
    """The assertion above is not vacuous: a figure the indexes cannot answer is a Seq Scan."""
    with CaptureQueriesContext(connection) as queries:
        StripeEvent.objects.filter(attempts__gt=3).count()
    assert "Seq Scan on billing_stripeevent" in plan_of(queries[0]["sql"])

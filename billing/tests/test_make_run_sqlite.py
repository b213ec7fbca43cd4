"""``make run`` works: the app on SQLite, as a newcomer starts it, applies the simulator's lifecycles.

Every other test runs on PostgreSQL, where the guarantees are proven. The webhook's hot path is
hand-written SQL (``billing.sql``) with a portable form for other databases; this test is what
proves that form: a real ``manage.py migrate`` and ``runserver`` on a SQLite file, in their own
processes with ``make run``'s settings (no broker: tasks run in-process after commit), fed
shuffled, duplicated, signed deliveries over HTTP, then the facts each lifecycle implies read
back from the file.
"""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from billing.simulation.delivery import arrange, deliver
from billing.simulation.lifecycles import generate_lifecycles

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_make_run_sqlite"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _utc(text: str) -> int:
    return int(datetime.fromisoformat(text + "+00:00").timestamp())


@pytest.fixture
def sqlite_server(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "DATABASE_URL")},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "DJANGO_DEBUG": "true",
        "STRIPE_WEBHOOK_SECRETS": SECRET,
        "EMAIL_URL": "consolemail://",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/billing/stripe/webhook/", tmp_path / "db.sqlite3"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_lifecycles_delivered_shuffled_and_twice_end_in_the_facts_they_imply(sqlite_server):
    url, database = sqlite_server
    lifecycles = generate_lifecycles(customers=10, seed=77)
    events = arrange([lc.events for lc in lifecycles], rng=random.Random(77), shuffle=True, duplicates=0.3)
    report = deliver(url, events, secret=SECRET, max_rounds=12)
    assert report.ok, report
    assert set(report.non_2xx) <= {500}, report  # only "prerequisite missing", retried until applied

    db = sqlite3.connect(database)
    statuses = dict(db.execute("SELECT status, count(*) FROM billing_stripeevent GROUP BY status").fetchall())
    assert set(statuses) <= {"processed", "ignored"}, statuses
    assert sum(statuses.values()) == len({e["id"] for e in events})
    for lc in lifecycles:
        expected = lc.expected
        if expected.subscription_id:
            status, quantity = db.execute(
                "SELECT status, quantity FROM billing_subscription WHERE stripe_id = ?", [expected.subscription_id]
            ).fetchone()
            assert (status, quantity) == (expected.final_status, expected.final_quantity), lc.scenario
            paid = db.execute(
                "SELECT starts_at, expires_at, seats FROM provisioning_entitlement"
                " WHERE stripe_subscription_id = ? AND kind = 'paid' ORDER BY starts_at",
                [expected.subscription_id],
            ).fetchall()
            assert [(_utc(s), _utc(e), seats) for s, e, seats in paid] == [
                (p.start, p.end, p.quantity) for p in expected.paid_periods
            ], lc.scenario
            linked = dict(
                db.execute(
                    "SELECT r.stripe_invoice_id, r.processed_at IS NOT NULL FROM billing_renewal r"
                    " JOIN billing_subscription s ON s.id = r.subscription_id WHERE s.stripe_id = ?"
                    " AND r.stripe_invoice_id IS NOT NULL",
                    [expected.subscription_id],
                ).fetchall()
            )
            renewal_invoices = {p.invoice_id for p in expected.paid_periods[1 if not expected.trial else 0 :]}
            assert renewal_invoices <= set(linked) and all(linked[i] for i in renewal_invoices), lc.scenario
        owed = {key for (key,) in db.execute("SELECT key FROM billing_owedemail WHERE kind = 'receipt'")}
        assert {f"receipt:{i}" for i in expected.receipt_invoice_ids} <= owed, lc.scenario
        for invoice_id, amount in expected.refunded.items():
            assert db.execute(
                "SELECT amount_refunded FROM billing_invoice WHERE stripe_id = ?", [invoice_id]
            ).fetchone() == (amount,)
    # Every write of the hot path left its history row, in Django's own datetime format.
    (history_date,) = db.execute("SELECT max(history_date) FROM billing_historicalsubscription").fetchone()
    assert datetime.fromisoformat(history_date)
    assert (
        db.execute("SELECT count(*) FROM billing_historicalinvoice").fetchone()[0]
        >= db.execute("SELECT count(*) FROM billing_invoice").fetchone()[0]
    )

"""``make run`` works: the app on SQLite, as a newcomer starts it, applies the simulator's lifecycles.

Every other test runs on PostgreSQL, where the guarantees are proven. The webhook's hot path is
hand-written SQL (``billing.sql``) with a portable form for other databases; this test is what
proves that form: the real ``make run`` (``migrate`` and ``runserver`` on a SQLite file, no
broker: tasks run in-process after commit), fed shuffled, duplicated, signed deliveries over
HTTP, then the facts each lifecycle implies read back from the file.

``make run`` runs in a copy of the repository, so that the ``.env`` and ``db.sqlite3`` it writes
are the copy's, from an empty environment as a new shell has (``env -i``); it skips only the
installation, the copy uses this checkout's ``.venv``. README.rst's own commands then run in
other empty environments: they must work as written, with nothing but what ``make run`` left.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from billing.simulation.delivery import arrange, deliver
from billing.simulation.lifecycles import generate_lifecycles

ROOT = Path(__file__).resolve().parents[2]
DEV_SECRET = "whsec_dev_secret"  # what make run writes to .env as STRIPE_WEBHOOK_SECRETS
README_URL = "http://127.0.0.1:8000/"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _utc(text: str) -> int:
    return int(datetime.fromisoformat(text + "+00:00").timestamp())


def new_shell(home: Path, **extra: str) -> dict:
    """The environment of a new shell started with ``env -i HOME=... PATH=/usr/bin:/bin``."""
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", **extra}


def readme_commands() -> list[str]:
    """Every ``.venv/bin/python manage.py ...`` command of README.rst, continuation lines joined."""
    lines = (ROOT / "README.rst").read_text().splitlines()
    commands = []
    for number, line in enumerate(lines):
        commands += re.findall(r"``(\.venv/bin/python manage\.py [^`]+)``", line)
        if line.strip().startswith(".venv/bin/python manage.py "):
            command = line.strip()
            while command.endswith("\\"):
                number += 1
                command = command[:-1].rstrip() + " " + lines[number].strip()
            commands.append(command)
    return commands


def readme_command(name: str) -> str:
    """README.rst's (first) command running ``manage.py name``."""
    return next(c for c in readme_commands() if c.split()[2] == name)


class MadeRun:
    """A ``make run`` serving a copy of the repository; ``shell`` runs a command in a new shell there."""

    def __init__(self, root: Path, port: int, log: Path, home: Path):
        self.root, self.port, self.log, self.home = root, port, log, home
        self.webhook_url = f"http://127.0.0.1:{port}/billing/stripe/webhook/"
        self.database = root / "db.sqlite3"

    def shell(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command = command.replace(README_URL, f"http://127.0.0.1:{self.port}/")
        return subprocess.run(
            ["/bin/bash", "-c", command],
            cwd=self.root,
            env=new_shell(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def server_log(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("make_run")
    root = base / "repo"
    shutil.copytree(
        ROOT,
        root,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".hypothesis", "db.sqlite3", ".env", ".env.tmp", "staticfiles", "results"
        ),
    )
    (root / ".venv").symlink_to(ROOT / ".venv")
    home = base / "home"
    home.mkdir()
    port = _free_port()
    log = base / "server.log"
    with open(log, "w") as out:
        # STAMP is the installation's target: named and marked old (-o), so make never installs
        # into the shared .venv; everything else is `make run` as README.rst says.
        server = subprocess.Popen(
            ["make", "-o", ".venv/bin/python", "run", "STAMP=.venv/bin/python"],
            cwd=root,
            env=new_shell(home, PORT=f"127.0.0.1:{port}"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: make, runserver and its reloader child
        )
    made = MadeRun(root, port, log, home)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, made.server_log()
                assert time.monotonic() < deadline, made.server_log()
                time.sleep(0.2)
        yield made
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_lifecycles_delivered_shuffled_and_twice_end_in_the_facts_they_imply(make_run):
    lifecycles = generate_lifecycles(customers=10, seed=77)
    events = arrange([lc.events for lc in lifecycles], rng=random.Random(77), shuffle=True, duplicates=0.3)
    report = deliver(make_run.webhook_url, events, secret=DEV_SECRET, max_rounds=12)
    assert report.ok, report
    assert set(report.non_2xx) == {500}, report  # only "prerequisite missing", retried until applied

    db = sqlite3.connect(make_run.database)
    ids = sorted({e["id"] for e in events})
    statuses = dict(
        db.execute(
            f"SELECT status, count(*) FROM billing_stripeevent WHERE id IN ({','.join('?' * len(ids))}) GROUP BY status",
            ids,
        ).fetchall()
    )
    assert set(statuses) <= {"processed", "ignored"}, statuses
    assert sum(statuses.values()) == len(ids)
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
    # An expected retry is one warning with the event's id; no error, no traceback, and no
    # broker warning, as there is no broker.
    log = make_run.server_log()
    retried = [line for line in log.splitlines() if "not applied yet, to be retried" in line]
    assert len(retried) >= report.non_2xx[500] and all(re.search(r" WARNING .* evt_\w+ ", line) for line in retried)
    assert " ERROR " not in log and "Traceback" not in log and "Internal Server Error" not in log, log[-3000:]
    assert "kombu" not in log, log[-3000:]


def test_readme_commands_work_in_a_new_shell_after_make_run(make_run):
    # What make run left: a private, git-ignored .env with the development settings.
    dot_env = make_run.root / ".env"
    settings = dict(line.split("=", 1) for line in dot_env.read_text().splitlines() if not line.startswith("#"))
    assert settings["DJANGO_DEBUG"] == "true" and settings["STRIPE_WEBHOOK_SECRETS"] == DEV_SECRET
    assert len(settings["DJANGO_SECRET_KEY"]) >= 50
    assert dot_env.stat().st_mode & 0o077 == 0
    assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", ".env"]).returncode == 0
    # Without it, a new shell has nothing to run a command with (so it is what makes them work).
    dot_env.rename(dot_env.with_name("env.saved"))
    try:
        bare = make_run.shell(".venv/bin/python manage.py check")
    finally:
        dot_env.with_name("env.saved").rename(dot_env)
    assert bare.returncode != 0 and "DJANGO_SECRET_KEY" in bare.stderr

    simulate = make_run.shell(readme_command("simulate_stripe_events"))
    assert simulate.returncode == 0, simulate.stderr[-3000:]
    assert re.search(r"All \d+ deliveries answered 2xx", simulate.stdout), simulate.stdout
    now = time.time()

    # No TTY here: the README's createsuperuser, with the answers it would prompt for.
    superuser = make_run.shell(
        readme_command("createsuperuser") + " --noinput --username newcomer --email n@example.com"
    )
    assert superuser.returncode == 0, superuser.stderr[-3000:]
    db = sqlite3.connect(make_run.database)
    assert db.execute("SELECT is_superuser FROM auth_user WHERE username = 'newcomer'").fetchone() == (1,)

    # The simulator's lifecycles end now: every subscription still running has a current paid
    # entitlement. Ids do not depend on the dates, so they are known here without the run's clock.
    seed, customers = (
        int(re.search(rf"--{option} (\d+)", simulate.args[2]).group(1)) for option in ("seed", "customers")
    )
    running = [
        lc.expected.subscription_id
        for lc in generate_lifecycles(customers=customers, seed=seed)
        if lc.expected.final_status == "active"
    ]
    assert running
    for subscription_id in running:
        windows = db.execute(
            "SELECT starts_at, expires_at FROM provisioning_entitlement WHERE stripe_subscription_id = ? AND kind = 'paid'",
            [subscription_id],
        ).fetchall()
        assert any(_utc(start) <= now < _utc(end) for start, end in windows), (subscription_id, windows)

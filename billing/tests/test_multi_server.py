"""Several app servers and Celery workers on one database, directly and through PgBouncer (issue 21).

Two gunicorn masters (two gthread workers each, on their own ports) and two Celery workers
(``celery -A config worker``, one with the beat) on a Redis of the test's own, all on the test
database. The simulator's lifecycles, shuffled with duplicates, are split at random between
the two servers and every non-2xx is delivered again later, as Stripe does: the rows must end
as in-order delivery leaves them, and every e-mail that in-order delivery sends must be sent
exactly once, to the same recipient (Django's file backend writes each one to the test's mail
directory; they are counted by subject and recipient). That includes a trial reminder owed
before any event told the account its address: it waits for one, and goes out when it comes.

The same runs through PgBouncer in transaction pooling mode, the usual production setup. The
advisory locks are transaction-level (``pg_advisory_xact_lock``) and row locks end with their
transaction, so they work there unchanged. Named prepared statements do not before PgBouncer
1.21: psycopg prepares a statement on the server connection it was given for one transaction,
and PgBouncer gives the next transaction of that client another connection. Debian 12 ships
1.18, so there the app must run with ``DJANGO_DB_SERVER_SIDE_BINDING=false`` (psycopg's
client-side binding cursor, which never prepares); from 1.21 on, ``max_prepared_statements``
makes the defaults work. Both are shown below.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from contextlib import ExitStack

import pytest
from django.db import DatabaseError, connection
from django.db.backends.postgresql.base import DatabaseWrapper

from billing.models import OwedEmail, StripeEvent

from .processes import (
    app_env,
    celery_worker,
    database_url_of,
    deliver_split,
    gunicorn,
    in_order_state,
    lifecycle_run,
    observed,
    pgbouncer,
    redis_server,
    sent_mail,
    snapshot_of,
    wait_for_owed_emails,
    webhook_url,
)

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

CUSTOMERS, SEED = 8, 21


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("multi_server")


@pytest.fixture(scope="module")
def redis(work_dir):
    with redis_server(work_dir) as server:
        yield server


@pytest.fixture(scope="module")
def bouncer(work_dir, django_db_setup):
    with pgbouncer(upstream_port=int(connection.settings_dict["PORT"] or 5432)) as running:
        yield running


def binding_for(bouncer) -> dict[str, str]:
    """The one setting PgBouncer needs: none from 1.21 (it tracks prepared statements), else no server-side binding."""
    return {} if bouncer.tracks_prepared_statements else {"DJANGO_DB_SERVER_SIDE_BINDING": "false"}


def run_on_two_servers(client, tmp_path, redis, database_url: str, **settings: str) -> dict:
    in_order, shuffled = lifecycle_run(customers=CUSTOMERS, seed=SEED)
    expected, messages = in_order_state(client, in_order)
    receipts = {key for key in messages if key.startswith("receipt:")}
    assert len(receipts) >= CUSTOMERS  # the run owes e-mails: receipts, reminders
    assert any(key.startswith("trial_will_end:") for key in messages)

    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    env = app_env(database_url, mail_dir, broker_url=redis.url(0), **settings)
    with ExitStack() as stack:
        servers = [stack.enter_context(gunicorn(env, tmp_path / f"gunicorn-{n}.log")) for n in (1, 2)]
        workers = [stack.enter_context(celery_worker(f"faults{n}", env, tmp_path, beat=n == 1)) for n in (1, 2)]
        assert [len(server.worker_pids()) for server in servers] == [2, 2]

        report = deliver_split([webhook_url(server) for server in servers], shuffled, rng=random.Random(SEED))
        wait_for_owed_emails()

        assert snapshot_of(env) == expected
        sent_by = [len(re.findall(r"owed e-mail \d+ \(\w+\) sent", worker.log())) for worker in workers]
        all_logs = "".join(worker.log() for worker in workers)
    assert report.answers[200] >= len(shuffled)
    assert set(report.answers) <= {200, 500}  # 500: a prerequisite not yet applied, retried later
    assert not StripeEvent.objects.filter(status=StripeEvent.Status.FAILED).exists()
    assert_each_email_sent_once(mail_dir, messages)
    assert sum(sent_by) == sum(sent_mail(mail_dir).values())  # sent by the workers, not the servers
    return {
        "deliveries": len(shuffled),
        "attempts": report.attempts,
        "answers": dict(report.answers),
        "sent": sent_by,
        "waited_for_a_recipient": len(re.findall(r"owed e-mail \d+ \(\w+\) waits for a recipient", all_logs)),
    }


def assert_each_email_sent_once(mail_dir, messages: dict) -> None:
    """Every e-mail in-order delivery owes is owed, and sent exactly once, to the same recipient.

    Out of order, a trial reminder can be owed before any event has told the account its
    e-mail address: it waits for one (``billing.tasks.deliver``), and the event that brings
    the address makes it due at once (``billing.services.locks.lock_account``).
    """
    owed = OwedEmail.objects.all()
    assert set(owed.values_list("key", flat=True)) == set(messages)
    assert list(owed.exclude(status=OwedEmail.Status.SENT).values_list("key", "status", "last_error")) == []
    assert sent_mail(mail_dir) == Counter(messages.values())


def test_two_servers_and_two_workers_on_one_database_end_as_in_order(client, webhook_settings, tmp_path, redis):
    run = run_on_two_servers(client, tmp_path, redis, database_url_of(connection.settings_dict))
    assert run["attempts"] > run["deliveries"]  # some deliveries failed first and were retried
    observed("two servers, two workers", **run)


def test_the_same_through_pgbouncer_in_transaction_pooling(client, webhook_settings, tmp_path, redis, bouncer):
    url = database_url_of(connection.settings_dict, port=bouncer.port)
    run = run_on_two_servers(client, tmp_path, redis, url, **binding_for(bouncer))
    assert run["attempts"] > run["deliveries"]
    # Every server connection came through PgBouncer: its log names its clients' logins.
    assert "login attempt" in bouncer.log_path.read_text()
    observed("two servers, two workers through PgBouncer", version=bouncer.version, **binding_for(bouncer), **run)


def _wrapper(port: int, **options) -> DatabaseWrapper:
    """A Django connection to the test database through ``port``, with the app's OPTIONS changed by ``options``."""
    settings_dict = {**connection.settings_dict, "HOST": "127.0.0.1", "PORT": port}
    settings_dict["OPTIONS"] = {**settings_dict["OPTIONS"], **options}
    return DatabaseWrapper(settings_dict, alias="through_pgbouncer")


def statement_errors(port: int, clients: int = 6, rounds: int = 12, **options) -> Counter:
    """Errors of ``clients`` connections taking turns at the same statement, as gunicorn's threads do."""
    wrappers = [_wrapper(port, **options) for _ in range(clients)]
    errors = Counter()
    try:
        for n in range(clients * rounds):
            try:
                with wrappers[n % clients].cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM billing_stripeevent WHERE id = %s", [f"evt_{n}"])
                    cursor.fetchone()
            except DatabaseError as exc:
                errors[type(exc.__cause__).__name__] += 1
    finally:
        for wrapper in wrappers:
            wrapper.close()
    return errors


def test_what_pgbouncer_needs_of_the_database_settings(bouncer):
    """The app's defaults (server-side binding, statements prepared after 5 uses) against the one setting."""
    options = connection.settings_dict["OPTIONS"]
    assert (options["server_side_binding"], options["prepare_threshold"]) == (True, 5)  # the defaults

    with_defaults = statement_errors(bouncer.port)
    without_binding = statement_errors(bouncer.port, server_side_binding=False)

    assert without_binding == Counter()
    observed("PgBouncer and the default prepared statements", version=bouncer.version, errors=dict(with_defaults))
    if bouncer.tracks_prepared_statements:  # 1.21+, run with max_prepared_statements
        assert with_defaults == Counter()
    else:  # one client's prepared statement is missing, or another's, on the next server connection
        assert with_defaults and set(with_defaults) <= {"DuplicatePreparedStatement", "InvalidSqlStatementName"}

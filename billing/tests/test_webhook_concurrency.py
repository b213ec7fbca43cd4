"""Exactly once under concurrency: many simultaneous deliveries are applied once.

Stripe may deliver one event several times at once (a retry racing a slow first attempt, or
several endpoint workers). These tests start a real HTTP server (pytest-django's
``live_server``, threaded, one database connection per request), and post from 24 threads
released together by a barrier, each on its own HTTP connection.
The database is committed for real (``transaction=True``): the race is the race PostgreSQL sees.
"""

import threading
from collections import Counter
from datetime import UTC, datetime

import pytest
from django.core import mail

from billing.models import Invoice, OwedEmail, Payment, Renewal, StripeEvent, Subscription
from billing.simulation.objects import (
    event_object,
    invoice_line_object,
    invoice_object,
    invoice_payment_object,
    refund_object,
)
from provisioning.models import Account, Entitlement
from provisioning.tests.factories import AccountFactory

from .conftest import (
    DAY,
    T0,
    WEBHOOK_URL,
    active_subscription,
    first_invoice_paid_event,
    post_all_at_once,
    subscription_event,
    trial_subscription,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

DELIVERIES = 24


@pytest.fixture
def webhook_url(live_server, webhook_settings):
    return live_server.url + WEBHOOK_URL


def trial_will_end_event(sub_id: str, customer: str) -> dict:
    return subscription_event(
        "customer.subscription.trial_will_end",
        trial_subscription(sub_id, customer),
        created=T0 + 11 * DAY,
        event_id=f"evt_twe_{sub_id}",
    )


def test_concurrent_deliveries_of_one_event_are_applied_once(webhook_url):
    created = subscription_event(
        "customer.subscription.created",
        trial_subscription("sub_race", "cus_race_new"),
        created=T0,
        event_id="evt_race_created",
    )

    answers = post_all_at_once(webhook_url, [created] * DELIVERIES)

    assert [status for status, _ in answers] == [200] * DELIVERIES
    assert Counter(body["status"] for _, body in answers) == {"processed": 1, "duplicate": DELIVERIES - 1}
    event = StripeEvent.objects.get()
    assert (event.id, event.status, event.attempts) == ("evt_race_created", "processed", 1)
    assert list(Account.objects.values_list("stripe_customer_id", flat=True)) == ["cus_race_new"]
    assert list(Subscription.objects.values_list("stripe_id", flat=True)) == ["sub_race"]
    assert list(Entitlement.objects.values_list("kind", flat=True)) == [Entitlement.Kind.TRIAL]
    assert Renewal.objects.count() == 1
    assert Subscription.history.count() == 1  # one write, one history row


def test_concurrent_deliveries_of_an_event_that_owes_an_email_send_it_once(webhook_url):
    # The customer's account exists already (its checkout linked it) and has a billing e-mail.
    AccountFactory(stripe_customer_id="cus_race_mail", billing_email="owner@raced.example")
    reminder = trial_will_end_event("sub_race_mail", "cus_race_mail")

    answers = post_all_at_once(webhook_url, [reminder] * DELIVERIES)

    assert [status for status, _ in answers] == [200] * DELIVERIES
    assert Counter(body["status"] for _, body in answers) == {"processed": 1, "duplicate": DELIVERIES - 1}
    assert StripeEvent.objects.get().attempts == 1
    assert Account.objects.count() == 1
    assert Subscription.objects.count() == 1
    assert Entitlement.objects.count() == 1
    owed = OwedEmail.objects.get()
    assert (owed.kind, owed.status) == (OwedEmail.Kind.TRIAL_WILL_END, OwedEmail.Status.SENT)
    # The live server runs in this process with the locmem backend: its outbox is this one.
    trial_end = datetime.fromtimestamp(T0 + 14 * DAY, tz=UTC)
    assert [(m.subject, m.to) for m in mail.outbox] == [
        (f"Your trial ends on {trial_end:%B} {trial_end.day}, {trial_end.year}", ["owner@raced.example"])
    ]


def trial_invoice_created(sub_id: str, customer: str) -> dict:
    """The $0 first invoice of a trial, as ``invoice.created`` sends it (a draft)."""
    invoice_id = f"in_trial_{sub_id}"
    line = invoice_line_object(
        id=f"il_{invoice_id}",
        invoice=invoice_id,
        amount=0,
        period_start=T0,
        period_end=T0 + 14 * DAY,
        subscription=sub_id,
        description="Trial period for Standard",
    )
    invoice = invoice_object(
        id=invoice_id,
        customer=customer,
        status="draft",
        billing_reason="subscription_create",
        lines=[line],
        subscription=sub_id,
        created=T0 + 1,
        customer_email="founder@new.example",
    )
    return event_object(type="invoice.created", obj=invoice, created=T0 + 1, id=f"evt_ic_{sub_id}")


def test_concurrent_different_events_of_a_new_customer_make_one_account(webhook_url):
    """Three events of a customer never seen before race to create its account."""
    sub_id, customer = "sub_race_many", "cus_race_many"
    created = subscription_event(
        "customer.subscription.created", trial_subscription(sub_id, customer), created=T0, event_id="evt_rm_created"
    )
    events = [created, trial_invoice_created(sub_id, customer), trial_will_end_event(sub_id, customer)]
    payloads = [events[i % len(events)] for i in range(DELIVERIES)]

    answers = post_all_at_once(webhook_url, payloads)

    assert [status for status, _ in answers] == [200] * DELIVERIES
    per_event = Counter((body["id"], body["status"]) for _, body in answers)
    for event in events:
        assert per_event[(event["id"], "processed")] == 1
        assert per_event[(event["id"], "duplicate")] == DELIVERIES // len(events) - 1
    assert list(StripeEvent.objects.order_by("id").values_list("status", "attempts")) == [("processed", 1)] * 3
    assert list(Account.objects.values_list("stripe_customer_id", flat=True)) == [customer]
    subscription = Subscription.objects.get()
    assert subscription.account.stripe_customer_id == customer
    assert Invoice.objects.get().subscription == subscription  # linked whichever came first
    assert Entitlement.objects.count() == 1
    assert OwedEmail.objects.count() == 1


def test_concurrent_deliveries_of_a_failing_event_apply_nothing_and_count_every_attempt(webhook_url):
    """``invoice.paid`` before its subscription: every racing delivery fails whole, none half-applies."""
    paid = first_invoice_paid_event(
        "in_race_early", sub_id="sub_race_late", customer="cus_race_late", start=T0, end=T0 + 30 * DAY, created=T0 + 60
    )

    answers = post_all_at_once(webhook_url, [paid] * DELIVERIES)

    assert Counter(status for status, _ in answers) == {500: DELIVERIES}
    event = StripeEvent.objects.get()
    assert (event.status, event.attempts) == (StripeEvent.Status.FAILED, DELIVERIES)
    assert "not known yet" in event.last_error
    assert (Account.objects.count(), Invoice.objects.count(), OwedEmail.objects.count()) == (0, 0, 0)

    created = subscription_event(
        "customer.subscription.created", active_subscription("sub_race_late", "cus_race_late"), created=T0
    )
    assert post_all_at_once(webhook_url, [created])[0][0] == 200
    retries = post_all_at_once(webhook_url, [paid] * DELIVERIES)  # Stripe's retries, racing again

    assert [status for status, _ in retries] == [200] * DELIVERIES
    assert Counter(body["status"] for _, body in retries) == {"processed": 1, "duplicate": DELIVERIES - 1}
    event.refresh_from_db()
    assert (event.status, event.attempts) == (StripeEvent.Status.PROCESSED, DELIVERIES + 1)
    assert Entitlement.objects.filter(kind=Entitlement.Kind.PAID).count() == 1
    assert list(OwedEmail.objects.values_list("key", flat=True)) == ["receipt:in_race_early"]
    assert len(mail.outbox) == 1


def _outside_conninfo() -> str:
    """How a connection outside the live server's reaches the test database (to stage races)."""
    import psycopg
    from django.db import connection

    settings = connection.settings_dict
    return psycopg.conninfo.make_conninfo(
        dbname=settings["NAME"],
        user=settings["USER"],
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        password=settings["PASSWORD"] or None,
    )


def _queued_behind_the_account_lock(webhook_url: str, customer: str, first: dict, second: dict) -> dict[str, int]:
    """Deliver ``first`` then ``second`` while an outside transaction holds the account's lock.

    Each waits for the lock before the next is sent (PostgreSQL grants a row lock first come,
    first served), then the lock is released: the order in which they get it is certain.
    """
    import psycopg

    conninfo = _outside_conninfo()
    answers: dict[str, int] = {}

    def post(payload: dict) -> None:
        answers[payload["id"]] = post_all_at_once(webhook_url, [payload])[0][0]

    with psycopg.connect(conninfo, autocommit=True) as watcher, psycopg.connect(conninfo) as blocker:
        blocker.execute("SELECT 1 FROM provisioning_account WHERE stripe_customer_id = %s FOR UPDATE", [customer])
        threads = []
        for count, payload in enumerate((first, second), start=1):
            threads.append(threading.Thread(target=post, args=(payload,)))
            threads[-1].start()
            _wait_for_waiters(watcher, count)
        blocker.commit()
        for thread in threads:
            thread.join(timeout=60)
    return answers


def _backends_waiting_for_a_lock(conn) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return row[0]


def _wait_for_waiters(conn, count: int) -> None:
    import time

    deadline = time.monotonic() + 30
    while _backends_waiting_for_a_lock(conn) < count:
        assert time.monotonic() < deadline, f"fewer than {count} deliveries ever waited for the account's lock"
        time.sleep(0.02)


def test_an_older_snapshot_that_waited_for_the_lock_never_overwrites_a_newer_one(webhook_url):
    """Two updates of one subscription race; the newer commits while the older waits for the lock.

    The older one must read the subscription *after* it holds the account's lock, or it would
    compare itself with the watermark it saw before the newer one committed, and win. The race
    is made certain: an outside transaction holds the account's lock while the newer delivery,
    then the older one, queue up behind it (PostgreSQL grants a row lock first come, first served).
    """
    sub_id, customer = "sub_race_order", "cus_race_order"
    created = subscription_event(
        "customer.subscription.created", active_subscription(sub_id, customer), created=T0, event_id="evt_ro_0"
    )
    assert post_all_at_once(webhook_url, [created])[0][0] == 200
    newer = subscription_event(
        "customer.subscription.updated",
        active_subscription(sub_id, customer, quantity=5),
        created=T0 + 200,
        event_id="evt_ro_newer",
    )
    older = subscription_event(
        "customer.subscription.updated",
        active_subscription(sub_id, customer, quantity=3),
        created=T0 + 100,
        event_id="evt_ro_older",
    )
    answers = _queued_behind_the_account_lock(webhook_url, customer, newer, older)

    assert answers == {"evt_ro_newer": 200, "evt_ro_older": 200}
    newer_row, older_row = (StripeEvent.objects.get(pk=e["id"]) for e in (newer, older))
    assert newer_row.processed_at < older_row.processed_at  # the race went as staged
    subscription = Subscription.objects.get()
    assert (subscription.quantity, subscription.last_event_id) == (5, "evt_ro_newer")


def test_a_delivery_waiting_for_its_event_row_holds_no_account_lock(webhook_url):
    """The account's lock is taken only once the event's row is created.

    An outside transaction plays a first delivery that has inserted the event's row and not yet
    taken the account's lock. A second delivery of that event then waits for the row; while
    it waits, the account must still be free (``NOWAIT`` would fail otherwise), or the first
    delivery, asking for the account next, would wait for it: a deadlock.
    """
    import psycopg

    sub_id, customer = "sub_race_rowwait", "cus_race_rowwait"
    created = subscription_event(
        "customer.subscription.created", active_subscription(sub_id, customer), created=T0, event_id="evt_rw_0"
    )
    assert post_all_at_once(webhook_url, [created])[0][0] == 200
    update = subscription_event(
        "customer.subscription.updated",
        active_subscription(sub_id, customer, quantity=4),
        created=T0 + 60,
        event_id="evt_rw_1",
    )
    conninfo = _outside_conninfo()
    answers = []
    with psycopg.connect(conninfo, autocommit=True) as watcher, psycopg.connect(conninfo) as first:
        first.execute(
            "INSERT INTO billing_stripeevent (id, type, api_version, livemode, created, object_id, payload, status,"
            " attempts, last_error, received_at) VALUES (%s, %s, '', false, now(), '', '{}', 'received', 0, '', now())",
            [update["id"], update["type"]],
        )
        second = threading.Thread(target=lambda: answers.extend(post_all_at_once(webhook_url, [update])))
        second.start()
        _wait_for_waiters(watcher, 1)
        first.execute(  # raises LockNotAvailable if the waiting delivery holds the account
            "SELECT 1 FROM provisioning_account WHERE stripe_customer_id = %s FOR UPDATE NOWAIT", [customer]
        )
        first.rollback()  # the "first delivery" gives up: the waiting one creates the row
        second.join(timeout=60)

    assert [status for status, _ in answers] == [200]
    assert StripeEvent.objects.get(pk="evt_rw_1").status == StripeEvent.Status.PROCESSED
    assert Subscription.objects.get().quantity == 4


def test_a_first_event_that_meets_the_account_being_created_locks_that_account(webhook_url):
    """Two first events of a customer: the second's INSERT of the account meets the first's.

    An outside transaction plays the first event: it has inserted the customer's account and not
    committed. The delivery's INSERT (``ON CONFLICT DO NOTHING``) must wait for it, skip its own
    row once it commits, then lock and use that row: one account, which learns the e-mail the
    delivery carries (a history row says so), and the invoice on it.
    """
    import psycopg

    sub_id, customer = "sub_race_account", "cus_race_account"
    invoice_created = trial_invoice_created(sub_id, customer)
    answers = []
    with (
        psycopg.connect(_outside_conninfo(), autocommit=True) as watcher,
        psycopg.connect(_outside_conninfo()) as first,
    ):
        first.execute(
            "INSERT INTO provisioning_account (name, stripe_customer_id, billing_email, default_payment_method_id,"
            " created_at, updated_at) VALUES (%s, %s, '', '', now(), now())",
            [customer, customer],
        )
        second = threading.Thread(target=lambda: answers.extend(post_all_at_once(webhook_url, [invoice_created])))
        second.start()
        _wait_for_waiters(watcher, 1)
        first.commit()
        second.join(timeout=60)

    assert [status for status, _ in answers] == [200]
    account = Account.objects.get()
    assert (account.stripe_customer_id, account.billing_email) == (customer, "founder@new.example")
    learned = Account.history.get(id=account.pk)
    assert (learned.history_type, learned.history_change_reason) == ("~", "customer details from Stripe")
    assert Invoice.objects.get().account == account


def test_an_invoice_that_waited_for_the_lock_finds_the_subscription_mirrored_meanwhile(webhook_url):
    """An invoice's handler reads the subscription only once it holds the account's lock. Here
    the subscription is mirrored (and committed) while the invoice waits for that lock: the
    read that follows sees it, and the invoice is attached to it.

    The race is made certain as above: an outside transaction holds the account's lock while
    ``customer.subscription.created``, then ``invoice.created``, queue up behind it.
    """
    sub_id, customer = "sub_race_inv", "cus_race_inv"
    AccountFactory(stripe_customer_id=customer)
    created = subscription_event(
        "customer.subscription.created", trial_subscription(sub_id, customer), created=T0, event_id="evt_ri_sub"
    )
    invoice = trial_invoice_created(sub_id, customer)
    answers = _queued_behind_the_account_lock(webhook_url, customer, created, invoice)

    assert answers == {"evt_ri_sub": 200, invoice["id"]: 200}
    sub_row, invoice_row = (StripeEvent.objects.get(pk=e["id"]) for e in (created, invoice))
    assert sub_row.processed_at < invoice_row.processed_at  # the race went as staged
    assert Invoice.objects.get().subscription == Subscription.objects.get()


@pytest.mark.parametrize("refund_known", [True, False], ids=["refund-known", "no-refund"])
@pytest.mark.parametrize("invoice_first", [True, False], ids=["invoice-first", "payment-first"])
def test_an_invoice_and_its_payment_arriving_together_end_attached(webhook_url, invoice_first, refund_known):
    """The invoice's first event and its payment (a refund known already, or not) arrive together;
    payment writers take no account lock, so only the invoice's advisory lock orders them.

    * invoice first: the invoice handler holds the lock; the payment's writer asks for it before
      it looks for the invoice, so it waits for the invoice to commit, then finds it.
    * payment first: the payment commits unattached while the invoice's event waits for the
      lock; once it holds the lock, the invoice handler finds the payment waiting.

    The order is made certain: an outside transaction holds the invoice's lock while the two
    deliveries queue up behind it in that order (first come, first served).
    """
    import psycopg

    from billing.services.locks import invoice_lock_key

    customer, invoice_id, intent = "cus_race_key", "in_race_key", "pi_race_key"
    AccountFactory(stripe_customer_id=customer)
    refund = event_object(
        type="refund.created",
        created=T0 + 50,
        obj=refund_object(id="re_race_key", charge="ch_race_key", payment_intent=intent, amount=1200, created=T0 + 50),
    )
    if refund_known:
        assert post_all_at_once(webhook_url, [refund])[0][0] == 200
    line = invoice_line_object(id="il_race_key", invoice=invoice_id, amount=9000, period_start=T0, period_end=T0)
    paid = event_object(
        type="invoice.paid",
        created=T0 + 2,
        obj=invoice_object(
            id=invoice_id,
            customer=customer,
            status="paid",
            billing_reason="manual",
            lines=[line],
            number="RK-1",
            created=T0,
            finalized_at=T0 + 1,
            paid_at=T0 + 2,
            customer_email="rk@example.com",
        ),
    )
    payment = event_object(
        type="invoice_payment.paid",
        created=T0 + 2,
        obj=invoice_payment_object(
            id="inpay_race_key", invoice=invoice_id, payment_intent=intent, amount_paid=9000, created=T0 + 2
        ),
    )

    conninfo = _outside_conninfo()
    answers: dict[str, int] = {}

    def post(payload: dict) -> None:
        answers[payload["id"]] = post_all_at_once(webhook_url, [payload])[0][0]

    with psycopg.connect(conninfo, autocommit=True) as watcher, psycopg.connect(conninfo) as blocker:
        blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [invoice_lock_key(invoice_id)])
        threads = []
        for count, payload in enumerate((paid, payment) if invoice_first else (payment, paid), start=1):
            threads.append(threading.Thread(target=post, args=(payload,)))
            threads[-1].start()
            _wait_for_waiters(watcher, count)
        assert not Invoice.objects.exists()  # both still wait
        assert list(Payment.objects.values_list("stripe_invoice_id", flat=True)) == ([""] if refund_known else [])
        blocker.commit()
        for thread in threads:
            thread.join(timeout=60)

    assert answers == {paid["id"]: 200, payment["id"]: 200}
    paid_row, payment_row = (StripeEvent.objects.get(pk=e["id"]) for e in (paid, payment))
    assert (paid_row.processed_at < payment_row.processed_at) == invoice_first  # the race went as staged
    invoice = Invoice.objects.get(stripe_id=invoice_id)
    assert Payment.objects.get(payment_intent_id=intent).invoice == invoice
    assert invoice.amount_refunded == (1200 if refund_known else 0)

"""Owed e-mails are sent after commit, exactly once, and never lost (``billing.outbox``, ``billing.tasks``).

Mail goes through Django's locmem backend (``mailoutbox``); a mail server that fails is a
small backend below that raises like ``smtplib`` does. Without ``CELERY_BROKER_URL`` the tests
run as the web process does (tasks eager, after commit); the last tests start a real Celery
worker on Redis (``TEST_REDIS_URL``) in a thread of this process, on the same test database.
"""

import smtplib
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.db import connection, transaction
from django.utils import timezone

from billing.models import Invoice, OwedEmail
from billing.outbox import owe_email
from billing.simulation.objects import event_object, invoice_line_object, invoice_object
from billing.tasks import (
    MAX_ATTEMPTS,
    Delivery,
    Outcome,
    deliver,
    due_for_sweep,
    retry_delay,
    send_owed_email,
    send_owed_emails,
    sweep_owed_emails,
)
from billing.tests.conftest import DAY, T0, runs_of, subscription_event, trial_subscription
from billing.tests.factories import OwedEmailFactory
from billing.tests.processes import wait_until
from billing.tests.test_emails import make_account, make_invoice, make_trialing_subscription
from config.celery import app as celery_app

# Tests that need a real commit (on_commit, other threads) mark themselves transaction=True.
pytestmark = pytest.mark.django_db

RECEIPT = OwedEmail.Kind.RECEIPT
FLAKY_BACKEND = f"{__name__}.FlakySMTPBackend"


class FlakySMTPBackend(LocmemBackend):
    """The locmem backend behind a mail server that drops the first ``failures`` connections."""

    failures = 0

    def send_messages(self, messages):
        if FlakySMTPBackend.failures > 0:
            FlakySMTPBackend.failures -= 1
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
        return super().send_messages(messages)


@pytest.fixture
def flaky_mail(settings, mailoutbox):
    """``flaky_mail(n)``: the next ``n`` sends fail; mail that gets through lands in ``mailoutbox``."""
    settings.EMAIL_BACKEND = FLAKY_BACKEND

    def fail_next(n: int) -> None:
        FlakySMTPBackend.failures = n

    yield fail_next
    FlakySMTPBackend.failures = 0


def owe_receipt(invoice: Invoice) -> OwedEmail | None:
    """Owe ``invoice``'s receipt in a transaction of its own, as a webhook handler does."""
    with transaction.atomic():
        return owe_email(RECEIPT, key=f"receipt:{invoice.stripe_id}", account=invoice.account, invoice=invoice)


def age(owed: OwedEmail, by: timedelta) -> None:
    """Pretend ``owed`` was recorded ``by`` ago (its task lost, or its backoff elapsed)."""
    OwedEmail.objects.filter(pk=owed.pk).update(created_at=timezone.now() - by)


# --- After commit, exactly once ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_receipt_is_sent_once_however_often_it_is_owed_or_sent(mailoutbox):
    invoice = make_invoice(make_account())

    first = owe_receipt(invoice)
    assert first is not None
    assert owe_receipt(invoice) is None  # invoice.paid delivered again
    assert owe_receipt(invoice) is None

    assert OwedEmail.objects.count() == 1
    assert [m.subject for m in mailoutbox] == ["Receipt for invoice ACME-0001"]
    first.refresh_from_db()
    invoice.refresh_from_db()
    assert (first.status, first.attempts, first.last_error) == (OwedEmail.Status.SENT, 1, "")
    assert first.sent_at is not None
    assert invoice.receipt_sent_at == first.sent_at

    # The task again (a duplicate message, the admin's "send now"), the sweep much later: nothing.
    assert send_owed_email.delay(first.pk).get() == Outcome.SKIPPED
    assert deliver(first.pk).outcome == Outcome.SKIPPED
    age(first, timedelta(days=1))
    assert sweep_owed_emails() == 0
    assert len(mailoutbox) == 1
    first.refresh_from_db()
    assert first.attempts == 1


@pytest.mark.django_db(transaction=True)
def test_nothing_is_sent_before_the_commit(mailoutbox):
    invoice = make_invoice(make_account())

    with transaction.atomic():
        owed = owe_email(RECEIPT, key="receipt:in_0001", account=invoice.account, invoice=invoice)
        assert mailoutbox == []
        OwedEmail.objects.filter(pk=owed.pk, status=OwedEmail.Status.PENDING).get()

    assert len(mailoutbox) == 1
    assert OwedEmail.objects.get().status == OwedEmail.Status.SENT


@pytest.mark.django_db(transaction=True)
def test_an_email_owed_by_a_rolled_back_change_is_never_sent(mailoutbox):
    invoice = make_invoice(make_account())

    class HandlerFailed(Exception):
        pass

    with pytest.raises(HandlerFailed), transaction.atomic():
        owe_email(RECEIPT, key="receipt:in_0001", account=invoice.account, invoice=invoice)
        raise HandlerFailed

    # The inbox runs a handler in a savepoint: a failed handler's e-mails go with it.
    with transaction.atomic():
        with pytest.raises(HandlerFailed), transaction.atomic():
            owe_email(RECEIPT, key="receipt:in_0001", account=invoice.account, invoice=invoice)
            raise HandlerFailed

    assert not OwedEmail.objects.exists()
    assert sweep_owed_emails() == 0
    assert mailoutbox == []


@pytest.mark.django_db(transaction=True)
def test_a_run_that_finds_the_email_locked_by_another_leaves_it_alone(mailoutbox):
    invoice = make_invoice(make_account())
    owed = OwedEmailFactory(kind=RECEIPT, invoice=invoice)
    locked, release = threading.Event(), threading.Event()

    def another_run_holds_the_row():
        try:
            with transaction.atomic():
                OwedEmail.objects.select_for_update().get(pk=owed.pk)
                locked.set()
                release.wait(10)
        finally:
            connection.close()  # this thread's own connection

    other = threading.Thread(target=another_run_holds_the_row)
    other.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        assert deliver(owed.pk).outcome == Outcome.SKIPPED
        assert time.monotonic() - started < 5  # skipped, not waited for
        assert mailoutbox == []
    finally:
        release.set()
        other.join(10)

    assert deliver(owed.pk).outcome == Outcome.SENT
    assert len(mailoutbox) == 1


@pytest.mark.django_db(transaction=True)
def test_three_deliveries_of_invoice_paid_send_one_receipt(post_event, mailoutbox):
    created = int(timezone.now().timestamp()) - 60
    line = invoice_line_object(
        id="il_one_off", invoice="in_one_off", amount=4200, period_start=created, period_end=created
    )
    invoice = invoice_object(
        id="in_one_off",
        customer="cus_one_off",
        status="paid",
        billing_reason="manual",
        lines=[line],
        number="ONE-0001",
        created=created,
        finalized_at=created + 1,
        paid_at=created + 2,
        customer_email="payer@example.com",
        attempt_count=1,
    )
    event = event_object(type="invoice.paid", obj=invoice, created=created + 2, id="evt_invoice_paid_one_off")

    statuses = [post_event(event).json()["status"] for _ in range(3)]

    assert statuses == ["processed", "duplicate", "duplicate"]
    owed = OwedEmail.objects.get()
    assert (owed.key, owed.status) == ("receipt:in_one_off", OwedEmail.Status.SENT)
    assert len(mailoutbox) == 1
    assert mailoutbox[0].subject == "Receipt for invoice ONE-0001"
    assert mailoutbox[0].to == ["payer@example.com"]
    assert "42.00 USD" in mailoutbox[0].body
    assert Invoice.objects.get(stripe_id="in_one_off").receipt_sent_at == owed.sent_at


# --- Never lost --------------------------------------------------------------------------


def test_an_email_whose_task_was_lost_is_delivered_by_the_sweep(mailoutbox):
    invoice = make_invoice(make_account())
    # Committed, but its task never ran (broker down, process killed after the commit).
    owed = OwedEmailFactory(kind=RECEIPT, invoice=invoice)

    assert sweep_owed_emails() == 0  # too fresh: its on-commit task normally wins
    age(owed, settings.BILLING_OUTBOX_SWEEP_AFTER + timedelta(seconds=1))
    assert sweep_owed_emails() == 1

    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.SENT, 1)
    assert [m.subject for m in mailoutbox] == ["Receipt for invoice ACME-0001"]
    assert sweep_owed_emails() == 0


@pytest.mark.django_db(transaction=True)
def test_a_mail_error_is_recorded_and_the_sweep_delivers_later(flaky_mail, mailoutbox):
    flaky_mail(1)
    invoice = make_invoice(make_account())

    owed = owe_receipt(invoice)  # the task runs after commit, in this process, and fails

    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.PENDING, 1)  # not retried inline
    assert owed.last_error == "SMTPServerDisconnected: Connection unexpectedly closed"
    assert mailoutbox == []
    assert Invoice.objects.get(pk=invoice.pk).receipt_sent_at is None

    assert sweep_owed_emails() == 0  # still backing off
    age(owed, settings.BILLING_OUTBOX_SWEEP_AFTER + retry_delay(1) + timedelta(seconds=1))
    assert sweep_owed_emails() == 1

    owed.refresh_from_db()
    assert (owed.status, owed.attempts, owed.last_error) == (OwedEmail.Status.SENT, 2, "")
    assert len(mailoutbox) == 1
    assert Invoice.objects.get(pk=invoice.pk).receipt_sent_at == owed.sent_at


def test_an_email_that_keeps_failing_is_given_up_after_the_maximum(flaky_mail, mailoutbox):
    flaky_mail(10 * MAX_ATTEMPTS)
    invoice = make_invoice(make_account())
    owed = OwedEmailFactory(kind=RECEIPT, invoice=invoice)
    age(owed, timedelta(days=1))  # every backoff has elapsed

    for attempt in range(1, MAX_ATTEMPTS):
        assert sweep_owed_emails() == 1
        owed.refresh_from_db()
        assert (owed.status, owed.attempts) == (OwedEmail.Status.PENDING, attempt)
    assert sweep_owed_emails() == 1

    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.FAILED, MAX_ATTEMPTS)
    assert "SMTPServerDisconnected" in owed.last_error
    assert sweep_owed_emails() == 0
    assert deliver(owed.pk).outcome == Outcome.SKIPPED
    assert mailoutbox == []


def test_an_email_nobody_can_receive_yet_waits_for_a_recipient(mailoutbox):
    account = make_account()  # no billing e-mail, no owner or admin
    invoice = make_invoice(account, customer_email="")
    owed = OwedEmailFactory(kind=RECEIPT, invoice=invoice)

    assert deliver(owed.pk) == Delivery(Outcome.WAITING, 1)

    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.PENDING, 1)
    assert owed.last_error.startswith("NoRecipient: account ")
    # Tried again on the usual backoff, not at every sweep.
    age(owed, settings.BILLING_OUTBOX_SWEEP_AFTER + retry_delay(1) - timedelta(seconds=5))
    assert sweep_owed_emails() == 0
    age(owed, settings.BILLING_OUTBOX_SWEEP_AFTER + retry_delay(1) + timedelta(seconds=1))
    assert sweep_owed_emails() == 1
    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.PENDING, 2)

    # The account gets an address without an event (support, in the admin): the next try sends it.
    account.billing_email = "billing@acme.example"
    account.save(update_fields=["billing_email"])
    age(owed, timedelta(hours=1))
    assert sweep_owed_emails() == 1

    owed.refresh_from_db()
    assert (owed.status, owed.attempts, owed.last_error) == (OwedEmail.Status.SENT, 1, "")  # waits are not sends
    assert [(m.subject, m.to) for m in mailoutbox] == [("Receipt for invoice ACME-0001", ["billing@acme.example"])]


def test_an_email_that_waited_for_its_recipient_gets_every_attempt_at_sending(flaky_mail, mailoutbox):
    account = make_account()
    owed = OwedEmailFactory(kind=RECEIPT, invoice=make_invoice(account, customer_email=""))
    age(owed, timedelta(days=1))
    for _ in range(MAX_ATTEMPTS + 2):  # a long wait
        assert deliver(owed.pk).outcome == Outcome.WAITING
    account.billing_email = "billing@acme.example"
    account.save(update_fields=["billing_email"])
    flaky_mail(1)

    assert deliver(owed.pk) == Delivery(Outcome.RETRY, 1)  # not given up: its first attempt at sending
    assert deliver(owed.pk) == Delivery(Outcome.SENT, 2)
    assert len(mailoutbox) == 1


def test_an_email_nobody_ever_receives_is_given_up_after_the_recipient_wait(mailoutbox):
    """Tried every ``RETRY_CAP`` once past ``MAX_ATTEMPTS``; given up ``BILLING_OUTBOX_RECIPIENT_WAIT`` after it was owed."""
    assert settings.BILLING_OUTBOX_RECIPIENT_WAIT == timedelta(days=3)  # Stripe's retries of an event
    account = make_account()
    subscription = make_trialing_subscription(account)
    owed = OwedEmailFactory(kind=OwedEmail.Kind.TRIAL_WILL_END, subscription=subscription)
    age(owed, timedelta(days=1))
    for attempt in range(1, MAX_ATTEMPTS + 4):  # far past MAX_ATTEMPTS: still waiting
        assert deliver(owed.pk) == Delivery(Outcome.WAITING, attempt)

    owed.refresh_from_db()
    waited = settings.BILLING_OUTBOX_SWEEP_AFTER + sum(
        (retry_delay(n) for n in range(1, owed.attempts + 1)), timedelta()
    )
    due_at = owed.created_at + waited
    assert not due_for_sweep(now=due_at - timedelta(seconds=1)).exists()
    assert list(due_for_sweep(now=due_at)) == [owed]

    age(owed, settings.BILLING_OUTBOX_RECIPIENT_WAIT - timedelta(minutes=1))
    assert deliver(owed.pk).outcome == Outcome.WAITING
    age(owed, settings.BILLING_OUTBOX_RECIPIENT_WAIT)
    assert sweep_owed_emails() == 1

    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.FAILED, MAX_ATTEMPTS + 5)
    assert owed.last_error.startswith("NoRecipient: account ")
    age(owed, timedelta(days=30))
    assert sweep_owed_emails() == 0
    assert deliver(owed.pk).outcome == Outcome.SKIPPED
    assert mailoutbox == []


def reminder_before_the_address_is_known() -> list[dict]:
    """A trial reminder of a customer no event has named an address for yet, then its trial invoice, which does."""
    sub_id, customer = "sub_early_reminder", "cus_early_reminder"
    reminder = subscription_event(
        "customer.subscription.trial_will_end",
        trial_subscription(sub_id, customer),
        created=T0 + 11 * DAY,
        event_id="evt_early_reminder",
    )
    line = invoice_line_object(
        id="il_early_reminder", invoice="in_early_reminder", amount=0, period_start=T0, period_end=T0 + 14 * DAY
    )
    trial_invoice = invoice_object(
        id="in_early_reminder",
        customer=customer,
        status="draft",
        billing_reason="subscription_create",
        lines=[line],
        subscription=sub_id,
        created=T0 + 1,
        customer_email="founder@early.example",
    )
    return [reminder, event_object(type="invoice.created", obj=trial_invoice, created=T0 + 1, id="evt_early_invoice")]


@pytest.mark.django_db(transaction=True)
def test_a_trial_reminder_owed_before_the_address_is_known_is_sent_when_it_arrives(post_event, mailoutbox):
    """Out of order (DESIGN.md: order-independent), as in order: the reminder goes out once, to the customer."""
    reminder, invoice_created = reminder_before_the_address_is_known()

    assert post_event(reminder).status_code == 200

    owed = OwedEmail.objects.get()
    assert (owed.kind, owed.status, owed.attempts) == (OwedEmail.Kind.TRIAL_WILL_END, OwedEmail.Status.PENDING, 1)
    assert owed.last_error.startswith("NoRecipient")
    assert mailoutbox == []

    assert post_event(invoice_created).status_code == 200  # tells the account its address: due now

    owed.refresh_from_db()
    assert (owed.status, owed.attempts, owed.last_error) == (OwedEmail.Status.SENT, 1, "")
    trial_end = datetime.fromtimestamp(T0 + 14 * DAY, tz=UTC)
    assert [(m.subject, m.to) for m in mailoutbox] == [
        (f"Your trial ends on {trial_end:%B} {trial_end.day}, {trial_end.year}", ["founder@early.example"])
    ]


@pytest.mark.django_db(transaction=True)
def test_an_email_not_tried_yet_is_tried_once_the_address_is_known(post_event, mailoutbox):
    """Its first try may be reading the account at this very moment, as it was before the address
    came: it is tried again once the transaction that brought the address commits."""
    account = make_account("early")
    owed = OwedEmailFactory(kind=OwedEmail.Kind.TRIAL_WILL_END, subscription=make_trialing_subscription(account))
    line = invoice_line_object(id="il_early", invoice="in_early", amount=500, period_start=T0, period_end=T0)
    invoice = invoice_object(
        id="in_early",
        customer=account.stripe_customer_id,
        status="draft",
        billing_reason="manual",
        lines=[line],
        created=T0,
        customer_email="founder@early.example",
    )

    assert post_event(event_object(type="invoice.created", obj=invoice, created=T0)).status_code == 200

    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.SENT, 1)
    assert [m.to for m in mailoutbox] == [["founder@early.example"]]


@pytest.mark.django_db(transaction=True)
def test_learning_the_address_sends_only_what_waits_for_one(post_event, mailoutbox, flaky_mail):
    """An e-mail backing off from a mail error keeps its backoff; nothing is sent twice."""
    reminder, invoice_created = reminder_before_the_address_is_known()
    post_event(reminder)
    account = OwedEmail.objects.get().account
    flaky_mail(1)
    other = owe_receipt(make_invoice(account, customer_email="payer@early.example"))  # the mail server fails once
    other.refresh_from_db()
    assert (other.status, other.attempts) == (OwedEmail.Status.PENDING, 1)

    post_event(invoice_created)
    post_event({**invoice_created, "id": "evt_early_invoice_again"})  # the address again: nothing more

    assert [m.to for m in mailoutbox] == [["founder@early.example"]]
    other.refresh_from_db()
    assert (other.status, other.attempts) == (OwedEmail.Status.PENDING, 1)


def test_the_sweep_backs_off_exponentially_up_to_ten_minutes():
    assert [retry_delay(n) for n in range(1, 8)] == [timedelta(minutes=m) for m in (1, 2, 4, 8, 10, 10, 10)]
    invoice = make_invoice(make_account())
    owed = OwedEmailFactory(kind=RECEIPT, invoice=invoice, attempts=2)
    due_at = owed.created_at + settings.BILLING_OUTBOX_SWEEP_AFTER + timedelta(minutes=1 + 2)

    assert not due_for_sweep(now=due_at - timedelta(seconds=1)).exists()
    assert list(due_for_sweep(now=due_at)) == [owed]


# --- A real worker -----------------------------------------------------------------------


def other_connections_to_this_database() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_a_worker_on_redis_sends_the_receipt(redis_worker, mailoutbox):
    invoice = make_invoice(make_account())
    runs_before = runs_of(send_owed_emails)

    owed = owe_receipt(invoice)

    assert wait_until(lambda: OwedEmail.objects.filter(pk=owed.pk, status=OwedEmail.Status.SENT).exists())
    assert wait_until(lambda: len(mailoutbox) == 1)
    assert mailoutbox[0].subject == "Receipt for invoice ACME-0001"
    assert runs_of(send_owed_emails) == runs_before + 1  # the worker ran it, not this thread
    assert Invoice.objects.get(pk=invoice.pk).receipt_sent_at is not None
    # Its thread's database connection is closed after the task (Celery's Django fix-up), so
    # nothing holds the test database when it is flushed and dropped.
    assert wait_until(lambda: other_connections_to_this_database() == 0)


@pytest.mark.django_db(transaction=True)
def test_with_a_broker_the_sweep_enqueues_what_is_owed(redis_worker, mailoutbox):
    invoice = make_invoice(make_account())
    owed = OwedEmailFactory(kind=RECEIPT, invoice=invoice)
    age(owed, timedelta(minutes=5))
    runs_before = runs_of(send_owed_email)

    assert sweep_owed_emails() == 1

    assert wait_until(lambda: OwedEmail.objects.filter(pk=owed.pk, status=OwedEmail.Status.SENT).exists())
    assert wait_until(lambda: len(mailoutbox) == 1)
    assert runs_of(send_owed_email) == runs_before + 1


@pytest.mark.django_db(transaction=True)
def test_with_a_broker_a_failed_send_is_retried_with_backoff(redis_worker, flaky_mail, mailoutbox):
    flaky_mail(1)
    invoice = make_invoice(make_account())

    owed = owe_receipt(invoice)

    assert wait_until(lambda: OwedEmail.objects.filter(pk=owed.pk, attempts=1).exists())
    owed.refresh_from_db()
    assert owed.status == OwedEmail.Status.PENDING
    assert owed.last_error.startswith("SMTPServerDisconnected")
    # The worker holds the retry, due one backoff step after the failure.
    scheduled = []
    assert wait_until(lambda: scheduled.extend(_scheduled(send_owed_email)) or scheduled, timeout=10)
    [retry] = scheduled
    assert retry["request"]["args"] == [owed.pk]
    eta = datetime.fromisoformat(retry["eta"])
    assert timedelta(seconds=50) < eta - timezone.now() <= retry_delay(1)
    assert mailoutbox == []


def _scheduled(task) -> list[dict]:
    replies = celery_app.control.inspect(timeout=1).scheduled() or {}
    return [entry for entries in replies.values() for entry in entries if entry["request"]["name"] == task.name]


@pytest.mark.django_db(transaction=True)
def test_with_a_broker_the_emails_of_several_commits_go_in_one_message(redis_worker, mailoutbox, settings):
    """The web process publishes what its commits owed in batches: one Celery message for the
    receipts of three transactions committed within the publishing window."""
    settings.BILLING_OUTBOX_PUBLISH_WINDOW = 1.0
    account = make_account()
    invoices = [make_invoice(account, key=f"10{i}") for i in range(3)]
    runs_before, single_before = runs_of(send_owed_emails), runs_of(send_owed_email)

    owed = [owe_receipt(invoice) for invoice in invoices]

    assert wait_until(
        lambda: OwedEmail.objects.filter(pk__in=[o.pk for o in owed], status=OwedEmail.Status.SENT).count() == 3
    )
    assert wait_until(lambda: len(mailoutbox) == 3)
    assert runs_of(send_owed_emails) == runs_before + 1
    assert runs_of(send_owed_email) == single_before

"""Nothing is lost when the broker is down, and a worker killed mid-send sends once (issue 21).

A gunicorn server publishes owed e-mails on a Redis of the test's own (``CELERY_BROKER_URL``);
real Celery workers (``celery -A config worker``) send them to Django's file backend.

* Redis killed: a webhook that owes an e-mail still commits and answers 200 at once. Nothing
  in the request waits for the broker: ``billing.outbox`` publishes from a thread of the
  process after the commit, and that publish fails (logged) while the debt stays in
  ``OwedEmail``. Once Redis is back, the beat's sweep sends it; Stripe re-sends nothing.
* Redis hung (SIGSTOP: connections accepted, never answered): the same. A publish would
  wait for it for good (kombu retries the connection without limit), but only the
  publishing thread waits, never a request.
* The same for a refund whose invoice only Stripe can name (``STRIPE_API_KEY`` set, Stripe's
  API answered by ``stripe_server.FakeStripe`` in this process): the look-up it asks for after
  commit goes through the same publisher, so the refund is answered at once with Redis hung
  or refused; once Redis is back the look-up happens (the published message, or
  ``sweep_unresolved_payments`` for one whose publish failed) and the refund is counted on
  its invoice, without Stripe re-sending anything.
* A worker's pool process killed mid-send: ``acks_late`` with ``reject_on_worker_lost`` puts
  the message back, another process runs it, and ``deliver`` finds the row still pending (the
  killed transaction was rolled back with its connection): the e-mail goes out once.
* The whole worker killed mid-send: its message stays unacknowledged in Redis; the sweep
  of the next worker sends the still pending e-mail, once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import Invoice, OwedEmail, Payment, StripeEvent
from billing.simulation.delivery import deliver
from billing.simulation.objects import (
    event_object,
    invoice_line_object,
    invoice_object,
    invoice_payment_object,
    refund_object,
)

from .conftest import SECRET
from .processes import (
    app_env,
    celery_worker,
    database_url_of,
    gunicorn,
    kill,
    observed,
    redis_server,
    sent_mail,
    wait_for_owed_emails,
    wait_until,
    webhook_url,
)
from .stripe_server import FakeStripe

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

PROMPT = 2.0  # seconds: what "answers at once" means on this shared 2-core machine


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("broker_down")


@pytest.fixture(scope="module")
def redis(work_dir):
    with redis_server(work_dir) as server:
        yield server


@pytest.fixture(scope="module")
def stripe_api():
    """Stripe's API as a local server of this process; servers and workers call it for real."""
    with FakeStripe() as api:
        yield api


def stripe_env(stripe_api) -> dict[str, str]:
    return {"STRIPE_API_KEY": stripe_api.api_key, "STRIPE_API_BASE": stripe_api.url}


@pytest.fixture(scope="module")
def server(work_dir, redis, stripe_api, django_db_setup):
    """One gunicorn master, two workers, publishing on ``redis`` (it sends no e-mail itself).

    It knows Stripe's API (``stripe_api``): a refund whose invoice it does not know asks Stripe
    after commit. Nothing else that the tests post calls Stripe.
    """
    env = app_env(
        database_url_of(connection.settings_dict), work_dir, broker_url=redis.url(0), **stripe_env(stripe_api)
    )
    with gunicorn(env, work_dir / "gunicorn.log") as running:
        yield running


def worker_env(tmp_path, redis, **extra) -> dict:
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir(exist_ok=True)
    return app_env(database_url_of(connection.settings_dict), mail_dir, broker_url=redis.url(0), **extra)


def receipt_owing_event(n: int) -> tuple[dict, tuple[str, str]]:
    """``invoice.paid`` of a one-off invoice of a new customer: it owes a receipt. And that receipt."""
    created = int(timezone.now().timestamp()) - 60
    invoice_id, number, payer = f"in_broker_{n}", f"BRK-{n:04d}", f"payer{n}@broker.example"
    line = invoice_line_object(
        id=f"il_broker_{n}", invoice=invoice_id, amount=4200, period_start=created, period_end=created
    )
    invoice = invoice_object(
        id=invoice_id,
        customer=f"cus_broker_{n}",
        status="paid",
        billing_reason="manual",
        lines=[line],
        number=number,
        created=created,
        finalized_at=created + 1,
        paid_at=created + 2,
        customer_email=payer,
        attempt_count=1,
    )
    event = event_object(type="invoice.paid", obj=invoice, created=created + 2, id=f"evt_broker_{n}")
    return event, (f"Receipt for invoice {number}", payer)


def post(server, event: dict) -> tuple[int | None, float]:
    """One delivery of ``event`` (no retry): its status and how long the answer took."""
    statuses = []
    started = time.monotonic()
    deliver(webhook_url(server), [event], secret=SECRET, max_rounds=1, on_result=lambda e, s, r: statuses.append(s))
    return statuses[0], time.monotonic() - started


def publish_failures(server) -> int:
    return server.log_path.read_text(errors="replace").count("could not publish")


def test_with_redis_down_the_webhook_commits_at_once_and_the_sweep_sends_later(server, redis, tmp_path):
    env = worker_env(tmp_path, redis)
    with celery_worker("brokerdown", env, tmp_path, beat=True) as worker:
        warm_up, warm_mail = receipt_owing_event(0)  # the server's publisher is connected to Redis
        assert post(server, warm_up)[0] == 200
        wait_for_owed_emails(20)
        failures_before = publish_failures(server)

        redis.stop()
        owing = [receipt_owing_event(n) for n in (1, 2, 3)]
        answers = [post(server, event) for event, _ in owing]

        assert [status for status, _ in answers] == [200, 200, 200]
        assert max(seconds for _, seconds in answers) < PROMPT, answers
        pending = OwedEmail.objects.filter(status=OwedEmail.Status.PENDING)
        assert sorted(pending.values_list("key", flat=True)) == [
            "receipt:in_broker_1",
            "receipt:in_broker_2",
            "receipt:in_broker_3",
        ]
        # The publisher tried, failed and said so; the debts wait in the table meanwhile.
        wait_until(lambda: publish_failures(server) > failures_before, 20, what=server.log_tail)
        time.sleep(3)  # longer than the sweep's delay: nothing can send them while Redis is down
        assert pending.count() == 3
        assert set(sent_mail(tmp_path / "mail")) == {warm_mail}

        redis.start()  # a new, empty Redis: whatever it held is gone
        wait_for_owed_emails(60)
        assert "owed e-mail sweep handed over" in worker.log()

    assert sent_mail(tmp_path / "mail") == {warm_mail: 1, **{mail: 1 for _, mail in owing}}
    # Stripe re-sent nothing: one delivery of each event, applied once.
    assert list(StripeEvent.objects.order_by("id").values_list("status", "attempts")) == [("processed", 1)] * 4
    observed("Redis killed", answers=answers)


def test_with_redis_hung_the_webhook_still_answers_at_once(server, redis, tmp_path):
    env = worker_env(tmp_path, redis)
    with celery_worker("brokerhung", env, tmp_path, beat=True):
        os.kill(redis.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            event, mail = receipt_owing_event(4)
            status, seconds = post(server, event)
            assert (status, seconds < PROMPT) == (200, True), seconds
            time.sleep(1)
            assert OwedEmail.objects.get().status == OwedEmail.Status.PENDING
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        wait_for_owed_emails(60)

    assert sent_mail(tmp_path / "mail") == {mail: 1}
    assert StripeEvent.objects.get().attempts == 1
    observed("Redis hung (SIGSTOP)", status=status, seconds=round(seconds, 3))


def refund_of_an_unknown_invoice(stripe_api, n: int) -> tuple[dict, dict, str]:
    """``invoice.paid`` of a one-off invoice, and ``refund.created`` of the PaymentIntent that paid
    it; and that PaymentIntent. No event ties the two (no ``invoice_payment.paid``): only Stripe's
    InvoicePayments API can, which ``stripe_api`` answers."""
    paid, _ = receipt_owing_event(n)
    invoice_id, created = paid["data"]["object"]["id"], paid["created"]
    payment_intent = f"pi_broker_{n}"
    stripe_api.invoice_payments.append(
        invoice_payment_object(
            id=f"inpay_broker_{n}", invoice=invoice_id, payment_intent=payment_intent, amount_paid=4200, created=created
        )
    )
    obj = refund_object(
        id=f"re_broker_{n}", charge=f"ch_broker_{n}", payment_intent=payment_intent, amount=1500, created=created + 5
    )
    refund = event_object(type="refund.created", obj=obj, created=created + 5, id=f"evt_refund_broker_{n}")
    return paid, refund, payment_intent


@pytest.mark.parametrize("fault", ["hung", "refused"])
def test_a_refund_whose_invoice_only_stripe_knows_is_answered_at_once_with_redis_down(
    server, redis, stripe_api, tmp_path, fault
):
    """The look-up that the refund asks for after commit waits for Redis, never the request."""
    paid, refund, payment_intent = refund_of_an_unknown_invoice(stripe_api, 7 if fault == "hung" else 8)
    invoice_id = paid["data"]["object"]["id"]

    def look_ups() -> int:
        return sum(
            path == "/v1/invoice_payments" and query.get("payment[payment_intent]") == [payment_intent]
            for path, query in list(stripe_api.requests)
        )

    env = worker_env(tmp_path, redis, **stripe_env(stripe_api))
    with celery_worker(f"lookup{fault}", env, tmp_path, beat=True) as worker:
        assert post(server, paid)[0] == 200
        wait_for_owed_emails(20)  # its receipt went out: Redis and the server's publisher work
        failures_before = publish_failures(server)

        if fault == "hung":
            os.kill(redis.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        else:
            redis.stop()
        try:
            status, seconds = post(server, refund)
            assert (status, seconds < PROMPT) == (200, True), seconds
            if fault == "refused":  # the publisher tried, failed and said so
                wait_until(lambda: publish_failures(server) > failures_before, 20, what=server.log_tail)
            time.sleep(3)  # longer than the sweep's delay: no look-up can happen while Redis is down
            payment = Payment.objects.get(payment_intent_id=payment_intent)
            assert (payment.invoice_id, payment.stripe_invoice_id, look_ups()) == (None, "", 0)
        finally:
            if fault == "hung":
                os.kill(redis.proc.pid, signal.SIGCONT)
            else:
                redis.start()  # a new, empty Redis: a message published before the kill is gone

        attached = Payment.objects.filter(payment_intent_id=payment_intent, invoice__stripe_id=invoice_id)
        wait_until(attached.exists, 60, what=worker.log)
        log = worker.log()

    assert Invoice.objects.get(stripe_id=invoice_id).amount_refunded == 1500
    assert look_ups() >= 1
    if fault == "refused":  # its message was never published: the sweep asked
        assert "payment sweep asked Stripe for the invoice of 1 payment(s)" in log
    # Stripe re-sent nothing: one delivery of each event, applied once.
    assert list(StripeEvent.objects.order_by("created").values_list("type", "status", "attempts")) == [
        ("invoice.paid", "processed", 1),
        ("refund.created", "processed", 1),
    ]
    observed(f"Redis {fault}, refund whose invoice only Stripe knows", status=status, seconds=round(seconds, 3))


def held_send(tmp_path, redis, name: str, **extra):
    """A worker whose e-mail backend holds every send while ``<tmp>/hold`` exists."""
    hold = tmp_path / "hold"
    hold.write_text("hold")
    return hold, celery_worker(name, worker_env(tmp_path, redis, FAULTS_MAIL_HOLD=str(hold), **extra), tmp_path)


def sending_pid(hold) -> int:
    found = []
    wait_until(lambda: found.extend(hold.parent.glob(f"{hold.name}.*")) or found, 30)
    return int(found[0].name.rsplit(".", 1)[1])


def test_a_pool_process_killed_mid_send_sends_the_email_once(server, redis, tmp_path):
    """No sweep runs here (no beat): only the message put back by ``reject_on_worker_lost`` can send it."""
    hold, worker_running = held_send(tmp_path, redis, "killchild")
    with worker_running as worker:
        event, mail = receipt_owing_event(5)
        assert post(server, event)[0] == 200
        pid = sending_pid(hold)
        assert pid in worker.pool_pids()  # a pool process, inside deliver(), holding the row

        kill(pid)
        hold.unlink()
        wait_for_owed_emails(30)
        log = worker.log()

    assert "WorkerLostError" in log  # the message was put back and run again
    owed = OwedEmail.objects.get()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.SENT, 1)
    assert sent_mail(tmp_path / "mail") == {mail: 1}
    observed("Celery pool process SIGKILLed mid-send", redelivered=log.count("WorkerLostError") > 0)


def test_a_worker_killed_whole_mid_send_leaves_the_email_to_the_sweep(server, redis, tmp_path):
    hold, worker_running = held_send(tmp_path, redis, "killnode")
    with worker_running as worker:
        event, mail = receipt_owing_event(6)
        assert post(server, event)[0] == 200
        sending_pid(hold)
        os.killpg(worker.proc.pid, signal.SIGKILL)  # the master and its pool at once
        worker.proc.wait(10)
    hold.unlink()
    owed = OwedEmail.objects.get()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.PENDING, 0)  # the killed send left no trace

    with celery_worker("sweeper", worker_env(tmp_path, redis), tmp_path, beat=True) as sweeper:
        wait_for_owed_emails(30)
        assert "owed e-mail sweep handed over 1" in sweeper.log()

    assert sent_mail(tmp_path / "mail") == {mail: 1}
    owed.refresh_from_db()
    assert (owed.status, owed.attempts) == (OwedEmail.Status.SENT, 1)
    observed("Celery worker SIGKILLed whole mid-send", left_pending=True, sent_by="the next worker's sweep")

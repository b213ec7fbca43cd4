"""What a committed change owes the world: e-mails, and the Celery tasks that act on them.

``owe_email`` is called by services inside the handler's transaction. It records the debt
(``OwedEmail``, unique by key: a receipt is owed once per invoice, however often
``invoice.paid`` is delivered) and asks for the sending task only once that transaction has
committed. If the task is lost (broker down, process killed between commit and send), the
debt is still in the table and the sweep sends it: with a broker, Celery beat runs
``billing.tasks.sweep_owed_emails``; without one, ``start_in_process_sweeper`` runs the same
sweep in a daemon thread of the web process.

Every task a request asks for goes through ``run_after_commit``, so no request ever waits for
the broker. With a broker, the committed items are not published by the request that asked:
a daemon thread of the process (``_Publisher``) collects them for
``BILLING_OUTBOX_PUBLISH_WINDOW`` seconds and publishes one batch task per kind (owed e-mails:
``send_owed_emails``; invoice look-ups of refunded payments: ``resolve_payment_invoices``).
Publishing a Celery message costs the web process about half a millisecond of CPU, as much as
two SQL statements; under load one message carries the items of many requests. A broker that
refuses connections makes the publish fail after about 0.6 s, one that hangs makes it wait
without limit: either way only that thread waits, and what it could not publish is still in
the database for a sweep (``sweep_owed_emails``, ``sweep_unresolved_payments``). Items still
waiting when the process ends are published at exit; if the process is killed, the sweeps
recover them, as for any lost task. Without a broker the task runs in the request after
commit, as before.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from . import sql
from .emails import invoice_label
from .models import Invoice, OwedEmail
from .tasks import WAITING_FOR_RECIPIENT

logger = logging.getLogger(__name__)


def run_after_commit(task, item, *, batch_task) -> None:
    """Run ``task(item)`` once the current transaction commits, without any request waiting for the broker.

    Without a broker (tasks eager) ``task`` runs in this process right after the commit. With
    one, the publisher's thread publishes ``batch_task([item, ...])``, a task that does for each
    item what ``task`` does, with the other items committed in its window.
    """
    if task.app.conf.task_always_eager:
        transaction.on_commit(lambda: task.delay(item), robust=True)
    else:
        transaction.on_commit(lambda: publisher.add(batch_task, item), robust=True)


def owe_email(kind: str, *, key: str, account, invoice=None, subscription=None, requested_by=None) -> OwedEmail | None:
    """Record that ``kind`` is owed (once per ``key``); send it after commit. None if already owed.

    ``requested_by``: the user who asked for it (``resend_receipt``); None when an event owes it.
    """
    owed = OwedEmail(
        key=key, kind=kind, account=account, invoice=invoice, subscription=subscription, requested_by=requested_by
    )
    if not sql.create_with_history(owed, reason=None, unless_exists=["key"]):
        return None  # owed already: a duplicate delivery, or a concurrent one that committed first
    _send_after_commit(owed.pk)
    return owed


def send_emails_waiting_for_a_recipient(account) -> int:
    """The account's e-mails that had nobody to go to are due now: its address is known.

    Called inside the transaction that gave the account its billing e-mail (``lock_account``);
    they are sent once it commits, whatever their backoff. That is every pending e-mail of the
    account that found no recipient, and every one not tried yet: one may be being tried at
    this moment by a worker that read the account as it was before this transaction, and finds
    nobody. Trying it again after the commit costs nothing (``deliver`` sends once). One that
    failed at the mail server keeps its backoff. The number of e-mails made due.
    """
    waiting = OwedEmail.objects.filter(account=account, status=OwedEmail.Status.PENDING).filter(
        Q(last_error__startswith=WAITING_FOR_RECIPIENT) | Q(attempts=0)
    )
    ids = list(waiting.values_list("pk", flat=True))
    for owed_id in ids:
        _send_after_commit(owed_id)
    return len(ids)


def _send_after_commit(owed_id: int) -> None:
    from .tasks import send_owed_email, send_owed_emails

    run_after_commit(send_owed_email, owed_id, batch_task=send_owed_emails)


class ReceiptNotResent(Exception):
    """The receipt cannot be sent again now; the message says why, for support."""


def resend_receipt(invoice: Invoice, *, requested_by) -> OwedEmail:
    """Owe ``invoice``'s receipt once more because ``requested_by`` asked: the only way a receipt
    is sent twice.

    The copy is an owed e-mail of its own, ``receipt:<invoice id>:resend:<n>`` naming who asked,
    recorded and sent like every other (``owe_email``: the task after commit, or the sweep).
    Refused (``ReceiptNotResent``) for an invoice that is not paid or paid nothing, and while a
    receipt of it is still waiting to be sent: a second one would go out with it. Two requests
    at the same moment (a double click) compute the same key: the second is refused.
    """
    if invoice.status != Invoice.Status.PAID or invoice.total <= 0:
        raise ReceiptNotResent(f"Invoice {invoice_label(invoice)} is not a paid invoice: it has no receipt.")
    receipts = OwedEmail.objects.filter(invoice=invoice, kind=OwedEmail.Kind.RECEIPT)
    waiting = receipts.filter(status=OwedEmail.Status.PENDING).first()
    if waiting is not None:
        raise ReceiptNotResent(
            f"A receipt of invoice {invoice_label(invoice)} is still waiting to be sent "
            f"(owed e-mail {waiting.pk}): use Send now on it instead."
        )
    prefix = f"receipt:{invoice.stripe_id}:resend:"
    with transaction.atomic():
        copy = receipts.filter(key__startswith=prefix).count() + 1
        owed = owe_email(
            OwedEmail.Kind.RECEIPT,
            key=f"{prefix}{copy}",
            account=invoice.account,
            invoice=invoice,
            requested_by=requested_by,
        )
    if owed is None:
        raise ReceiptNotResent(
            f"Someone asked to resend the receipt of invoice {invoice_label(invoice)} at the same "
            "moment: that copy is on its way, and no second one was owed."
        )
    return owed


class _Publisher:
    """Items of batch tasks that transactions of this process committed, published by a daemon thread.

    ``add(batch_task, item)`` queues ``item``; ``BILLING_OUTBOX_PUBLISH_WINDOW`` seconds after
    the first one the thread publishes ``batch_task.delay(items)`` for each batch task that has
    items. No request ever talks to the broker.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict = {}  # batch task -> items committed since the last publish
        self._wake = threading.Event()
        self._pid = None  # the process whose thread runs (a forked worker starts its own)

    def add(self, batch_task, item) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._waiting = {}  # what the parent had waiting is the parent's to publish
                threading.Thread(target=self._run, name="outbox-publisher", daemon=True).start()
            self._waiting.setdefault(batch_task, []).append(item)
        self._wake.set()

    def flush(self) -> int:
        """Publish what waits now, in this thread; the number of items published."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            self._wake.clear()
        published = 0
        for batch_task, items in waiting.items():
            try:
                batch_task.delay(items)
            except Exception:  # noqa: BLE001 - the broker is down: the items wait in the database for a sweep
                logger.warning(
                    "could not publish %s of %d item(s); a sweep will recover them",
                    batch_task.name,
                    len(items),
                    exc_info=True,
                )
            else:
                published += len(items)
        return published

    def _run(self) -> None:  # pragma: no cover - timing is exercised by the worker tests
        while True:
            self._wake.wait()
            time.sleep(settings.BILLING_OUTBOX_PUBLISH_WINDOW)
            self.flush()


publisher = _Publisher()
atexit.register(lambda: publisher._pid == os.getpid() and publisher.flush())


_sweeper_started = False
_sweeper_lock = threading.Lock()


def start_in_process_sweeper() -> bool:
    """Start the in-process sweep thread once per process, when there is no broker/beat."""
    global _sweeper_started
    if not settings.BILLING_INPROCESS_SWEEP:
        return False
    with _sweeper_lock:
        if _sweeper_started:
            return False
        _sweeper_started = True
    thread = threading.Thread(target=_sweep_forever, name="owed-email-sweeper", daemon=True)
    thread.start()
    return True


def _sweep_forever():  # pragma: no cover - exercised by running the server
    """Beat's schedule, in a thread: owed e-mails every sweep interval, and the payments whose
    invoice look-up was lost as often as beat does it (``CELERY_BEAT_SCHEDULE``)."""
    from django.db import close_old_connections

    from .tasks import sweep_owed_emails, sweep_unresolved_payments

    payments_every = settings.CELERY_BEAT_SCHEDULE["sweep-unresolved-payments"]["schedule"].total_seconds()
    payments_due = time.monotonic() + payments_every
    while True:
        time.sleep(settings.BILLING_OUTBOX_SWEEP_INTERVAL)
        try:
            close_old_connections()
            sweep_owed_emails()
            if time.monotonic() >= payments_due:
                payments_due = time.monotonic() + payments_every
                sweep_unresolved_payments()
        except Exception:  # noqa: BLE001 - the sweeper must outlive a bad pass
            logger.exception("in-process sweep failed")
        finally:
            close_old_connections()

"""E-mails the app owes, recorded in the same transaction as the change that owes them.

``owe_email`` is called by services inside the handler's transaction. It records the debt
(``OwedEmail``, unique by key: a receipt is owed once per invoice, however often
``invoice.paid`` is delivered) and asks for the sending task only once that transaction has
committed. If the task is lost (broker down, process killed between commit and send), the
debt is still in the table and the sweep sends it: with a broker, Celery beat runs
``billing.tasks.sweep_owed_emails``; without one, ``start_in_process_sweeper`` runs the same
sweep in a daemon thread of the web process.

With a broker, the committed ids are not published by the request that owed them: a daemon
thread of the process (``_Publisher``) collects them for ``BILLING_OUTBOX_PUBLISH_WINDOW``
seconds and publishes one ``send_owed_emails`` task per batch. Publishing a Celery message
costs the web process about half a millisecond of CPU, as much as two SQL statements; under
load one message now carries the e-mails of many requests, and no response waits for the
broker. Ids still waiting when the process ends are published at exit; if the process is
killed, the sweep sends them, as for any lost task. Without a broker the task runs in the
request after commit, as before.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

from django.conf import settings
from django.db import transaction

from . import sql
from .models import OwedEmail

logger = logging.getLogger(__name__)


def owe_email(kind: str, *, key: str, account, invoice=None, subscription=None) -> OwedEmail | None:
    """Record that ``kind`` is owed (once per ``key``); send it after commit. None if already owed."""
    from .tasks import send_owed_email

    owed = OwedEmail(key=key, kind=kind, account=account, invoice=invoice, subscription=subscription)
    if not sql.create_with_history(owed, reason=None, unless_exists=["key"]):
        return None  # owed already: a duplicate delivery, or a concurrent one that committed first

    if send_owed_email.app.conf.task_always_eager:
        transaction.on_commit(lambda: send_owed_email.delay(owed.pk), robust=True)
    else:
        transaction.on_commit(lambda: publisher.add(owed.pk), robust=True)
    return owed


class _Publisher:
    """Owed e-mail ids committed in this process, published in batches by a daemon thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._wake = threading.Event()
        self._pid = None  # the process whose thread runs (a forked worker starts its own)

    def add(self, owed_id: int) -> None:
        with self._lock:
            self._ids.append(owed_id)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._ids = [owed_id]  # what the parent had waiting is the parent's to publish
                threading.Thread(target=self._run, name="owed-email-publisher", daemon=True).start()
        self._wake.set()

    def flush(self) -> int:
        """Publish what waits now, in this thread; the number of ids published."""
        from .tasks import send_owed_emails

        with self._lock:
            ids, self._ids = self._ids, []
            self._wake.clear()
        if not ids:
            return 0
        try:
            send_owed_emails.delay(ids)
        except Exception:  # noqa: BLE001 - the broker is down: the debts stay for the sweep
            logger.warning("could not publish %d owed e-mail(s); the sweep will send them", len(ids), exc_info=True)
            return 0
        return len(ids)

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
    import time

    from django.db import close_old_connections

    from .tasks import sweep_owed_emails

    while True:
        time.sleep(settings.BILLING_OUTBOX_SWEEP_INTERVAL)
        try:
            close_old_connections()
            sweep_owed_emails()
        except Exception:  # noqa: BLE001 - the sweeper must outlive a bad pass
            logger.exception("owed e-mail sweep failed")
        finally:
            close_old_connections()

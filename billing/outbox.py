"""E-mails the app owes, recorded in the same transaction as the change that owes them.

``owe_email`` is called by services inside the handler's transaction. It records the debt
(``OwedEmail``, unique by key: a receipt is owed once per invoice, however often
``invoice.paid`` is delivered) and asks for the sending task only once that transaction has
committed. If the task is lost (broker down, process killed between commit and send), the
debt is still in the table and the sweep sends it: with a broker, Celery beat runs
``billing.tasks.sweep_owed_emails``; without one, ``start_in_process_sweeper`` runs the same
sweep in a daemon thread of the web process.
"""
from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import transaction

from .models import OwedEmail

logger = logging.getLogger(__name__)


def owe_email(kind: str, *, key: str, account, invoice=None, subscription=None) -> OwedEmail | None:
    """Record that ``kind`` is owed (once per ``key``); send it after commit. None if already owed."""
    from . import sql
    from .tasks import send_owed_email

    owed = sql.table(OwedEmail).insert(
        {
            "key": key,
            "kind": kind,
            "account_id": account.pk,
            "invoice_id": invoice.pk if invoice is not None else None,
            "subscription_id": subscription.pk if subscription is not None else None,
        },
        on_conflict=["key"],
    )
    if owed is None:
        return None  # owed already: a duplicate delivery, or a concurrent one that committed first

    transaction.on_commit(lambda: send_owed_email.delay(owed.pk), robust=True)
    return owed


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

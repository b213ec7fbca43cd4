"""``GET /healthz``: does the database answer, and is anything stuck?

For a load balancer or an uptime check: 200 with the figures below when the database answers,
503 when it does not (the app can do nothing useful without it). The figures are for an
operator's monitoring, not reasons to fail the check: a failed event waits for an operator
(the admin's re-process, ``manage.py reprocess_stripe_events``), not for a restart.

Each figure is one indexed query, cheap however many events the inbox holds: failed and
received events are read from the partial index ``stripeevent_unsettled`` (status, created),
which holds only those rows, and owed e-mails from the index on ``OwedEmail.status``.
No authentication, and nothing in the answer that is secret or names a customer.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import Error as DatabaseError
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .models import StripeEvent
from .tasks import due_for_sweep

logger = logging.getLogger(__name__)


def failed_events() -> int:
    """Events whose handler failed and that no retry has applied since."""
    return StripeEvent.objects.filter(status=StripeEvent.Status.FAILED).count()


def oldest_unprocessed_event_age(now) -> int | None:
    """Seconds since Stripe created the oldest event still ``received`` (stored, never applied)."""
    created = (
        StripeEvent.objects.filter(status=StripeEvent.Status.RECEIVED)
        .order_by("created")
        .values_list("created", flat=True)
        .first()
    )
    return None if created is None else max(0, int((now - created).total_seconds()))


def overdue_owed_emails(now) -> int:
    """Owed e-mails due for the sweep a whole sweep interval ago: it should have sent them.

    Due is the sweep's own rule (``billing.tasks.due_for_sweep``), so an e-mail waiting for its
    recipient or backing off after a failure is not overdue before the sweep would try it.
    """
    return due_for_sweep(now - timedelta(seconds=settings.BILLING_OUTBOX_SWEEP_INTERVAL)).count()


def status() -> dict:
    """The figures of a healthy answer; raises ``django.db.Error`` when the database does not answer."""
    now = timezone.now()
    return {
        "status": "ok",
        "database": "ok",
        "failed_events": failed_events(),
        "oldest_unprocessed_event_age_seconds": oldest_unprocessed_event_age(now),
        "overdue_owed_emails": overdue_owed_emails(now),
    }


@never_cache
@require_safe
def healthz(request):
    try:
        body = status()
    except DatabaseError as exc:
        # The exception's text can name the host, port and user: only its class is logged.
        logger.warning("health check: the database did not answer (%s)", type(exc).__name__)
        return JsonResponse({"status": "unavailable", "database": "unreachable"}, status=503)
    return JsonResponse(body)

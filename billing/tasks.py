"""Celery tasks: send what ``billing.outbox`` recorded as owed, once, and never lose it.

``send_owed_email`` is enqueued by ``owe_email`` once the transaction that owed the e-mail has
committed (with a broker, in batches: ``send_owed_emails``, see ``billing.outbox``). It is
idempotent: it locks the ``OwedEmail`` row (``FOR UPDATE SKIP LOCKED``) only while it is still
``pending``, sends, and marks it ``sent`` in the same transaction, so a second
run, a duplicate message or a concurrent run of the sweep finds nothing to do. (The one window
left is a crash between the SMTP server accepting the message and the commit: the row is still
pending and the e-mail goes out again. No mail system offers better than that.)

A mail error (connection refused, timeout, SMTP 4xx/5xx) is recorded on the row (``attempts``,
``last_error``) and committed; the e-mail stays ``pending``:

- with a broker, the task retries itself with exponential backoff (``retry_delay``);
- without one (``CELERY_TASK_ALWAYS_EAGER``, the task ran inside the web request after commit),
  it does not retry inline, which would hold up the response: the sweep picks it up.

``sweep_owed_emails`` (Celery beat; without a broker, the thread of
``billing.outbox.start_in_process_sweeper``) delivers every pending e-mail that is due: never
tried and older than ``BILLING_OUTBOX_SWEEP_AFTER`` (its task was lost: broker down, process
killed between commit and send), or tried and past its backoff. After ``MAX_ATTEMPTS`` failed
attempts the row is ``failed`` for staff to look at, so a dead address does not loop forever.

An e-mail that nobody can receive *yet* (``NoRecipient``: no customer e-mail on its invoice, no
billing e-mail on the account, no owner or admin with an address) is not a failure. Stripe
delivers in any order: ``customer.subscription.trial_will_end`` can come before every event
that tells the account its address, and in-order delivery would have sent the reminder. So it
stays ``pending`` (outcome ``waiting``), tried again on the same backoff, every ``RETRY_CAP``
once past ``MAX_ATTEMPTS``; the event that gives the account its billing e-mail makes it due at
once (``billing.services.locks.lock_account``). It is given up only when it still has nobody to
go to ``BILLING_OUTBOX_RECIPIENT_WAIT`` (default 3 days) after it was owed. Why that bound:
Stripe retries an undelivered event for up to three days
(https://docs.stripe.com/webhooks#retries), so by then every event that could carry the
address has been applied or abandoned by Stripe itself, and waiting longer cannot make the
outcome match in-order delivery. ``MAX_ATTEMPTS`` (about 45 minutes) would be too short: the
address may come with an event whose first deliveries failed, and Stripe's retries of one event
are hours apart.

Logs carry ids, kinds and exception types only: never addresses or message bodies.
"""

from __future__ import annotations

import logging
import smtplib
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import DurationField, ExpressionWrapper, F, Q
from django.utils import timezone

from .emails import NoRecipient, build_message
from .models import OwedEmail, Payment

logger = logging.getLogger(__name__)

# Attempts (by the task, its retries and the sweep together) before an e-mail is given up.
MAX_ATTEMPTS = 8
# Wait after the n-th failed attempt: 1, 2, 4, 8 minutes, then 10 minutes; about 45 minutes
# from the first failure to giving up.
RETRY_BASE = timedelta(minutes=1)
RETRY_CAP = timedelta(minutes=10)
# Rows handed out by one sweep pass; the next pass takes the rest.
SWEEP_BATCH = 500
# How the ``last_error`` of an e-mail waiting for its recipient starts (``_record_wait``).
WAITING_FOR_RECIPIENT = NoRecipient.__name__
MAX_ERROR_CHARS = 2000
# What a mail backend raises when the mail server is unreachable or refuses. SMTPException and
# ConnectionError are OSErrors; they are named for the reader.
MAIL_ERRORS = (smtplib.SMTPException, ConnectionError, TimeoutError, OSError)


class Outcome(StrEnum):
    SENT = "sent"
    SKIPPED = "skipped"  # not pending any more (sent, failed, gone) or being sent by another run
    RETRY = "retry"  # this attempt failed; still pending
    WAITING = "waiting"  # nobody to send it to yet; still pending
    FAILED = "failed"  # given up: MAX_ATTEMPTS reached, or nobody to send it to for BILLING_OUTBOX_RECIPIENT_WAIT


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    attempts: int = 0


def retry_delay(attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed attempt (exponential, capped)."""
    return min(RETRY_BASE * 2 ** max(attempts - 1, 0), RETRY_CAP)


def deliver(owed_id: int) -> Delivery:
    """Send owed e-mail ``owed_id`` if it is still pending and nobody else is sending it.

    The row stays locked from the check to the ``sent`` mark, and the mark commits with the
    invoice's ``receipt_sent_at``. A failed attempt is recorded in the same transaction, which
    then commits normally: the record of a failure is never rolled back with it. An e-mail that
    has waited for its recipient and now has one starts its count of attempts afresh: the
    waits were not attempts at sending, and ``MAX_ATTEMPTS`` is about a failing mail server.
    """
    with transaction.atomic():
        owed = (
            OwedEmail.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("account", "invoice", "subscription")
            .filter(pk=owed_id, status=OwedEmail.Status.PENDING)
            .first()
        )
        if owed is None:
            return Delivery(Outcome.SKIPPED)
        try:
            message = build_message(owed)
            if owed.last_error.startswith(WAITING_FOR_RECIPIENT):
                owed.attempts = 0  # its wait is over
            message.send()
        except NoRecipient as exc:
            return _record_wait(owed, exc)
        except DatabaseError:
            raise  # the transaction is broken; the row stays pending and the sweep tries again
        except MAIL_ERRORS as exc:
            return _record_failure(owed, exc)
        except Exception as exc:  # noqa: BLE001 - a bug (a template, a missing row) counts as an attempt too
            logger.exception("owed e-mail %s (%s) could not be built or sent", owed.pk, owed.kind)
            return _record_failure(owed, exc)
        _mark_sent(owed)
    logger.info("owed e-mail %s (%s) sent", owed.pk, owed.kind)
    return Delivery(Outcome.SENT, owed.attempts)


def _mark_sent(owed: OwedEmail) -> None:
    now = timezone.now()
    owed.status = OwedEmail.Status.SENT
    owed.sent_at = now
    owed.attempts += 1
    owed.last_error = ""
    owed.save(update_fields=["status", "sent_at", "attempts", "last_error"])
    if owed.kind == OwedEmail.Kind.RECEIPT and owed.invoice is not None:
        invoice = owed.invoice
        invoice.receipt_sent_at = now
        invoice._change_reason = f"receipt sent (owed e-mail {owed.pk})"
        invoice.save(update_fields=["receipt_sent_at", "updated_at"])


def _record_wait(owed: OwedEmail, exc: NoRecipient) -> Delivery:
    """Nobody to send ``owed`` to yet: it stays pending, unless it has waited ``BILLING_OUTBOX_RECIPIENT_WAIT``."""
    if owed.created_at <= timezone.now() - settings.BILLING_OUTBOX_RECIPIENT_WAIT:
        return _record_failure(owed, exc, give_up=True)
    owed.attempts += 1
    owed.last_error = _error_text(exc)
    owed.save(update_fields=["attempts", "last_error"])
    logger.info("owed e-mail %s (%s) waits for a recipient (attempt %d)", owed.pk, owed.kind, owed.attempts)
    return Delivery(Outcome.WAITING, owed.attempts)


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def _record_failure(owed: OwedEmail, exc: Exception, *, give_up: bool = False) -> Delivery:
    owed.attempts += 1
    owed.last_error = _error_text(exc)
    give_up = give_up or owed.attempts >= MAX_ATTEMPTS
    if give_up:
        owed.status = OwedEmail.Status.FAILED
    owed.save(update_fields=["attempts", "last_error", "status"])
    if give_up:
        logger.error(
            "owed e-mail %s (%s) given up after %d attempt(s): %s",
            owed.pk,
            owed.kind,
            owed.attempts,
            type(exc).__name__,
        )
        return Delivery(Outcome.FAILED, owed.attempts)
    logger.warning("owed e-mail %s (%s) attempt %d failed: %s", owed.pk, owed.kind, owed.attempts, type(exc).__name__)
    return Delivery(Outcome.RETRY, owed.attempts)


@shared_task(bind=True, max_retries=MAX_ATTEMPTS, ignore_result=True)
def send_owed_email(self, owed_id: int) -> str:
    """Send one owed e-mail (see ``deliver``); retry with backoff when a broker runs the task.

    One that waits for its recipient is not retried by the task: the sweep tries it again on
    its backoff, and the account's learning its address makes it due at once.
    """
    delivery = deliver(owed_id)
    if delivery.outcome == Outcome.RETRY and not (self.request.is_eager or self.request.called_directly):
        raise self.retry(countdown=retry_delay(delivery.attempts).total_seconds())
    return delivery.outcome.value


@shared_task(ignore_result=True)
def send_owed_emails(owed_ids: list[int]) -> dict[str, int]:
    """Send a batch of owed e-mails (``billing.outbox`` publishes one per batch of commits).

    Each is delivered as ``send_owed_email`` would; one that fails gets a ``send_owed_email``
    task of its own, due after its backoff, so a bad address never holds up the others.
    """
    outcomes: dict[str, int] = {}
    for owed_id in owed_ids:
        delivery = deliver(owed_id)
        if delivery.outcome == Outcome.RETRY:
            send_owed_email.apply_async((owed_id,), countdown=retry_delay(delivery.attempts).total_seconds())
        outcomes[delivery.outcome.value] = outcomes.get(delivery.outcome.value, 0) + 1
    return outcomes


def due_for_sweep(now=None):
    """Pending e-mails whose next attempt is due, oldest first.

    Never tried: older than ``BILLING_OUTBOX_SWEEP_AFTER`` (the on-commit task normally wins).
    Tried ``n`` times: older than that plus the backoff of its ``n`` failures, so that without a
    broker the sweep spaces the attempts out as the task's own retries would. The schedule is
    counted from ``created_at``: the row has no time of its last attempt. Past ``MAX_ATTEMPTS``
    only an e-mail waiting for its recipient can still be pending: it is due every ``RETRY_CAP``.
    """
    now = now or timezone.now()
    wait = settings.BILLING_OUTBOX_SWEEP_AFTER
    due = Q()
    for attempts in range(MAX_ATTEMPTS):
        due |= Q(attempts=attempts, created_at__lte=now - wait)
        wait += retry_delay(attempts + 1)
    waits_past_max = ExpressionWrapper(RETRY_CAP * (F("attempts") - MAX_ATTEMPTS), output_field=DurationField())
    due |= Q(attempts__gte=MAX_ATTEMPTS, created_at__lte=now - wait - waits_past_max)
    return OwedEmail.objects.filter(due, status=OwedEmail.Status.PENDING).order_by("created_at", "pk")


@shared_task(ignore_result=True)
def sweep_owed_emails() -> int:
    """Hand every due owed e-mail to delivery; the number handed over.

    With a broker each row gets its own ``send_owed_email`` task (a slow mail server then does
    not hold up the beat's worker); without one they are delivered here, one transaction each.
    """
    ids = list(due_for_sweep().values_list("pk", flat=True)[:SWEEP_BATCH])
    inline = send_owed_email.app.conf.task_always_eager
    for owed_id in ids:
        if inline:
            deliver(owed_id)
        else:
            send_owed_email.delay(owed_id)
    if ids:
        logger.info("owed e-mail sweep handed over %d e-mail(s)%s", len(ids), " inline" if inline else "")
    return len(ids)


# --- Refunds whose invoice only Stripe knows ---------------------------------------------------

# How long after a payment was first seen the sweep keeps asking Stripe for its invoice. A
# look-up is lost only with its message (broker down, process killed after the commit), and the
# sweep, every 5 minutes, asks again; the bound stops it asking, at most 864 times, about a
# PaymentIntent that paid no invoice (Stripe answers "none" for it forever). Three days, like
# Stripe's own retries of an event (https://docs.stripe.com/webhooks#retries).
PAYMENT_LOOKUP_WINDOW = timedelta(days=3)


def unresolved_payments(now=None):
    """Payments whose invoice only Stripe can name, oldest first.

    The ones ``billing.services.payments.recompute_refunded`` asks Stripe about after commit: no
    invoice, no invoice id, a real PaymentIntent (not ``charge:<id>``). Older than
    ``BILLING_OUTBOX_SWEEP_AFTER`` (the look-up asked after commit normally wins) and first seen
    less than ``PAYMENT_LOOKUP_WINDOW`` ago.
    """
    now = now or timezone.now()
    return (
        Payment.objects.filter(
            invoice=None,
            stripe_invoice_id="",
            created_at__lte=now - settings.BILLING_OUTBOX_SWEEP_AFTER,
            created_at__gt=now - PAYMENT_LOOKUP_WINDOW,
        )
        .exclude(payment_intent_id__startswith="charge:")
        .order_by("created_at", "pk")
    )


@shared_task(ignore_result=True)
def sweep_unresolved_payments() -> int:
    """Ask Stripe again for the invoice of every unresolved payment (Celery beat); the number asked.

    Recovers the look-ups whose message was lost, as ``sweep_owed_emails`` does for e-mails.
    """
    if not settings.STRIPE_API_KEY:
        return 0
    payment_intent_ids = list(unresolved_payments().values_list("payment_intent_id", flat=True)[:SWEEP_BATCH])
    for payment_intent_id in payment_intent_ids:
        resolve_payment_invoice.delay(payment_intent_id)
    if payment_intent_ids:
        logger.info("payment sweep asked Stripe for the invoice of %d payment(s)", len(payment_intent_ids))
    return len(payment_intent_ids)


@shared_task(ignore_result=True)
def resolve_payment_invoices(payment_intent_ids: list[str]) -> None:
    """The look-ups that one web process's commits asked for within one publishing window
    (``billing.outbox``): one ``resolve_payment_invoice`` each, so that each retries on its own."""
    for payment_intent_id in payment_intent_ids:
        resolve_payment_invoice.delay(payment_intent_id)


@shared_task(
    bind=True,
    autoretry_for=(OSError,),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=6,
    ignore_result=True,
)
def resolve_payment_invoice(self, payment_intent_id: str) -> str | None:
    """Ask Stripe which invoice a refunded PaymentIntent paid, and count the refund on it.

    Since API version 2025-03-31.basil a charge no longer names its invoice. Usually an
    ``invoice_payment.paid`` event has told us already; when it has not (it was lost, or it
    predates the endpoint's subscription to that event type), the InvoicePayments API answers.
    Runs after the webhook's commit: handlers never call Stripe.
    """
    import stripe

    from . import stripe_api
    from .services.locks import lock_invoice
    from .services.payments import recompute_refunded

    if not settings.STRIPE_API_KEY:
        return None
    try:
        invoice_id = stripe_api.invoice_for_payment_intent(payment_intent_id)
    except stripe.APIConnectionError as exc:
        if settings.CELERY_TASK_ALWAYS_EAGER:
            logger.warning("could not ask Stripe for the invoice of %s: %s", payment_intent_id, type(exc).__name__)
            return None
        raise self.retry(exc=exc) from exc
    if not invoice_id:
        return None
    with transaction.atomic():
        lock_invoice(invoice_id)  # before the payment's row, as every payment writer does
        payment = Payment.objects.select_for_update().filter(payment_intent_id=payment_intent_id).first()
        if payment is None or payment.invoice_id is not None:
            return invoice_id
        payment.stripe_invoice_id = invoice_id
        payment.save(update_fields=["stripe_invoice_id", "updated_at"])
        recompute_refunded(payment)
    return invoice_id

"""The e-mails the app owes, as messages: who receives them and what they say.

A message is built from the rows as they are when it is *sent*, not when it was owed: the
task runs after the webhook's commit (or, after an outage, from the sweep), so a receipt shows
the invoice's number and hosted link even if ``invoice.finalized`` was delivered late.

Every message has a plain-text body and an HTML alternative rendered from
``billing/templates/billing/email/<kind>.{txt,html}``. The HTML templates autoescape; the text
templates turn autoescaping off, since plain text has nothing to escape.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string

from provisioning.models import Membership

from .models import Invoice, OwedEmail
from .money import format_amount


class NoRecipient(Exception):
    """Nobody to send an owed e-mail to yet: it waits for an address (see ``billing.tasks``)."""


def long_date(value: datetime) -> str:
    """``"March 5, 2026"``: the UTC date, whatever timezone is active (Stripe's times are UTC)."""
    utc = value.astimezone(UTC)
    return f"{utc:%B} {utc.day}, {utc.year}"


def service_period(invoice: Invoice) -> str:
    """``"March 1, 2026 – April 1, 2026"``, or "" for an invoice without a subscription line."""
    if invoice.period_start is None or invoice.period_end is None:
        return ""
    return f"{long_date(invoice.period_start)} – {long_date(invoice.period_end)}"


def invoice_label(invoice: Invoice) -> str:
    """The number people see; Stripe's id until the invoice is finalized and numbered."""
    return invoice.number or invoice.stripe_id


def recipients(owed: OwedEmail) -> list[str]:
    """Where ``owed`` goes: the invoice's customer e-mail, else the account's billing e-mail,
    else every active owner and admin of the account."""
    if owed.invoice is not None and owed.invoice.customer_email:
        return [owed.invoice.customer_email]
    if owed.account.billing_email:
        return [owed.account.billing_email]
    emails = (
        Membership.objects.filter(
            account_id=owed.account_id,
            role__in=[Membership.Role.OWNER, Membership.Role.ADMIN],
            user__is_active=True,
        )
        .exclude(user__email="")
        .order_by("user__email")
        .values_list("user__email", flat=True)
        .distinct()
    )
    return list(emails)


def subject(owed: OwedEmail) -> str:
    """The subjects the design names, exactly."""
    if owed.kind == OwedEmail.Kind.RECEIPT:
        return f"Receipt for invoice {invoice_label(owed.invoice)}"
    if owed.kind == OwedEmail.Kind.PAYMENT_FAILED:
        return f"Payment failed for invoice {invoice_label(owed.invoice)}"
    if owed.kind == OwedEmail.Kind.TRIAL_WILL_END:
        return f"Your trial ends on {long_date(_trial_end(owed))}"
    raise ValueError(f"owed e-mail {owed.pk} has an unknown kind {owed.kind!r}")


def build_message(owed: OwedEmail) -> EmailMultiAlternatives:
    """The message ``owed`` stands for, ready for ``send()``; ``NoRecipient`` if nobody can get it."""
    to = recipients(owed)
    if not to:
        raise NoRecipient(
            f"account {owed.account_id} has no invoice e-mail, no billing e-mail and no owner or admin with an e-mail"
        )
    context = _context(owed)
    template = f"billing/email/{owed.kind}"
    message = EmailMultiAlternatives(
        subject=subject(owed),
        body=render_to_string(f"{template}.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=to,
    )
    message.attach_alternative(render_to_string(f"{template}.html", context), "text/html")
    return message


def _context(owed: OwedEmail) -> dict:
    context = {"account_name": owed.account.name}
    invoice = owed.invoice
    if invoice is not None:
        context.update(
            invoice_number=invoice_label(invoice),
            total=format_amount(invoice.total, invoice.currency),
            amount_paid=format_amount(invoice.amount_paid, invoice.currency),
            # Only worth a line of its own when it differs from the total (credit balance, discounts).
            show_amount_paid=invoice.amount_paid != invoice.total,
            amount_due=format_amount(invoice.amount_due, invoice.currency),
            service_period=service_period(invoice),
            paid_on=long_date(invoice.paid_at) if invoice.paid_at else "",
            hosted_invoice_url=invoice.hosted_invoice_url,
            invoice_pdf=invoice.invoice_pdf,
        )
    if owed.kind == OwedEmail.Kind.TRIAL_WILL_END:
        subscription = owed.subscription
        context.update(
            trial_end=long_date(_trial_end(owed)),
            seats=subscription.quantity,
            has_payment_method=owed.account.has_payment_method,
        )
    return context


def _trial_end(owed: OwedEmail) -> datetime:
    if owed.subscription is None or owed.subscription.trial_end is None:
        raise ValueError(f"owed e-mail {owed.pk} is a trial reminder for a subscription without trial_end")
    return owed.subscription.trial_end

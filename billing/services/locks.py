"""The locks a service takes before it reads, always in this order (docs/decisions/0002):

1. ``lock_invoice(stripe_invoice_id)``: the invoice's advisory lock. Payment writers know the
   invoice but not the customer, so this is what orders an invoice with its payments.
2. ``lock_account(customer)``: the customer's account row. Every writer of a customer's
   subscriptions, invoices, renewals and entitlements holds it, so one customer's events are
   applied one at a time and those rows need no lock of their own.
3. ``lock_payment(payment_intent_id)``: a payment's row (and, through ``select_for_update``,
   a refund's or an invoice's row when a service changes an amount), last.

Before all of them the inbox holds the event's own row (its INSERT). Take each lock in a
statement of its own, before reading what it protects: PostgreSQL shows a statement the rows as
they were when it started, even if it then waited for a lock.
"""

from __future__ import annotations

from provisioning import services as provisioning
from provisioning.models import Account

from .. import sql
from ..models import Payment
from ..outbox import send_emails_waiting_for_a_recipient
from ..stripe_payloads import CustomerRef


def invoice_lock_key(stripe_invoice_id: str) -> str:
    return f"billing.invoice:{stripe_invoice_id}"


def lock_invoice(stripe_invoice_id: str) -> None:
    """Hold the invoice's advisory lock until the transaction ends (PostgreSQL; SQLite has one writer).

    An invoice handler and the writer of a payment of that invoice take it first. Without it a
    payment and its invoice, committed at the same instant, could each miss the other's row:
    the payment left unattached and its refunds never counted on the invoice.
    """
    sql.advisory_xact_lock(invoice_lock_key(stripe_invoice_id))


def lock_account(customer: CustomerRef) -> Account:
    """The customer's account, locked until the transaction ends; created if never seen.

    Two first events of a customer both try the INSERT; the second waits for the first to
    commit, skips its own, then reads and locks the row the first created.

    When the event is the first to tell the account its e-mail address, the account's e-mails
    that were waiting for a recipient (owed by events that came before it) are sent once this
    transaction commits (``billing.outbox``).
    """
    account = sql.locked_account(customer.customer_id)
    if account is None:
        account = provisioning.new_account_for_customer(customer.customer_id, name=customer.name, email=customer.email)
        if sql.create_with_history(account, reason=None, unless_exists=["stripe_customer_id"]):
            return account  # this transaction holds the new row until it ends
        # A concurrent first event of the customer created it: the INSERT waited for its commit.
        account = sql.locked_account(customer.customer_id)
    had_email = bool(account.billing_email)
    learned = provisioning.learn_customer_details(account, customer.name, customer.email)
    if learned:
        sql.save_with_history(account, learned, reason="customer details from Stripe")
    if account.billing_email and not had_email:
        send_emails_waiting_for_a_recipient(account)
    return account


def lock_payment(payment_intent_id: str) -> Payment:
    """The Payment of a PaymentIntent, locked; created if never seen.

    ``payment_intent_id`` is ``charge:<id>`` for a charge that names no PaymentIntent. Two
    first writers of one payment both try the INSERT; the second waits for the first to commit,
    then finds and locks its row.
    """
    return get_or_create_locked(Payment, {"payment_intent_id": payment_intent_id}, {})[0]


def get_or_create_locked(model, unique: dict, defaults: dict, *, reason: str | None = None):
    """(row, created): the row of ``model`` with the ``unique`` values, locked; created if absent.

    ``get_or_create`` on a locked queryset, the other way round and without its savepoint: the
    INSERT goes first (most payments and refunds are new when first written) and skips a row
    that exists (``ON CONFLICT DO NOTHING``, after waiting for a concurrent creator to commit);
    the existing row is then read under its lock.
    """
    row = model(**unique, **defaults)
    if sql.create_with_history(row, reason=reason, unless_exists=list(unique)):
        return row, True
    return model.objects.select_for_update().get(**unique), False

"""Which account a Stripe customer is: created when first seen, linked and merged at checkout."""

from __future__ import annotations

import logging

from provisioning import services as provisioning
from provisioning.models import Account

from ..models import Invoice, OwedEmail, Subscription
from ..stripe_payloads import CustomerRef, Event, read_checkout_session, read_setup_intent
from .locks import lock_account

logger = logging.getLogger(__name__)


def link_checkout_to_account(event: Event) -> None:
    """``checkout.session.completed``: the account named by ``client_reference_id`` is this customer's.

    If an account was already created for the customer (its events came first), it is merged
    into the named one. One account per customer, always.
    """
    snap = read_checkout_session(event.obj)
    reference = snap.client_reference_id
    if snap.mode != "subscription" or snap.customer is None or not (reference.isascii() and reference.isdigit()):
        return  # an account's primary key is ASCII digits ("٣".isdigit() is True, and int() reads it)
    target = Account.objects.select_for_update().filter(pk=int(snap.client_reference_id)).first()
    customer_id = snap.customer.customer_id
    if target is None:
        logger.warning("checkout %s names account %s, which does not exist", snap.stripe_id, snap.client_reference_id)
        return
    if target.stripe_customer_id == customer_id:
        return
    if target.stripe_customer_id:
        logger.warning(
            "checkout %s: account %s already belongs to another customer; not relinked", snap.stripe_id, target.pk
        )
        return
    source = Account.objects.select_for_update().filter(stripe_customer_id=customer_id).first()
    if source is not None:
        merge_accounts(source, target)
    target.stripe_customer_id = customer_id
    target.billing_email = target.billing_email or snap.customer.email
    target._change_reason = f"linked to {customer_id} by {snap.stripe_id}"[:100]  # the history column's width
    target.save(update_fields=["stripe_customer_id", "billing_email", "updated_at"])


def merge_accounts(source: Account, target: Account) -> None:
    """Move everything of ``source`` to ``target`` and delete ``source`` (history records each move)."""
    reason = f"merged from account {source.pk} into {target.pk}"
    for row in [*Subscription.objects.filter(account=source), *Invoice.objects.filter(account=source)]:
        row.account = target
        row._change_reason = reason
        row.save(update_fields=["account", "updated_at"])
    OwedEmail.objects.filter(account=source).update(account=target)
    provisioning.move_account_rows(source, target)
    source._change_reason = reason
    source.delete()


def record_payment_method(event: Event) -> None:
    """``setup_intent.succeeded``: a payment method is on file for the customer's account."""
    snap = read_setup_intent(event.obj)
    if not snap.customer_id or not snap.payment_method_id or snap.status != "succeeded":
        return
    account = lock_account(CustomerRef(snap.customer_id))
    provisioning.set_payment_method(account, snap.payment_method_id, event.created)

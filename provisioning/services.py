"""Writes to accounts and entitlements. Billing handlers call these; nothing else writes.

Every function expects to run inside the caller's transaction. The caller holds the account's
lock (``lock_account_for_customer``, taken first by every writer of a customer's rows), which is
what serialises concurrent events of one customer.
"""

from __future__ import annotations

import logging
from datetime import datetime

from .models import Account, Entitlement, Membership

logger = logging.getLogger(__name__)


def lock_account_for_customer(customer_id: str, *, name: str = "", email: str = "") -> Account:
    """The account of a Stripe customer, locked for this transaction; created if never seen.

    A subscription created through the API with no checkout still gets an account, named after
    the customer's name or e-mail when the payload carries them. Two concurrent first events of
    a customer both try the INSERT; the second waits for the first to commit, then finds and
    locks the row the first created (``get_or_create`` reads again after the conflict).
    """
    account, created = Account.objects.select_for_update().get_or_create(
        stripe_customer_id=customer_id,
        defaults={"name": (name or email or customer_id)[:255], "billing_email": email},
    )
    if not created:
        learn_customer_details(account, name, email)
    return account


def learn_customer_details(account: Account, name: str, email: str) -> None:
    """Fill in what an account created from a bare customer id did not know yet.

    A name that is only a placeholder (the customer id, or the e-mail) gives way to the real
    name whichever event brings it, so the result does not depend on delivery order. A name
    someone chose (at checkout, in the admin) is never touched.
    """
    if not name and not email:
        return
    fields = []
    placeholders = {account.stripe_customer_id, account.billing_email, email} - {""}
    better = name or email
    if better and account.name != better and account.name in placeholders and (name or account.name != email):
        account.name = better[:255]
        fields.append("name")
    if email and not account.billing_email:
        account.billing_email = email
        fields.append("billing_email")
    if fields:
        account._change_reason = "customer details from Stripe"
        account.save(update_fields=[*fields, "updated_at"])


def grant_entitlement(
    account_id: int,
    *,
    kind: str,
    stripe_subscription_id: str,
    starts_at: datetime,
    expires_at: datetime,
    seats: int,
    stripe_invoice_id: str = "",
) -> bool:
    """The entitlement for one window of a subscription, created once (its window is unique).

    A window granted already is left as it is: False. The caller holds the account's lock, so
    the read and the INSERT cannot interleave with another grant of the same window; the unique
    constraint stands behind it (a violation fails the event, and its retry finds the window).
    """
    window = {"stripe_subscription_id": stripe_subscription_id, "kind": kind, "starts_at": starts_at}
    if Entitlement.objects.filter(**window).exists():
        return False
    Entitlement.objects.create(
        **window,
        account_id=account_id,
        expires_at=max(expires_at, starts_at),
        seats=max(seats, 0),
        stripe_invoice_id=stripe_invoice_id,
    )
    return True


def update_entitlement(entitlement: Entitlement, *, reason: str, **fields) -> bool:
    """Change fields of an entitlement (with a history reason); False if nothing changed."""
    changed = [name for name, value in fields.items() if getattr(entitlement, name) != value]
    if not changed:
        return False
    for name in changed:
        setattr(entitlement, name, fields[name])
    entitlement._change_reason = reason
    entitlement.save(update_fields=[*changed, "updated_at"])
    return True


def set_payment_method(account: Account, payment_method_id: str, at: datetime) -> bool:
    if account.default_payment_method_id == payment_method_id:
        return False
    if account.payment_method_added_at and at < account.payment_method_added_at:
        return False  # an older SetupIntent than the one already recorded
    account.default_payment_method_id, account.payment_method_added_at = payment_method_id, at
    account._change_reason = "payment method on file"
    account.save(update_fields=["default_payment_method_id", "payment_method_added_at", "updated_at"])
    return True


def move_account_rows(source: Account, target: Account) -> None:
    """Move provisioning rows (entitlements, memberships) of ``source`` to ``target``."""
    reason = f"merged from account {source.pk} into {target.pk}"
    for entitlement in Entitlement.objects.filter(account=source):
        entitlement.account = target
        entitlement._change_reason = reason
        entitlement.save(update_fields=["account", "updated_at"])
    existing_users = set(Membership.objects.filter(account=target).values_list("user_id", flat=True))
    for membership in Membership.objects.filter(account=source):
        if membership.user_id in existing_users:
            continue
        membership.account = target
        membership._change_reason = reason
        membership.save(update_fields=["account"])

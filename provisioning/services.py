"""Accounts and entitlements: what a new one holds, what may change; the rarer changes, saved here.

Every function expects to run inside the caller's transaction. The caller holds the account's
lock (``billing.services.locks.lock_account``, taken first by every writer of a customer's rows),
which is what serialises concurrent events of one customer.

The three writes every customer's webhooks make (its account when first seen, the details it
learns later, an entitlement per trial and paid period) are *built* here and stored by billing's
services, each with its history row in one statement (``billing.sql``; decision 0005 gives the
measured cost of saving them with the ORM instead). Provisioning keeps the rules, and depends on
nothing of billing.
"""

from __future__ import annotations

import logging
from datetime import datetime

from .models import Account, Entitlement, Membership

logger = logging.getLogger(__name__)


def new_account_for_customer(customer_id: str, *, name: str = "", email: str = "") -> Account:
    """The account (unsaved) of a Stripe customer seen for the first time.

    A subscription created through the API with no checkout still gets an account, named after
    the customer's name or e-mail when the payload carries them, else after the customer id.
    """
    return Account(stripe_customer_id=customer_id, name=(name or email or customer_id)[:255], billing_email=email)


def learn_customer_details(account: Account, name: str, email: str) -> list[str]:
    """Fill in what an account created from a bare customer id did not know yet; the fields
    changed on ``account`` (unsaved; none if it knew everything already).

    A name that is only a placeholder (the customer id, or the e-mail) gives way to the real
    name whichever event brings it, so the result does not depend on delivery order. A name
    someone chose (at checkout, in the admin) is never touched.
    """
    if not name and not email:
        return []
    fields = []
    placeholders = {account.stripe_customer_id, account.billing_email, email} - {""}
    better = name or email
    if better and account.name != better and account.name in placeholders and (name or account.name != email):
        account.name = better[:255]
        fields.append("name")
    if email and not account.billing_email:
        account.billing_email = email
        fields.append("billing_email")
    return fields


def entitlement_for_window(
    account_id: int,
    *,
    kind: str,
    stripe_subscription_id: str,
    starts_at: datetime,
    expires_at: datetime,
    seats: int,
    stripe_invoice_id: str = "",
) -> Entitlement:
    """The entitlement (unsaved) for one window of a subscription: it never ends before it
    starts, and its seats are never negative. It is stored once per window
    (``models.ENTITLEMENT_WINDOW``, the fields of its unique constraint).
    """
    return Entitlement(
        account_id=account_id,
        kind=kind,
        stripe_subscription_id=stripe_subscription_id,
        starts_at=starts_at,
        expires_at=max(expires_at, starts_at),
        seats=max(seats, 0),
        stripe_invoice_id=stripe_invoice_id,
    )


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

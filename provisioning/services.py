"""Writes to accounts and entitlements. Billing handlers call these; nothing else writes.

Every function expects to run inside the caller's transaction and takes row locks in one
order, account first, so that concurrent events of one customer are applied one at a time.
"""
from __future__ import annotations

import logging
from datetime import datetime

from billing import sql  # hand-written SQL of the webhook's hot path (no billing models imported)

from .models import Account, Entitlement, Membership

logger = logging.getLogger(__name__)


def lock_account_for_customer(customer_id: str, *, name: str = "", email: str = "") -> Account:
    """The account of a Stripe customer, locked for this transaction; created if never seen.

    A subscription created through the API with no checkout still gets an account, named after
    the customer's name or e-mail when the payload carries them. Two concurrent first events of
    a customer both try the INSERT; the second waits for the first to commit, skips, and locks
    the row the first created (``ON CONFLICT DO NOTHING``: no savepoint, no error to catch).
    """
    accounts = sql.table(Account)
    account = accounts.get("stripe_customer_id = %s", [customer_id], lock=True)
    if account is not None:
        learn_customer_details(account, name, email)
        return account
    account = accounts.insert(
        {"name": (name or email or customer_id)[:255], "stripe_customer_id": customer_id, "billing_email": email},
        on_conflict=["stripe_customer_id"],
    )
    if account is None:  # a concurrent delivery created it first; its transaction has committed
        account = accounts.get("stripe_customer_id = %s", [customer_id], lock=True)
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
    fields = {}
    if email and not account.billing_email:
        fields["billing_email"] = email
    placeholders = {account.stripe_customer_id, account.billing_email, email} - {""}
    better = name or email
    if better and account.name != better and account.name in placeholders and (name or account.name != email):
        fields["name"] = better[:255]
    if fields:
        sql.table(Account).update(account, fields, reason="customer details from Stripe")


def grant_entitlement(
    account_id: int,
    *,
    kind: str,
    stripe_subscription_id: str,
    starts_at: datetime,
    expires_at: datetime,
    seats: int,
    stripe_invoice_id: str = "",
) -> None:
    """The entitlement for one window of a subscription; created once (unique window).

    A window granted already is left as it is (the unique constraint makes the INSERT skip).
    Nothing is read back.
    """
    row = {
        "account_id": account_id,
        "kind": kind,
        "stripe_subscription_id": stripe_subscription_id,
        "starts_at": starts_at,
        "expires_at": max(expires_at, starts_at),
        "seats": max(seats, 0),
        "stripe_invoice_id": stripe_invoice_id,
    }
    sql.table(Entitlement).insert_many(
        [row],
        on_conflict=["stripe_subscription_id", "kind", "starts_at"],
        returning=False,
    )


def update_entitlement(entitlement: Entitlement, *, reason: str, **fields) -> bool:
    """Change fields of an entitlement (with a history reason); False if nothing changed."""
    changed = {name: value for name, value in fields.items() if getattr(entitlement, name) != value}
    if not changed:
        return False
    sql.table(Entitlement).update(entitlement, changed, reason=reason)
    return True


def set_payment_method(account: Account, payment_method_id: str, at: datetime) -> bool:
    if account.default_payment_method_id == payment_method_id:
        return False
    if account.payment_method_added_at and at < account.payment_method_added_at:
        return False  # an older SetupIntent than the one already recorded
    sql.table(Account).update(account, {"default_payment_method_id": payment_method_id, "payment_method_added_at": at})
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

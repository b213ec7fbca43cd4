"""Delivering whole lifecycles through the webhook, and the state they leave, normalised.

``snapshot()`` is what "the same rows" means in the ordering tests: every mirrored and
provisioned row, by Stripe ids and values, without primary keys or local timestamps (which
differ between runs for reasons that do not matter).
"""

from __future__ import annotations

from billing.models import (
    Dispute,
    Invoice,
    InvoiceLineItem,
    OwedEmail,
    Payment,
    Refund,
    Renewal,
    StripeEvent,
    Subscription,
)
from billing.tests.conftest import deliver
from provisioning.models import Account, Entitlement, Membership


def deliver_until_accepted(client, events, *, max_rounds: int = 12) -> dict:
    """Post each event; re-deliver every non-2xx after the others, as Stripe's retries do."""
    pending, rounds = list(events), 0
    while pending and rounds < max_rounds:
        rounds += 1
        failed = []
        for event in pending:
            response = deliver(client, event)
            assert response.status_code in (200, 500), (event["type"], response.status_code, response.content)
            if response.status_code != 200:
                failed.append(event)
        pending = failed
    assert not pending, f"still failing after {max_rounds} rounds: {[e['type'] for e in pending]}"
    return {"rounds": rounds}


def clear_rows() -> None:
    for model in (
        Dispute,
        OwedEmail,
        Refund,
        Payment,
        Renewal,
        InvoiceLineItem,
        Invoice,
        Subscription,
        Entitlement,
        Membership,
        StripeEvent,
        Account,
    ):
        model.objects.all().delete()
        history = getattr(model, "history", None)
        if history is not None:
            history.model.objects.all().delete()


def _entitlement_key(entitlement_id, by_id):
    e = by_id.get(entitlement_id)
    return None if e is None else (e.stripe_subscription_id, e.kind, e.starts_at)


def snapshot() -> dict:
    entitlements = {e.pk: e for e in Entitlement.objects.select_related("account")}
    return {
        "accounts": sorted(
            (a.stripe_customer_id, a.name, a.billing_email, a.default_payment_method_id) for a in Account.objects.all()
        ),
        "subscriptions": sorted(
            (
                s.stripe_id,
                s.account.stripe_customer_id,
                s.status,
                s.quantity,
                s.current_period_start,
                s.current_period_end,
                s.trial_start,
                s.trial_end,
                s.cancel_at_period_end,
                s.canceled_at,
                s.ended_at,
            )
            for s in Subscription.objects.select_related("account")
        ),
        "invoices": sorted(
            (
                i.stripe_id,
                i.account.stripe_customer_id,
                i.subscription.stripe_id if i.subscription else None,
                i.number,
                i.status,
                i.billing_reason,
                i.currency,
                i.total,
                i.amount_due,
                i.amount_paid,
                i.amount_remaining,
                i.amount_refunded,
                i.period_start,
                i.period_end,
                i.paid_at,
                i.hosted_invoice_url,
            )
            for i in Invoice.objects.select_related("account", "subscription")
        ),
        "lines": sorted(
            (
                line.invoice.stripe_id,
                line.stripe_id,
                line.amount,
                line.quantity,
                line.period_start,
                line.period_end,
                line.proration,
            )
            for line in InvoiceLineItem.objects.select_related("invoice")
        ),
        "renewals": sorted(
            (
                r.subscription.stripe_id,
                r.effective_date,
                r.stripe_invoice_id,
                r.processed_at is not None,
                _entitlement_key(r.from_entitlement_id, entitlements),
                _entitlement_key(r.to_entitlement_id, entitlements),
            )
            for r in Renewal.objects.select_related("subscription")
        ),
        "entitlements": sorted(
            (
                e.account.stripe_customer_id,
                e.stripe_subscription_id,
                e.kind,
                e.seats,
                e.starts_at,
                e.expires_at,
                e.stripe_invoice_id,
            )
            for e in entitlements.values()
        ),
        "owed_emails": sorted(
            (o.key, o.kind, o.account.stripe_customer_id) for o in OwedEmail.objects.select_related("account")
        ),
        "receipts_sent": sorted(
            Invoice.objects.filter(receipt_sent_at__isnull=False).values_list("stripe_id", flat=True)
        ),
        "payments": sorted(
            (p.payment_intent_id, p.invoice.stripe_id if p.invoice else None, p.charge_amount_refunded)
            for p in Payment.objects.select_related("invoice")
        ),
        "refunds": sorted((r.stripe_id, r.amount, r.status) for r in Refund.objects.all()),
        "inbox": sorted(StripeEvent.objects.values_list("id", "status")),
    }

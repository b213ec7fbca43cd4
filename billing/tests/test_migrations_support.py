"""Migrations of the support admin: 0007 gives mirrored rows the mode of their events, 0008 makes
the "Billing support" group. Data is built with the frozen models of the migration state."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db import connection

BEFORE = [("billing", "0006_dispute"), ("provisioning", "0001_initial")]
LIVEMODE = ("billing", "0007_livemode_support")
GROUP = ("billing", "0008_billing_support_group")
WHEN = datetime(2026, 2, 2, tzinfo=UTC)


def test_0007_takes_each_rows_mode_from_its_events(migrator):
    old = migrator.apply_initial_migration(BEFORE).apps
    Account = old.get_model("provisioning", "Account")
    Subscription, Invoice = old.get_model("billing", "Subscription"), old.get_model("billing", "Invoice")
    Payment, StripeEvent = old.get_model("billing", "Payment"), old.get_model("billing", "StripeEvent")
    account = Account.objects.create(name="A", stripe_customer_id="cus_m")
    for stripe_id, live in (("live", True), ("test", False)):
        sub = Subscription.objects.create(stripe_id=f"sub_{stripe_id}", account=account, status="active")
        invoice = Invoice.objects.create(
            stripe_id=f"in_{stripe_id}", account=account, subscription=sub, status="paid", currency="usd"
        )
        Payment.objects.create(
            payment_intent_id=f"pi_{stripe_id}", invoice=invoice, stripe_invoice_id=invoice.stripe_id
        )
        for object_id in (sub.stripe_id, invoice.stripe_id):
            StripeEvent.objects.create(
                id=f"evt_{object_id}", type="x", livemode=live, created=WHEN, object_id=object_id, payload={}
            )

    new = migrator.apply_tested_migration(LIVEMODE).apps
    for name, field in (("Subscription", "stripe_id"), ("Invoice", "stripe_id"), ("Payment", "payment_intent_id")):
        rows = dict(new.get_model("billing", name).objects.values_list(field, "livemode"))
        assert sorted(rows.values()) == [False, True], name
        assert [row for row, live in rows.items() if live][0].endswith("_live"), name
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'stripeevent_owner'")
        assert "customer" in cursor.fetchone()[0]


def test_0008_makes_the_support_group_and_its_reverse_removes_it(migrator):
    migrator.apply_initial_migration(LIVEMODE)
    state = migrator.apply_tested_migration(GROUP).apps
    group = state.get_model("auth", "Group").objects.get(name="Billing support")
    codenames = set(group.permissions.values_list("codename", flat=True))
    assert {"view_invoice", "reprocess_stripeevent", "resend_receipt", "resync_invoice", "change_account"} <= codenames
    assert not codenames & {"change_invoice", "delete_account", "change_stripeevent", "add_user", "change_group"}

    reverted = migrator.apply_tested_migration(LIVEMODE).apps
    assert not reverted.get_model("auth", "Group").objects.filter(name="Billing support").exists()

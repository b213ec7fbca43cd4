"""Support staff's admin (issue 20): livemode on mirrored rows, who asked for an e-mail, the
support actions' permissions, and an index that finds a customer's events.

* ``livemode`` on subscriptions, invoices, payments, refunds and disputes, so their dashboard
  links open test-mode objects under ``/test/``. Rows mirrored before take it from their events
  (an object is live if an event about it is; the invoice's for a payment): one pass over the
  inbox per table, run once.
* ``OwedEmail.requested_by``: who asked for a receipt to be sent again.
* Permissions of the support actions (re-process, re-sync, resend, send now), given to the
  "Billing support" group by 0008.
* ``stripeevent_owner``: an expression index on the customer an event's object belongs to (or
  the invoice, for invoice payments), so the inbox finds all of a customer's events by its
  ``cus_`` id (``billing.models.event_owner``). Building it reads the inbox once.
"""

import django.db.models.deletion
import django.db.models.fields.json
import django.db.models.functions.comparison
from django.conf import settings
from django.db import migrations, models
from django.db.models import Q

# (model, the field holding the Stripe id of its object)
MIRRORED = (
    ("Subscription", "stripe_id"),
    ("Invoice", "stripe_id"),
    ("Refund", "stripe_id"),
    ("Dispute", "stripe_id"),
)


def livemode_from_events(apps, schema_editor):
    """A mirrored row is live when an event about its object is live (test mode otherwise)."""
    live = apps.get_model("billing", "StripeEvent").objects.filter(livemode=True)
    if not live.exists():
        return  # a test-mode install: every row keeps the default
    objects = live.values("object_id")
    for name, field in MIRRORED:
        apps.get_model("billing", name).objects.filter(**{f"{field}__in": objects}).update(livemode=True)
    Payment = apps.get_model("billing", "Payment")
    Payment.objects.filter(Q(charge_id__in=objects) | Q(invoice__livemode=True)).update(livemode=True)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0006_dispute"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="invoice",
            options={
                "ordering": ["-stripe_created", "-pk"],
                "permissions": [
                    ("resync_invoice", "Can re-sync an invoice from Stripe"),
                    ("resend_receipt", "Can resend the receipt of a paid invoice"),
                ],
            },
        ),
        migrations.AlterModelOptions(
            name="owedemail",
            options={"ordering": ["-created_at"], "permissions": [("send_owedemail", "Can send an owed e-mail now")]},
        ),
        migrations.AlterModelOptions(
            name="stripeevent",
            options={
                "ordering": ["-created", "-received_at"],
                "permissions": [("reprocess_stripeevent", "Can re-process a Stripe event")],
            },
        ),
        migrations.AlterModelOptions(
            name="subscription",
            options={
                "ordering": ["-created_at", "pk"],
                "permissions": [("resync_subscription", "Can re-sync a subscription from Stripe")],
            },
        ),
        migrations.AddField(
            model_name="dispute",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="historicaldispute",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="historicalinvoice",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="historicalpayment",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="historicalrefund",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="historicalsubscription",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="invoice",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="owedemail",
            name="requested_by",
            field=models.ForeignKey(
                blank=True,
                help_text="Who asked for this e-mail (a receipt sent again from the admin); empty when an event owed it.",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.AddField(
            model_name="payment",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="refund",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddField(
            model_name="subscription",
            name="livemode",
            field=models.BooleanField(
                default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
            ),
        ),
        migrations.AddIndex(
            model_name="stripeevent",
            index=models.Index(
                django.db.models.functions.comparison.Coalesce(
                    django.db.models.fields.json.KeyTextTransform(
                        "customer",
                        django.db.models.fields.json.KeyTransform(
                            "object", django.db.models.fields.json.KeyTransform("data", "payload")
                        ),
                    ),
                    django.db.models.fields.json.KeyTextTransform(
                        "invoice",
                        django.db.models.fields.json.KeyTransform(
                            "object", django.db.models.fields.json.KeyTransform("data", "payload")
                        ),
                    ),
                ),
                name="stripeevent_owner",
            ),
        ),
        migrations.RunPython(livemode_from_events, migrations.RunPython.noop, elidable=True),
    ]

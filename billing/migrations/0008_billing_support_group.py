"""The "Billing support" group: exactly what support staff need in the admin (README, "Support staff").

* see everything of billing and provisioning: subscriptions, invoices and their lines, renewals,
  payments, refunds, disputes, the inbox of events, the owed e-mails; accounts, entitlements,
  members;
* change what they fix by hand: an account's name and billing e-mail, and its members (who
  belongs to it, with which role), for which they may look users up;
* apply the support actions: re-process an event, re-sync a subscription or an invoice from
  Stripe, resend a receipt, send an owed e-mail now.

Nothing else: no mirrored row is changed by hand, nothing is deleted but a membership, and no
user, group or permission is administered. A later migration that adds a model or an action
support needs adds its permission to the group. Applying this again sets the group's
permissions to this list; reversing it deletes the group.
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations

SUPPORT_GROUP = "Billing support"
PERMISSIONS = {
    "billing": [
        "view_subscription",
        "resync_subscription",
        "view_invoice",
        "view_invoicelineitem",
        "resync_invoice",
        "resend_receipt",
        "view_renewal",
        "view_payment",
        "view_refund",
        "view_dispute",
        "view_stripeevent",
        "reprocess_stripeevent",
        "view_owedemail",
        "send_owedemail",
    ],
    "provisioning": [
        "view_account",
        "change_account",
        "view_entitlement",
        "view_membership",
        "add_membership",
        "change_membership",
        "delete_membership",
    ],
    "auth": ["view_user"],
}


def create_support_group(apps, schema_editor):
    # Permissions are created after all migrations (post_migrate); on a new database they do
    # not exist yet, so they are created here first, from this migration's models.
    for label in PERMISSIONS:
        app_config = apps.get_app_config(label)
        unset = getattr(app_config, "models_module", None) is None  # a migration state's stub has none
        if unset:
            app_config.models_module = True
        create_permissions(app_config, verbosity=0, using=schema_editor.connection.alias, apps=apps)
        if unset:
            app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=SUPPORT_GROUP)
    group.permissions.set(
        [
            Permission.objects.get(content_type__app_label=label, codename=codename)
            for label, codenames in PERMISSIONS.items()
            for codename in codenames
        ]
    )


def delete_support_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=SUPPORT_GROUP).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0007_livemode_support"),
        ("provisioning", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RunPython(create_support_group, delete_support_group),
    ]

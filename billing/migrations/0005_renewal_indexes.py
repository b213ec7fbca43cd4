"""Fewer indexes on renewals and their history: every renewal write updates each of them.

* ``subscription_id`` loses its own index: ``uniq_renewal_effective_date`` (subscription_id,
  effective_date) serves every lookup by subscription.
* ``stripe_invoice_id`` stays unique through a named constraint instead of ``unique=True``,
  which on PostgreSQL also built a ``varchar_pattern_ops`` index for LIKE queries nobody makes.
* The history table keeps its indexes on ``history_id``, ``id`` (the admin reads a renewal's
  history by it), ``history_date`` and ``history_user``; those on ``subscription_id``,
  ``stripe_invoice_id`` (two), ``from_entitlement_id`` and ``to_entitlement_id`` served no query.

Renewal updates are not HOT (their indexed columns change), so each index dropped is one index
insertion fewer per update; a history row is inserted with every change. Measured with
``python -m bench.backfill`` (docs/decisions/0004-backfill-renewal-invoices.rst).
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('billing', '0004_inbox_indexes'),
        ('provisioning', '0001_initial'),
    ]

    operations = [
        migrations.AlterField(
            model_name='historicalrenewal',
            name='from_entitlement',
            field=models.ForeignKey(blank=True, db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='provisioning.entitlement'),
        ),
        migrations.AlterField(
            model_name='historicalrenewal',
            name='stripe_invoice_id',
            field=models.CharField(blank=True, help_text='The invoice that pays for this renewal (in_...). Set once; a conflicting id is ignored.', max_length=255, null=True),
        ),
        migrations.AlterField(
            model_name='historicalrenewal',
            name='subscription',
            field=models.ForeignKey(blank=True, db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='billing.subscription'),
        ),
        migrations.AlterField(
            model_name='historicalrenewal',
            name='to_entitlement',
            field=models.ForeignKey(blank=True, db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='provisioning.entitlement'),
        ),
        migrations.AlterField(
            model_name='renewal',
            name='stripe_invoice_id',
            field=models.CharField(blank=True, help_text='The invoice that pays for this renewal (in_...). Set once; a conflicting id is ignored.', max_length=255, null=True),
        ),
        migrations.AlterField(
            model_name='renewal',
            name='subscription',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='renewals', to='billing.subscription'),
        ),
        migrations.AddConstraint(
            model_name='renewal',
            constraint=models.UniqueConstraint(fields=('stripe_invoice_id',), name='uniq_renewal_stripe_invoice_id'),
        ),
    ]

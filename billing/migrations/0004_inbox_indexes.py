"""Fewer indexes on the inbox: every delivery inserts into each of them.

* ``type`` loses its own index: ``stripeevent_type_created`` (type, created) serves every
  lookup by type.
* ``status`` loses its full index for a partial one on the events still to settle (``failed``,
  ``received``): what ``reprocess_stripe_events`` and support staff look for. Processed and
  ignored events, nearly all of the inbox, are no longer indexed by status at all.

Measured with ``python -m bench.costs`` / ``make bench``: two index insertions fewer per event.
Building the partial index reads the table once but writes only the unsettled rows.
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('billing', '0003_backfill_renewal_invoices'),
    ]

    operations = [
        migrations.AlterField(
            model_name='stripeevent',
            name='status',
            field=models.CharField(choices=[('received', 'Received'), ('processed', 'Processed'), ('ignored', 'Ignored'), ('failed', 'Failed')], default='received', max_length=16),
        ),
        migrations.AlterField(
            model_name='stripeevent',
            name='type',
            field=models.CharField(max_length=255),
        ),
        migrations.AddIndex(
            model_name='stripeevent',
            index=models.Index(condition=models.Q(('status__in', ['failed', 'received'])), fields=['status', 'created'], name='stripeevent_unsettled'),
        ),
    ]

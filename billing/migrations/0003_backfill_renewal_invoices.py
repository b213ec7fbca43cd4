"""Backfill ``Renewal.effective_date`` and ``Renewal.stripe_invoice_id`` (added by 0002).

The work is ``billing.backfill.backfill_renewal_invoices``, the function that
``manage.py backfill_renewal_invoices`` runs too, given the frozen models of this point in the
history. It goes in batches, each committed on its own (this migration is not atomic): a
``migrate`` interrupted on a large table resumes where it stopped when run again, and on an
empty database it is one query. See docs/decisions/0004-backfill-renewal-invoices.rst.

First, on PostgreSQL only, an expression index finds the stored invoice events of a
subscription (the subscription id lives inside the JSON payload). Without it each batch would
scan the whole inbox. It is built ``CONCURRENTLY`` so that webhook deliveries keep being stored
while it builds. The index is partial (invoice events only), and PostgreSQL does not use the
statistics of a partial index's expression when it plans: without statistics of their own
(``CREATE STATISTICS`` on the expression, then ``ANALYZE``) a batch's lookup of a few hundred
subscriptions is estimated at most of the table and planned as a sequential scan. Other
databases (SQLite for ``make run``, empty when it reaches this point) skip all of it.

Reversing is safe: the index and the statistics are dropped; the backfilled values stay (they
are what 0002's columns mean, and reversing 0002 drops them anyway).
"""
import logging

from django.db import migrations

logger = logging.getLogger(__name__)

INDEX_NAME = "stripeevent_invoice_subscription"
STATISTICS_NAME = "stripeevent_invoice_subscription_stats"
# Must stay identical to billing.backfill.EVENT_SUBSCRIPTION_SQL / EVENT_TYPES_SQL.
SUBSCRIPTION_SQL = (
    "COALESCE(payload #>> '{data,object,parent,subscription_details,subscription}',"
    " payload #>> '{data,object,subscription}')"
)
INDEX_SQL = (
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} (({expression}))"
    " WHERE type IN ('invoice.created', 'invoice.paid')"
)
STATISTICS_SQL = "CREATE STATISTICS IF NOT EXISTS {name} ON ({expression}) FROM {table}"


def create_invoice_event_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    table = schema_editor.quote_name(apps.get_model("billing", "StripeEvent")._meta.db_table)
    with schema_editor.connection.cursor() as cursor:
        # A CONCURRENTLY build that was interrupted leaves an invalid index behind, which
        # IF NOT EXISTS would keep forever: drop it and build again.
        cursor.execute(
            "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = %s AND pg_table_is_visible(c.oid)",
            [INDEX_NAME],
        )
        row = cursor.fetchone()
        if row and row[0]:
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX_NAME}")
        cursor.execute(INDEX_SQL.format(name=INDEX_NAME, table=table, expression=SUBSCRIPTION_SQL))
        cursor.execute(STATISTICS_SQL.format(name=STATISTICS_NAME, table=table, expression=SUBSCRIPTION_SQL))
        cursor.execute(f"ANALYZE {table}")


def drop_invoice_event_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"DROP STATISTICS IF EXISTS {STATISTICS_NAME}")
        cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX_NAME}")


def backfill(apps, schema_editor):
    from billing.backfill import backfill_renewal_invoices

    if schema_editor.connection.vendor != "postgresql":
        return  # SQLite is make run's database, created after 0002: nothing to backfill

    report = backfill_renewal_invoices(
        renewal_model=apps.get_model("billing", "Renewal"),
        history_model=apps.get_model("billing", "HistoricalRenewal"),
        subscription_model=apps.get_model("billing", "Subscription"),
        event_model=apps.get_model("billing", "StripeEvent"),
        entitlement_model=apps.get_model("provisioning", "Entitlement"),
        using=schema_editor.connection.alias,
    )
    if report.renewals:
        logger.info(
            "backfilled renewals: %s",
            ", ".join(f"{label} {value}" for label, value in report.summary() if value),
        )


class Migration(migrations.Migration):
    # Each batch of the backfill commits on its own, and CREATE INDEX CONCURRENTLY cannot run
    # inside a transaction.
    atomic = False

    dependencies = [
        ("billing", "0002_renewal_invoice_link"),
        ("provisioning", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(create_invoice_event_index, drop_invoice_event_index),
        migrations.RunPython(backfill, migrations.RunPython.noop, elidable=True),
    ]

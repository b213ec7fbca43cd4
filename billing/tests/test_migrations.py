"""The migration history: 0002 adds the renewal's invoice link, 0003 backfills it (Migrator).

Data is built with the frozen models of 0002 (``apps.get_model`` of the migration state), the
models the backfill sees when a team runs ``migrate``, not the current ones.
"""

from __future__ import annotations

import importlib
import io
from types import SimpleNamespace

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.loader import MigrationLoader

from billing.backfill import EVENT_INDEX_NAME, EVENT_SUBSCRIPTION_SQL, EVENT_TYPES_SQL
from billing.tests.test_backfill import WORLD_AFTER, Expected, build_world, world_state

BEFORE_BACKFILL = [("billing", "0002_renewal_invoice_link"), ("provisioning", "0001_initial")]
BACKFILL = ("billing", "0003_backfill_renewal_invoices")


def frozen(state) -> SimpleNamespace:
    return SimpleNamespace(
        Account=state.apps.get_model("provisioning", "Account"),
        Subscription=state.apps.get_model("billing", "Subscription"),
        Renewal=state.apps.get_model("billing", "Renewal"),
        StripeEvent=state.apps.get_model("billing", "StripeEvent"),
        Entitlement=state.apps.get_model("provisioning", "Entitlement"),
        HistoricalRenewal=state.apps.get_model("billing", "HistoricalRenewal"),
    )


def index_exists() -> bool:
    """The expression index on invoice events, and the statistics that go with it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", [EVENT_INDEX_NAME])
        index = cursor.fetchone() is not None
        cursor.execute("SELECT 1 FROM pg_statistic_ext WHERE stxname = %s", [f"{EVENT_INDEX_NAME}_stats"])
        statistics = cursor.fetchone() is not None
    assert index == statistics
    return index


def backfilled_history(m) -> int:
    return m.HistoricalRenewal.objects.filter(history_change_reason="backfill_renewal_invoices").count()


def test_backfill_migration_decides_every_case_on_frozen_models(migrator):
    before = frozen(migrator.apply_initial_migration(BEFORE_BACKFILL))
    assert not index_exists()
    renewals = build_world(before)

    after = frozen(migrator.apply_tested_migration(BACKFILL))

    # linked, already linked, conflicting, malformed, no events at all: each as it must be
    state = world_state(after.Renewal, renewals)
    assert state == WORLD_AFTER
    assert state["a0"] == WORLD_AFTER["a0"]  # unlinked, trial: dated at trial_end and linked
    assert state["b0"] == (WORLD_AFTER["b0"][0], "in_b0")  # already linked: unchanged
    assert state["c0"][1] == "in_c_old"  # conflicting invoice: the first link stays
    assert state["d0"][1] is None  # malformed events: not linked, no crash
    assert state["e0"] == (WORLD_AFTER["e0"][0], None)  # no events at all: dated, not linked
    assert backfilled_history(after) == Expected.history_rows
    assert index_exists()


def test_backfill_migration_reverses_safely_and_reapplies_without_change(migrator):
    renewals = build_world(frozen(migrator.apply_initial_migration(BEFORE_BACKFILL)))
    migrator.apply_tested_migration(BACKFILL)

    reverted = frozen(migrator.apply_tested_migration(BEFORE_BACKFILL))
    assert world_state(reverted.Renewal, renewals) == WORLD_AFTER  # the no-op reverse keeps the values
    assert not index_exists()

    again = frozen(migrator.apply_tested_migration(BACKFILL))
    assert world_state(again.Renewal, renewals) == WORLD_AFTER
    assert backfilled_history(again) == Expected.history_rows  # nothing rewritten the second time


def test_backfill_migration_on_an_empty_database(migrator):
    migrator.apply_initial_migration(BEFORE_BACKFILL)
    after = frozen(migrator.apply_tested_migration(BACKFILL))
    assert after.Renewal.objects.count() == 0 and backfilled_history(after) == 0


def test_the_fields_are_added_by_0002_then_backfilled_by_0003():
    loader = MigrationLoader(None, ignore_no_migrations=True)
    initial = loader.get_migration("billing", "0001_initial")
    renewal_fields = next(op.fields for op in initial.operations if getattr(op, "name", "") == "Renewal")
    assert {"effective_date", "stripe_invoice_id"}.isdisjoint(name for name, _ in renewal_fields)
    added = {
        (op.model_name, op.name)
        for op in loader.get_migration("billing", "0002_renewal_invoice_link").operations
        if type(op).__name__ == "AddField"
    }
    assert {
        (model, field)
        for model in ("renewal", "historicalrenewal")
        for field in ("effective_date", "stripe_invoice_id")
    } <= added
    backfill = loader.get_migration(*BACKFILL)
    assert ("billing", "0002_renewal_invoice_link") in backfill.dependencies
    assert backfill.atomic is False  # each batch commits on its own
    assert {type(op).__name__ for op in backfill.operations} == {"RunPython"}
    assert all(op.reversible for op in backfill.operations)


def test_the_migration_indexes_the_expression_the_backfill_queries():
    migration = importlib.import_module("billing.migrations.0003_backfill_renewal_invoices")
    assert migration.SUBSCRIPTION_SQL == EVENT_SUBSCRIPTION_SQL
    assert migration.INDEX_NAME == EVENT_INDEX_NAME
    assert EVENT_TYPES_SQL in migration.INDEX_SQL


def test_migration_graph_has_no_conflicts():
    loader = MigrationLoader(None, ignore_no_migrations=True)
    assert loader.detect_conflicts() == {}
    assert len(loader.graph.leaf_nodes("billing")) == 1


@pytest.mark.django_db
def test_models_and_migrations_agree():
    # Raises SystemExit(1) if a model change has no migration.
    call_command("makemigrations", "--check", "--dry-run", stdout=io.StringIO(), stderr=io.StringIO())

"""``manage.py backfill_renewal_invoices``: options, summary, dry run, resume, idempotence."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.management.commands import backfill_renewal_invoices as command
from billing.models import Renewal
from billing.tests.conftest import DAY, T0
from billing.tests.test_backfill import WORLD_AFTER, Expected, build_world, real_models, utc, world_state

pytestmark = pytest.mark.django_db


class Terminal(io.StringIO):
    def isatty(self):
        return True


def backfill(*args, stderr=None) -> tuple[str, str]:
    out, err = io.StringIO(), stderr if stderr is not None else io.StringIO()
    call_command("backfill_renewal_invoices", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def figures(output: str) -> dict[str, int]:
    """The summary's ``label  value`` lines as a dict."""
    return {
        label: int(value.replace(",", ""))
        for label, value in re.findall(r"^  ([a-z][a-z -]+?)\s{2,}([\d,]+)$", output, flags=re.MULTILINE)
    }


@pytest.fixture
def world():
    return build_world(real_models())


def test_summary_reports_each_count(world):
    out, _ = backfill("--batch-size", "3")

    expected = Expected()
    assert figures(out) == {
        "renewals examined": expected.renewals,
        "renewals changed": expected.renewals_changed,
        "linked": expected.linked,
        "already linked": expected.already_linked,
        "conflicts": expected.conflicts,
        "unmatched invoices": expected.unmatched,
        "malformed invoices": expected.malformed,
        "unreadable invoice events": expected.unreadable_events,
        "effective dates derived": expected.effective_dates_derived,
        "effective dates not derivable": expected.effective_dates_underivable,
        "renewals still without invoice": expected.still_unlinked,
        "invoices matching renewals outside --since": 0,
        "history rows written": expected.history_rows,
    }
    assert "conflicts (first 1):" in out and "in_c_new also matches it" in out
    assert "unreadable events of malformed invoices (first 2):" in out
    assert "(in_d0): the invoice has no lines" in out and "(in_d0): PayloadError: line_item" in out
    assert world_state(Renewal, world) == WORLD_AFTER


def test_dry_run_reports_what_would_change_and_changes_nothing(world):
    before, history = world_state(Renewal, world), Renewal.history.count()

    out, _ = backfill("--dry-run")

    assert "dry run: nothing was changed" in out
    assert figures(out)["renewals that would change"] == Expected.renewals_changed
    assert figures(out)["linked"] == Expected.linked
    assert figures(out)["history rows written"] == 0
    assert world_state(Renewal, world) == before and Renewal.history.count() == history


def test_interrupted_run_keeps_its_batches_and_a_rerun_resumes(world, monkeypatch):
    feed = command._ProgressAdapter.__call__

    def interrupt_after_first_batch(self, report):
        feed(self, report)
        if report.batches == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(command._ProgressAdapter, "__call__", interrupt_after_first_batch)
    out = io.StringIO()
    with pytest.raises(CommandError, match="interrupted"):
        call_command("backfill_renewal_invoices", "--batch-size", "2", stdout=out, stderr=io.StringIO())
    assert figures(out.getvalue())["renewals changed"] == 2  # sub_a's two renewals, committed
    assert world_state(Renewal, world)["a1"] == WORLD_AFTER["a1"]
    assert world_state(Renewal, world)["b1"] != WORLD_AFTER["b1"]

    monkeypatch.setattr(command._ProgressAdapter, "__call__", feed)
    out, _ = backfill("--batch-size", "2")
    assert figures(out)["renewals examined"] == Expected.renewals - 2
    assert figures(out)["renewals changed"] == Expected.renewals_changed - 2
    assert world_state(Renewal, world) == WORLD_AFTER


def test_second_run_changes_nothing(world):
    backfill()
    history = Renewal.history.count()

    out, _ = backfill()

    counts = figures(out)
    assert counts["renewals changed"] == counts["linked"] == counts["effective dates derived"] == 0
    # Only subscriptions with a renewal still missing a value are read again (c, d, e, f, g).
    assert counts["renewals examined"] == Expected.still_unlinked
    assert (counts["already linked"], counts["conflicts"], counts["malformed invoices"]) == (1, 1, 1)
    assert Renewal.history.count() == history
    assert world_state(Renewal, world) == WORLD_AFTER


def test_subscription_and_since_filters(world):
    out, _ = backfill("--subscription", "sub_l", "--subscription", "sub_b")
    assert (figures(out)["renewals examined"], figures(out)["linked"]) == (2, 2)
    state = world_state(Renewal, world)
    assert state["l0"] == WORLD_AFTER["l0"] and state["a0"] == (None, None)

    # Effective since T0 + 1 day, or undated and created since: a0, a1, c1, e0, f0, f1 (not d0, g0).
    out, _ = backfill("--since", (utc(T0 + DAY)).date().isoformat())
    assert figures(out)["renewals examined"] == 6
    assert world_state(Renewal, world)["a1"] == WORLD_AFTER["a1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subscription", "sub_nope"], "unknown subscription"),
        (["--batch-size", "0"], "at least 1"),
        (["--since", "yesterday"], "not a date"),
    ],
)
def test_bad_options_are_refused(world, args, message):
    with pytest.raises(CommandError, match=message):
        backfill(*args)


def test_progress_is_plain_lines_when_not_a_terminal(world):
    _, err = backfill("--batch-size", "2")
    assert re.search(r"^renewals: 10/10 \([\d,]+/s, ETA [\d,]+ s\) done$", err, flags=re.MULTILINE)
    assert "\r" not in err


def test_progress_is_a_bar_with_rate_and_eta_on_a_terminal(world):
    terminal = Terminal()
    backfill("--batch-size", "2", stderr=terminal)
    bar = terminal.getvalue()
    assert "\r" in bar and "renewals: 100%" in bar and "10/10" in bar
    assert re.search(r"row/s", bar)


# --- Committed for real, as ``manage.py`` runs ------------------------------------------------
#
# The tests above run inside the test's transaction, where each batch is a savepoint. These
# commit for real: each batch is a transaction of its own, so what an interruption or a failure
# leaves behind is what the batches before it committed.


@pytest.mark.django_db(transaction=True)
def test_committed_run_reaches_the_same_state_and_counts():
    world = build_world(real_models())

    out, _ = backfill("--batch-size", "2")

    expected = Expected()
    counts = figures(out)
    assert (
        counts["renewals changed"],
        counts["linked"],
        counts["already linked"],
        counts["conflicts"],
        counts["malformed invoices"],
        counts["history rows written"],
    ) == (
        expected.renewals_changed,
        expected.linked,
        expected.already_linked,
        expected.conflicts,
        expected.malformed,
        expected.history_rows,
    )
    assert world_state(Renewal, world) == WORLD_AFTER


@pytest.mark.django_db(transaction=True)
def test_committed_dry_run_changes_nothing():
    world = build_world(real_models())
    before, history = world_state(Renewal, world), Renewal.history.count()

    out, _ = backfill("--dry-run", "--batch-size", "2")

    assert figures(out)["renewals that would change"] == Expected.renewals_changed
    assert figures(out)["already linked"] == Expected.already_linked
    assert world_state(Renewal, world) == before and Renewal.history.count() == history


@pytest.mark.django_db(transaction=True)
def test_committed_run_interrupted_then_resumed(monkeypatch):
    world = build_world(real_models())
    feed = command._ProgressAdapter.__call__

    def interrupt_after_first_batch(self, report):
        feed(self, report)
        if report.batches == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(command._ProgressAdapter, "__call__", interrupt_after_first_batch)
    with pytest.raises(CommandError, match="interrupted"):
        backfill("--batch-size", "2")
    partial = world_state(Renewal, world)
    assert partial["a0"] == WORLD_AFTER["a0"]  # the first batch is committed
    assert partial != WORLD_AFTER  # and the run stopped: not everything is done

    monkeypatch.setattr(command._ProgressAdapter, "__call__", feed)
    backfill("--batch-size", "2")
    assert world_state(Renewal, world) == WORLD_AFTER
    history = Renewal.history.count()

    out, _ = backfill("--batch-size", "2")
    assert figures(out)["renewals changed"] == 0 and Renewal.history.count() == history


@pytest.mark.django_db(transaction=True)
def test_a_failure_stops_the_run_and_a_rerun_completes(monkeypatch):
    from billing import backfill as service

    world = build_world(real_models())
    read, calls = service._Run.read_invoices, []

    def fail_on_second_batch(self, stripe_ids):
        calls.append(stripe_ids)
        if len(calls) == 2:
            raise RuntimeError("the database went away")
        return read(self, stripe_ids)

    monkeypatch.setattr(service._Run, "read_invoices", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="went away"):
        backfill("--batch-size", "2")
    partial = world_state(Renewal, world)
    assert partial["a0"] == WORLD_AFTER["a0"] and partial != WORLD_AFTER  # the first batch stays committed

    monkeypatch.setattr(service._Run, "read_invoices", read)
    backfill("--batch-size", "2")
    assert world_state(Renewal, world) == WORLD_AFTER


@pytest.mark.django_db(databases=[])
def test_on_sqlite_migrate_skips_the_backfill_and_the_command_says_it_needs_postgresql(tmp_path):
    """make run's SQLite database migrates (0003 has nothing to do there); the command refuses
    clearly instead of writing with statements SQLite does not have."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "DJANGO_SECRET_KEY": "test"}
    manage = [sys.executable, str(root / "manage.py")]
    migrate = subprocess.run([*manage, "migrate", "--noinput"], env=env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    run = subprocess.run([*manage, "backfill_renewal_invoices"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "PostgreSQL only" in run.stderr and "Traceback" not in run.stderr

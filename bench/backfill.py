"""Backfill benchmark: ``manage.py backfill_renewal_invoices`` on 1,000,000 renewals.

    .venv/bin/python -m bench.backfill                      # 1M renewals (about 5 minutes)
    .venv/bin/python -m bench.backfill --quick              # 100k renewals, goals on projections
    .venv/bin/python -m bench.backfill --renewals 200000
    .venv/bin/python -m bench.backfill --reuse              # the data of the last run, same size
    .venv/bin/python -m bench.backfill --reuse --command-only   # only the command (quick iterations)

What it does, in a dedicated database ``billing_bench_backfill`` (dropped and created, then
migrated) on the server of ``--database-url``:

1. generates the data in PostgreSQL itself (``INSERT ... SELECT`` over ``generate_series``):
   one account and subscription per 4 renewals, half with a trial; each subscription's paid
   windows (entitlements), its renewals as provisioning leaves them before migration 0002's
   fields are filled (no ``effective_date``, no ``stripe_invoice_id``; processed ones point at
   their entitlements, a tenth do not), and for each invoice its stored ``invoice.created``
   and ``invoice.paid`` events, in Stripe's current layout but with few fields. Some cases
   are seeded throughout: renewals already linked, conflicting links, invoices whose events
   have no lines, subscriptions with no events at all;
2. times the two baselines on the same data, restoring it after each: the per-row ORM loop of
   Open edX's migration 0028 (``enterprise_access/apps/customer_billing/migrations/
   0028_backfill_renewal_invoice_and_effective_date.py``: for each renewal, query, parse,
   ``save()``) on a sample, scaled to all rows; and one set-based ``UPDATE ... FROM`` (the
   floor: the database alone, no history rows, no per-invoice bookkeeping);
3. runs the command in a subprocess, measuring wall time and peak RSS (the child's own
   ``VmHWM``, see ``_peak_rss_kb``), and checks that it leaves exactly the links and dates the
   floor computed.

Each timed run starts after a ``CHECKPOINT`` and a ``sync``, so that none pays for writing back
what the generation or the previous restore dirtied.

``--reuse`` keeps the database of an earlier run of the same size (restoring its renewals and
dropping its history rows first) instead of generating it again; ``--command-only`` (with
``--reuse``) skips the two baselines and checks the command against the floor's state recorded
in the database by the last run that timed it. Neither writes the reports of a full run: their
results go to ``backfill-reuse.*`` / ``backfill-command.*``.

Results: ``<results_dir>/backfill[-quick].json`` and ``.md``. The harness never sets Django up:
only the subprocesses (``manage.py``, the per-row loop) do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.core import goal, goals_table, log, table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DATABASE = "billing_bench_backfill"
RENEWALS_PER_SUBSCRIPTION = 4
PER_ROW_SAMPLE = 5_000
BATCH_SIZE = 1_000

GOAL_SECONDS_PER_MILLION = 120.0  # issue 19: the rewritten, single-threaded backfill may take longer than 60 s
GOAL_PEAK_RSS_MB = 300.0
GOAL_PER_ROW_SPEEDUP = 20.0

DAY = 86_400
PERIOD = 30 * DAY
TRIAL = 14 * DAY
BASE = 1_767_225_600  # 2026-01-01T00:00:00Z


def run(
    *,
    renewals: int = 1_000_000,
    database_url: str,
    results_dir: Path = RESULTS,
    quick: bool = False,
    reuse: bool = False,
    command_only: bool = False,
) -> dict:
    """Generate, time the baselines and the command, check, report; returns all figures."""
    if command_only and not reuse:
        raise ValueError("--command-only needs --reuse (the floor's state of an earlier run)")
    if quick:
        renewals = min(renewals, 100_000)
    subscriptions = max(1, renewals // RENEWALS_PER_SUBSCRIPTION)
    renewals = subscriptions * RENEWALS_PER_SUBSCRIPTION
    url = _database_url(database_url, DATABASE)
    result: dict = {
        "benchmark": "backfill",
        "renewals": renewals,
        "subscriptions": subscriptions,
        "quick": quick,
        "command_only": command_only,
        "meta": _meta(database_url),
    }

    reused = _reusable(url, subscriptions) if reuse else None
    if reuse and reused is None:
        log(f"backfill: no reusable {DATABASE} of {subscriptions:,} subscriptions; generating it")
    if reused is None:
        if command_only:
            raise RuntimeError("--command-only: no earlier run of this size to compare with")
        log(f"backfill: recreating {DATABASE} and migrating")
        _recreate_database(database_url)
        _manage(url, "migrate", "--noinput", "-v", "0")
    result["reused"] = reused is not None

    with psycopg.connect(url, autocommit=True) as conn:
        if reused is None:
            log(f"backfill: generating {renewals:,} renewals of {subscriptions:,} subscriptions")
            result["generation"] = _generate(conn, subscriptions)
            log(
                f"backfill: generated in {result['generation']['seconds']:.0f} s "
                f"({result['generation']['events']:,} events)"
            )
        else:
            log(f"backfill: reusing {DATABASE} ({subscriptions:,} subscriptions)")
            result["generation"] = reused
            _restore(conn)

        if command_only:
            recorded = conn.execute("SELECT to_regclass('bench_baselines') IS NOT NULL").fetchone()[0]
            row = conn.execute("SELECT figures FROM bench_baselines").fetchone() if recorded else None
            if row is None:
                raise RuntimeError("--command-only: no baselines recorded on this data; run once with --reuse")
            saved = row[0]
            result["per_row"], result["floor"] = saved["per_row"], saved["floor"]
        else:
            sample = min(PER_ROW_SAMPLE, renewals)
            log(f"backfill: per-row ORM loop on {sample:,} renewals")
            _settle(conn)
            per_row = _per_row_baseline(url, sample)
            per_row["rows_per_second"] = per_row["rows"] / per_row["seconds"]
            per_row["projected_seconds"] = renewals / per_row["rows_per_second"]
            result["per_row"] = per_row
            _restore(conn)

            log("backfill: set-based UPDATE ... FROM (the floor)")
            _settle(conn)
            started = time.perf_counter()
            floor_rows = conn.execute(FLOOR_SQL).rowcount
            floor_seconds = time.perf_counter() - started
            result["floor"] = {"seconds": floor_seconds, "rows": floor_rows, "state": _state(conn)}
            _restore(conn)
            # Kept for --command-only runs on this data.
            conn.execute("CREATE TABLE IF NOT EXISTS bench_baselines (figures jsonb NOT NULL)")
            conn.execute("TRUNCATE bench_baselines")
            conn.execute(
                "INSERT INTO bench_baselines VALUES (%s::jsonb)",
                [json.dumps({"per_row": result["per_row"], "floor": result["floor"]})],
            )

        log(f"backfill: manage.py backfill_renewal_invoices --batch-size {BATCH_SIZE}")
        _settle(conn)
        command = _measure(url, "backfill_renewal_invoices", "--batch-size", str(BATCH_SIZE))
        command["state"] = _state(conn)
        command["summary"] = _summary(command.pop("stdout"))
        result["command"] = command
        result["expected"] = _expected(subscriptions)

    command, floor = result["command"], result["floor"]
    command["rows_per_second"] = renewals / command["seconds"]
    projected = command["seconds"] * 1_000_000 / renewals
    result["checks"] = {
        "same_state_as_floor": command["state"]["digest"] == floor["state"]["digest"],
        "links_as_generated": command["state"]["linked"] == result["expected"]["linked"],
        "exit_code": command["exit_code"],
    }
    scaled = "" if renewals == 1_000_000 else f" (scaled from {renewals:,})"
    result["goals"] = [
        goal(
            f"1,000,000 renewals in < {GOAL_SECONDS_PER_MILLION:.0f} s",
            projected < GOAL_SECONDS_PER_MILLION,
            f"{projected:.1f} s{scaled}",
        ),
        goal(
            f"peak RSS < {GOAL_PEAK_RSS_MB:.0f} MB",
            command["peak_rss_mb"] < GOAL_PEAK_RSS_MB,
            f"{command['peak_rss_mb']:.0f} MB",
        ),
        # Reported, no longer a goal: issue 19 traded the threads that kept the backfill within
        # 3x of the set-based floor for a module of about 400 lines ("it may take longer").
        goal(
            "time against the set-based SQL floor (reported, no longer a goal)",
            None,
            f"{command['seconds'] / floor['seconds']:.2f}x ({floor['seconds']:.1f} s floor)",
        ),
        goal(
            f">= {GOAL_PER_ROW_SPEEDUP:.0f}x faster than the per-row loop",
            result["per_row"]["projected_seconds"] >= GOAL_PER_ROW_SPEEDUP * command["seconds"],
            f"{result['per_row']['projected_seconds'] / command['seconds']:.0f}x",
        ),
        goal(
            "same links and dates as the floor, exit 0",
            result["checks"]["same_state_as_floor"]
            and result["checks"]["links_as_generated"]
            and command["exit_code"] == 0,
            f"{command['state']['linked']:,} linked, {command['state']['dated']:,} dated",
        ),
    ]
    result["markdown"] = _markdown(result)
    stem = "backfill-quick" if quick else "backfill"
    if command_only:
        stem += "-command"
    elif reused is not None:
        stem += "-reuse"
    _write(result, Path(results_dir), stem)
    return result


# --- database ------------------------------------------------------------------------------


def _database_url(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _recreate_database(server_url: str) -> None:
    with psycopg.connect(_database_url(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")


def _environment(url: str) -> dict:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=url,
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY=env.get("DJANGO_SECRET_KEY") or "bench",
        PYTHONUNBUFFERED="1",
    )
    return env


def _manage(url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=_environment(url),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


class _PeakRss:
    """The high-water mark of a child's resident set since its ``exec`` (``VmHWM``), polled.

    ``wait4``'s ``ru_maxrss`` is no measure of the command: Linux keeps it across ``exec``, so
    it starts at the size of the harness that forked the child (a child of 34 MB forked by a
    300 MB process reports 314 MB). ``VmHWM`` belongs to the memory map that ``exec`` made
    fresh; read every 50 ms, it misses at most the last 50 ms of a run.
    """

    def __init__(self, pid: int):
        self.pid, self.kb, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.kb = max(self.kb, int(line.split()[1]))
                            break
            except OSError:  # exited (or no /proc): keep the last figure
                pass
            self._done.wait(0.05)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.kb


def _measure(url: str, *args: str) -> dict:
    """Run ``manage.py *args``; wall time and this child's own peak RSS (``_PeakRss``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=_environment(url), stdout=out, stderr=err
        )
        peak = _PeakRss(child.pid)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: the pid is still its
        peak_kb = peak.stop()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode:
        log(f"backfill: command failed:\n{stdout}\n{stderr[-4000:]}")
    return {
        "argv": ["manage.py", *args],
        "seconds": seconds,
        "peak_rss_mb": peak_kb / 1024,
        "wait4_maxrss_mb": usage.ru_maxrss / 1024,  # includes the harness's size at fork: not the command's
        "user_cpu_seconds": usage.ru_utime,
        "exit_code": child.returncode,
        "stdout": stdout,
        "progress_lines": [line for line in stderr.splitlines() if line.startswith("renewals:")][-3:],
    }


def _summary(stdout: str) -> dict:
    figures = {}
    for line in stdout.splitlines():
        if line.startswith("  ") and line.rstrip()[-1:].isdigit():
            label, _, value = line.strip().rpartition("  ")
            figures[label.strip()] = int(value.replace(",", ""))
    return figures


# --- data ----------------------------------------------------------------------------------

# Per subscription s (1..S): anchor a, trial for even s, end of the first period f. Renewal k
# (0..3) takes effect at f + k*PERIOD; 0..2 are processed, 3 is the next one, not invoiced yet.
# Entitlement j (0..3): the first window [a, f] (trial or paid), then the paid window each
# processed renewal started. Invoices: "f" (the first, [a, f]) and 0..2 (one per processed
# renewal), each with an invoice.created and an invoice.paid event.
# Subscriptions are numbered in the order they were created, over 180 days (give or take an
# hour), as primary keys are in production.
_SUBS = """
    SELECT s, a, trial, a + CASE WHEN trial THEN {trial} ELSE {period} END AS f
      FROM (SELECT s, {base} + (s::bigint * 180 * {day}) / {subs} + (s * 7919) % 3600 AS a, s % 2 = 0 AS trial
              FROM generate_series(1, {subs}) AS s) AS x
"""
BULK_TABLES = (
    "provisioning_account",
    "billing_subscription",
    "provisioning_entitlement",
    "billing_renewal",
    "billing_stripeevent",
)

_GENERATE = [
    (
        "accounts",
        """
        INSERT INTO provisioning_account (id, name, stripe_customer_id, billing_email, default_payment_method_id,
                                          payment_method_added_at, created_at, updated_at)
        SELECT s, 'Bench customer ' || s, 'cus_bench' || s, '', '', NULL, now(), now()
          FROM generate_series(1, {subs}) AS s
    """,
    ),
    (
        "subscriptions",
        """
        INSERT INTO billing_subscription (id, stripe_created, last_event_created, last_event_id, created_at,
               updated_at, stripe_id, status, quantity, price_id, current_period_start, current_period_end,
               trial_start, trial_end, cancel_at_period_end, cancel_at, canceled_at, ended_at, account_id,
               livemode)
        SELECT s, to_timestamp(a), NULL, '', now(), now(), 'sub_bench' || s, 'active', 1 + s % 5, 'price_standard',
               to_timestamp(f + 2 * {period}), to_timestamp(f + 3 * {period}),
               CASE WHEN trial THEN to_timestamp(a) END, CASE WHEN trial THEN to_timestamp(f) END,
               false, NULL, NULL, NULL, s, false
          FROM ({subs_sql}) AS sub
    """,
    ),
    (
        "entitlements",
        """
        INSERT INTO provisioning_entitlement (id, kind, seats, starts_at, expires_at, stripe_subscription_id,
                                              stripe_invoice_id, created_at, updated_at, account_id)
        SELECT (s - 1) * 4 + j + 1, CASE WHEN j = 0 AND trial THEN 'trial' ELSE 'paid' END, 1 + s % 5,
               to_timestamp(CASE WHEN j = 0 THEN a ELSE f + (j - 1) * {period} END),
               to_timestamp(f + j * {period}),
               'sub_bench' || s,
               CASE WHEN j = 0 AND trial THEN '' WHEN j = 0 THEN 'in_bench' || s || '_f'
                    ELSE 'in_bench' || s || '_' || (j - 1) END,
               now(), now(), s
          FROM ({subs_sql}) AS sub CROSS JOIN generate_series(0, 3) AS j
    """,
    ),
    # Created in time order (renewal k of every subscription before k + 1), as provisioning
    # creates them: a subscription's renewals are spread over the table, as in production.
    (
        "renewals",
        """
        INSERT INTO billing_renewal (id, processed_at, created_at, updated_at, from_entitlement_id,
                                     to_entitlement_id, subscription_id, effective_date, stripe_invoice_id)
        SELECT k * {subs} + s,
               CASE WHEN k < 3 THEN to_timestamp(f + k * {period} + 3600) END,
               to_timestamp(CASE WHEN k = 0 THEN a ELSE f + (k - 1) * {period} END),
               to_timestamp(CASE WHEN k = 0 THEN a ELSE f + (k - 1) * {period} END),
               CASE WHEN k < 3 AND s % 10 <> 9 THEN (s - 1) * 4 + k + 1 END,
               CASE WHEN k < 3 AND s % 10 <> 9 THEN (s - 1) * 4 + k + 2 END,
               s,
               CASE WHEN s % 100 = 1 AND k = 0 THEN to_timestamp(f)
                    WHEN s % 100 = 2 AND k = 1 THEN to_timestamp(f + {period}) END,
               CASE WHEN s % 100 = 1 AND k = 0 THEN 'in_bench' || s || '_0'
                    WHEN s % 100 = 2 AND k = 1 THEN 'in_bench' || s || '_1_old' END
          FROM ({subs_sql}) AS sub CROSS JOIN generate_series(0, 3) AS k
         ORDER BY k, s
    """,
    ),
    # Stored events in the order Stripe created them. Subscriptions s % 1000 = 4 have none;
    # for s % 100 = 3 both events of invoice 1 lost their lines (malformed). The payload is
    # written as text (format() then ::jsonb): much faster than nested jsonb_build_object.
    (
        "events",
        """
        INSERT INTO billing_stripeevent (id, type, api_version, livemode, created, object_id, payload, status,
                                         attempts, last_error, received_at, processed_at)
        SELECT event_id, type, '2025-10-29.clover', false, to_timestamp(created), invoice_id,
               format('{{"id": "%s", "object": "event", "api_version": "2025-10-29.clover", "created": %s, '
                      '"livemode": false, "pending_webhooks": 1, "request": {{"id": null, "idempotency_key": null}}, '
                      '"type": "%s", "data": {{"object": {{"id": "%s", "object": "invoice", "customer": "cus_bench%s", '
                      '"currency": "usd", "status": "%s", "billing_reason": "%s", "total": %s, "amount_due": %s, '
                      '"amount_paid": %s, "created": %s, "parent": {{"type": "subscription_details", '
                      '"quote_details": null, "subscription_details": {{"metadata": {{}}, "subscription": "sub_bench%s"}}}}%s}}}}}}',
                      event_id, created, type, invoice_id, s, CASE WHEN paid THEN 'paid' ELSE 'draft' END,
                      CASE WHEN inv = 'f' THEN 'subscription_create' ELSE 'subscription_cycle' END,
                      amount, amount, CASE WHEN paid THEN amount ELSE 0 END, start, s,
                      CASE WHEN s % 100 = 3 AND inv = '1' THEN '' ELSE format(
                          ', "lines": {{"object": "list", "has_more": false, "url": "/v1/invoices/%s/lines", '
                          '"data": [{{"id": "il_%s", "object": "line_item", "amount": %s, "currency": "usd", '
                          '"quantity": %s, "period": {{"start": %s, "end": %s}}, "parent": {{"type": '
                          '"subscription_item_details", "subscription_item_details": {{"invoice_item": null, '
                          '"proration": false, "subscription": "sub_bench%s", "subscription_item": "si_bench%s"}}}}}}]}}',
                          invoice_id, invoice_id, amount, 1 + s % 5, start, stop, s, s) END)::jsonb,
               'processed', 1, '', to_timestamp(created), to_timestamp(created)
          FROM (
            SELECT s, inv.name AS inv, paid, 'in_bench' || s || '_' || inv.name AS invoice_id,
                   'evt_bench' || s || '_' || inv.name || CASE WHEN paid THEN 'p' ELSE 'c' END AS event_id,
                   CASE WHEN paid THEN 'invoice.paid' ELSE 'invoice.created' END AS type,
                   start, start + CASE WHEN paid THEN 3600 ELSE 0 END AS created,
                   CASE WHEN inv.name = 'f' THEN f ELSE f + (inv.k + 1) * {period} END AS stop,
                   CASE WHEN inv.name = 'f' AND trial THEN 0 ELSE 2000 * (1 + s % 5) END AS amount
              FROM ({subs_sql}) AS sub
             CROSS JOIN (VALUES ('f', -1), ('0', 0), ('1', 1), ('2', 2)) AS inv(name, k)
             CROSS JOIN (VALUES (false), (true)) AS kind(paid)
             CROSS JOIN LATERAL (SELECT CASE WHEN inv.name = 'f' THEN a ELSE f + inv.k * {period} END AS start) AS t
             WHERE s % 1000 <> 4
             ORDER BY start + CASE WHEN paid THEN 3600 ELSE 0 END, s
          ) AS events
    """,
    ),
]


def _generate(conn, subscriptions: int) -> dict:
    values = dict(subs=subscriptions, period=PERIOD, trial=TRIAL, base=BASE, day=DAY)
    values["subs_sql"] = _SUBS.format(**values)
    timings = {}
    started = time.perf_counter()
    # A bulk load: no commit flushes, no foreign-key triggers (the data is consistent by
    # construction), secondary indexes built once at the end instead of row by row.
    conn.execute("SET synchronous_commit = off")
    conn.execute("SET session_replication_role = replica")
    conn.execute("SET maintenance_work_mem = '512MB'")
    conn.execute("SET work_mem = '256MB'")
    indexes = conn.execute(
        """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
         WHERE t.relname = ANY(%s)
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
    """,
        [list(BULK_TABLES)],
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    for name, sql in _GENERATE:
        step = time.perf_counter()
        conn.execute(sql.format(**values))
        timings[name] = round(time.perf_counter() - step, 1)
    step = time.perf_counter()
    for _, definition in indexes:
        conn.execute(definition)
    timings["indexes"] = round(time.perf_counter() - step, 1)
    conn.execute("SET session_replication_role = DEFAULT")
    for table_name, sequence_of in (
        ("provisioning_account", "id"),
        ("billing_subscription", "id"),
        ("provisioning_entitlement", "id"),
        ("billing_renewal", "id"),
    ):
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table_name}', '{sequence_of}'),"
            f" (SELECT max(id) FROM {table_name}))"
        )
    # The pristine renewals, to restore after each baseline.
    conn.execute("CREATE TABLE bench_renewal_seed AS SELECT id, effective_date, stripe_invoice_id FROM billing_renewal")
    conn.execute("ALTER TABLE bench_renewal_seed ADD PRIMARY KEY (id)")
    step = time.perf_counter()
    conn.execute("VACUUM ANALYZE")
    timings["vacuum_analyze"] = round(time.perf_counter() - step, 1)
    events = conn.execute("SELECT count(*) FROM billing_stripeevent").fetchone()[0]
    size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('billing_stripeevent'))").fetchone()[0]
    return {"seconds": time.perf_counter() - started, "steps": timings, "events": events, "events_size": size}


def _reusable(url: str, subscriptions: int) -> dict | None:
    """The generation figures of an earlier run's database if it has ``subscriptions``, else None."""
    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError:
        return None  # no such database
    with conn:
        seeded = conn.execute("SELECT to_regclass('bench_renewal_seed') IS NOT NULL").fetchone()[0]
        if not seeded or conn.execute("SELECT count(*) FROM billing_subscription").fetchone()[0] != subscriptions:
            return None
        events = conn.execute("SELECT count(*) FROM billing_stripeevent").fetchone()[0]
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('billing_stripeevent'))").fetchone()[0]
    return {"seconds": 0.0, "steps": {}, "events": events, "events_size": size, "reused": True}


def _settle(conn) -> None:
    """Before each timed run: flush what the step before wrote (generating, restoring).

    Otherwise the run pays for it: PostgreSQL's checkpointer and the kernel writing back
    gigabytes of pages the generation or the restore dirtied, on the same two cores and disk.
    Each of the three timed runs starts from a checkpoint.
    """
    started = time.perf_counter()
    try:
        conn.execute("CHECKPOINT")
    except psycopg.Error as exc:  # not a superuser, nor pg_checkpoint: the runs start unsettled
        log(f"backfill: CHECKPOINT refused ({exc.sqlstate}); timing without it")
    os.sync()
    log(f"backfill: checkpoint and sync in {time.perf_counter() - started:.0f} s")


def _restore(conn) -> None:
    """Put the renewals back as generated and drop history rows; vacuum so the next run starts clean."""
    started = time.perf_counter()
    conn.execute("""
        UPDATE billing_renewal r SET effective_date = s.effective_date, stripe_invoice_id = s.stripe_invoice_id
          FROM bench_renewal_seed s
         WHERE r.id = s.id AND (r.effective_date IS DISTINCT FROM s.effective_date
                                OR r.stripe_invoice_id IS DISTINCT FROM s.stripe_invoice_id)
    """)
    conn.execute("TRUNCATE billing_historicalrenewal")
    conn.execute("VACUUM ANALYZE billing_renewal")
    conn.execute("VACUUM ANALYZE billing_historicalrenewal")
    log(f"backfill: data restored in {time.perf_counter() - started:.0f} s")


def _state(conn) -> dict:
    row = conn.execute("""
        SELECT count(*) FILTER (WHERE stripe_invoice_id IS NOT NULL),
               count(*) FILTER (WHERE effective_date IS NOT NULL),
               md5(string_agg(id || ':' || coalesce(extract(epoch FROM effective_date)::bigint::text, '-') || ':'
                              || coalesce(stripe_invoice_id, '-'), ',' ORDER BY id))
          FROM billing_renewal
    """).fetchone()
    history = conn.execute("SELECT count(*) FROM billing_historicalrenewal").fetchone()[0]
    return {"linked": row[0], "dated": row[1], "digest": row[2], "history_rows": history}


def _expected(subscriptions: int) -> dict:
    """What the generated data implies: each processed renewal linked (a conflicting link stays),
    except invoice 1 of s % 100 = 3 (malformed) and subscriptions without events; all dated."""
    with_events = [s for s in range(1, subscriptions + 1) if s % 1000 != 4]
    linked = 3 * len(with_events) - sum(1 for s in with_events if s % 100 == 3)
    return {"linked": linked, "dated": subscriptions * RENEWALS_PER_SUBSCRIPTION}


# The floor: the same decisions as one statement (no history rows, no per-invoice counts).
# Invoices are joined on (subscription, exact period start); the created and paid events of an
# invoice give the same link, and UPDATE ... FROM applies one of them.
FLOOR_SQL = """
WITH invoices AS (
    SELECT e.object_id AS invoice_id,
           COALESCE(e.payload #>> '{data,object,parent,subscription_details,subscription}',
                    e.payload #>> '{data,object,subscription}') AS subscription,
           to_timestamp((jsonb_path_query_first(e.payload,
               '$.data.object.lines.data[*] ? (@.parent.type == "subscription_item_details"
                                                && @.parent.subscription_item_details.proration == false)
                .period.start'))::text::bigint) AS period_start
      FROM billing_stripeevent e
     WHERE e.type IN ('invoice.created', 'invoice.paid')
),
windows AS (
    SELECT stripe_subscription_id, expires_at,
           row_number() OVER (PARTITION BY stripe_subscription_id ORDER BY starts_at) - 1 AS rank
      FROM provisioning_entitlement
     WHERE kind = 'paid'
),
ranked AS (
    SELECT r.id, r.subscription_id, r.effective_date, r.stripe_invoice_id, r.processed_at,
           fe.expires_at AS from_expires, te.starts_at AS to_starts,
           lag(te.expires_at) OVER w AS previous_to_expires,
           row_number() OVER w - 1 AS position,
           count(*) OVER (PARTITION BY r.subscription_id) AS siblings
      FROM billing_renewal r
      LEFT JOIN provisioning_entitlement fe ON fe.id = r.from_entitlement_id
      LEFT JOIN provisioning_entitlement te ON te.id = r.to_entitlement_id
    WINDOW w AS (PARTITION BY r.subscription_id ORDER BY r.id)
),
dated AS (
    SELECT k.id, k.stripe_invoice_id, s.stripe_id,
           COALESCE(k.effective_date, k.to_starts, k.from_expires,
                    CASE WHEN k.position = 0 THEN s.trial_end END,
                    CASE WHEN k.position > 0 THEN k.previous_to_expires END,
                    w.expires_at,
                    CASE WHEN k.position = k.siblings - 1 AND k.processed_at IS NULL
                         THEN s.current_period_end END) AS effective_date
      FROM ranked k
      JOIN billing_subscription s ON s.id = k.subscription_id
      LEFT JOIN windows w ON w.stripe_subscription_id = s.stripe_id
                         AND w.rank = k.position - CASE WHEN s.trial_end IS NOT NULL THEN 1 ELSE 0 END
     WHERE k.effective_date IS NULL OR k.stripe_invoice_id IS NULL
)
UPDATE billing_renewal r
   SET effective_date = d.effective_date,
       stripe_invoice_id = COALESCE(d.stripe_invoice_id, i.invoice_id),
       updated_at = now()
  FROM dated d
  LEFT JOIN invoices i
         ON i.subscription = d.stripe_id AND i.period_start = d.effective_date AND d.stripe_invoice_id IS NULL
        AND NOT EXISTS (SELECT 1 FROM billing_renewal x WHERE x.stripe_invoice_id = i.invoice_id)
 WHERE r.id = d.id
"""


# --- the per-row baseline (runs in its own process, with Django) ------------------------------


def _per_row_baseline(url: str, sample: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.backfill", "_per-row", "--sample", str(sample)],
        cwd=ROOT,
        env=_environment(url),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"per-row baseline failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _per_row_main(sample: int) -> None:
    """Open edX 0028's shape: for each renewal, look its data up, parse, ``save()``.

    Given every advantage it can have here: the events of a subscription are found through the
    expression index of migration 0003, and the matching rule is the real one.
    """
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.db.models import Q

    from billing.backfill import EVENT_SUBSCRIPTION_SQL
    from billing.matching import pick_by_instant
    from billing.models import Renewal, StripeEvent
    from billing.stripe_payloads import read_invoice

    started = time.perf_counter()
    rows = 0
    missing = Q(effective_date__isnull=True) | Q(stripe_invoice_id__isnull=True)
    for renewal in Renewal.objects.filter(missing).order_by("pk")[:sample]:
        subscription = renewal.subscription
        changed = []
        if renewal.effective_date is None:
            when = None
            if renewal.to_entitlement_id:
                when = renewal.to_entitlement.starts_at
            elif renewal.from_entitlement_id:
                when = renewal.from_entitlement.expires_at
            elif (
                subscription.trial_end
                and not Renewal.objects.filter(subscription=subscription, pk__lt=renewal.pk).exists()
            ):
                when = subscription.trial_end
            if when is not None:
                renewal.effective_date = when
                changed.append("effective_date")
        if renewal.stripe_invoice_id is None and renewal.effective_date is not None:
            events = (
                StripeEvent.objects.filter(type__in=("invoice.created", "invoice.paid"))
                .extra(where=[f"{EVENT_SUBSCRIPTION_SQL} = %s"], params=[subscription.stripe_id])
                .order_by("created")
            )
            for event in events:
                try:
                    invoice = read_invoice(event.payload["data"]["object"])
                    line = invoice.subscription_line
                except Exception:  # noqa: BLE001
                    continue
                if line is None or pick_by_instant([(line.period_start, invoice)], renewal.effective_date) is None:
                    continue
                if not Renewal.objects.filter(stripe_invoice_id=invoice.stripe_id).exists():
                    renewal.stripe_invoice_id = invoice.stripe_id
                    changed.append("stripe_invoice_id")
                break
        if changed:
            renewal.save(update_fields=[*changed, "updated_at"])
        rows += 1
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}))


# --- report --------------------------------------------------------------------------------


def _meta(database_url: str) -> dict:
    try:
        with psycopg.connect(_database_url(database_url, "postgres")) as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]
    except psycopg.Error:
        pg = None
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "postgres": pg,
        "python": platform.python_version(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def _markdown(result: dict) -> str:
    command, floor, per_row = result["command"], result["floor"], result["per_row"]
    n = result["renewals"]
    rows = [
        [
            "backfill_renewal_invoices",
            f"{n:,}",
            f"{command['seconds']:.1f}",
            f"{command['rows_per_second']:,.0f}",
            f"{command['peak_rss_mb']:.0f}",
            f"{command['state']['history_rows']:,}",
        ],
        [
            "set-based UPDATE ... FROM (floor)",
            f"{n:,}",
            f"{floor['seconds']:.1f}",
            f"{n / floor['seconds']:,.0f}",
            "-",
            "0",
        ],
        [
            "per-row ORM loop (Open edX 0028), sample",
            f"{per_row['rows']:,}",
            f"{per_row['seconds']:.1f}",
            f"{per_row['rows_per_second']:,.0f}",
            "-",
            "-",
        ],
        ["per-row ORM loop, scaled", f"{n:,}", f"{per_row['projected_seconds']:,.0f}", "-", "-", "-"],
    ]
    generation = result["generation"]
    generated = (
        "reused from an earlier run" if generation.get("reused") else f"generated in {generation['seconds']:.0f} s"
    )
    baselines = " (baselines as recorded by the last run that timed them)" if result.get("command_only") else ""
    summary = ", ".join(f"{label} {value:,}" for label, value in command["summary"].items() if value)
    return "\n\n".join(
        [
            f"{n:,} renewals of {result['subscriptions']:,} subscriptions, {generation['events']:,} stored events "
            f"({generation['events_size']}), {generated}{baselines}; "
            f"`{' '.join(command['argv'])}`.",
            table(["run", "renewals", "seconds", "renewals/s", "peak RSS MB", "history rows"], rows),
            goals_table(result["goals"]),
            f"Command summary: {summary}.",
        ]
    )


def _write(result: dict, results_dir: Path, stem: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    quick = result["quick"]
    (results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = (
        f"# Benchmark `backfill`{' (quick)' if quick else ''}\n\n{result['meta']['when']}, "
        f"{result['meta']['cpus']} CPUs, PostgreSQL {result['meta']['postgres']}\n\n{result['markdown']}\n"
    )
    (results_dir / f"{stem}.md").write_text(text)
    print(text, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    per_row = sub.add_parser("_per-row", help=argparse.SUPPRESS)
    per_row.add_argument("--sample", type=int, default=PER_ROW_SAMPLE)
    parser.add_argument("--renewals", type=int, default=1_000_000)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/billing",
        help="Any database on the server to use; the benchmark makes its own.",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="100,000 renewals; goals on projections.")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Reuse the database of an earlier run of the same size (its renewals restored)"
        " instead of generating it; reports go to backfill[-quick]-reuse.*.",
    )
    parser.add_argument(
        "--command-only",
        action="store_true",
        help="With --reuse: skip the per-row loop and the floor, check the command against the"
        " floor's state recorded by the last run on this data; reports go to"
        " backfill[-quick]-command.*.",
    )
    args = parser.parse_args(argv)
    if args.command_only and not args.reuse:
        parser.error("--command-only needs --reuse")
    if args.mode == "_per-row":
        _per_row_main(args.sample)
        return 0
    result = run(
        renewals=args.renewals,
        database_url=args.database_url,
        results_dir=args.results_dir,
        quick=args.quick,
        reuse=args.reuse,
        command_only=args.command_only,
    )
    return 1 if any(g["result"] == "FAIL" for g in result["goals"]) else 0  # N/A: reported only


if __name__ == "__main__":
    sys.exit(main())

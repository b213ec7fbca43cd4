"""``make soak`` (``python -m bench.soak``): the simulator's mix held at ~70% of its peak for
10 minutes, as a production server would see a busy day, to find what only time shows: memory
that grows, latency that drifts, errors that appear after thousands of events.

One gunicorn (the benchmark's settings) and one Celery worker on Redis (as deployed: the
webhook enqueues its e-mails, the worker sends them through Django's dummy mail backend)
against a fresh ``billing_bench`` database. First a short closed-loop run measures the peak
rate (8 connections, as ``make bench``); then each minute sends new lifecycles (fresh ids,
every event type, in order per customer), paced at ``--load`` times that peak. Reported per
minute: throughput, p50 / p99, non-2xx and transport errors, and the RSS of every gunicorn and
Celery process at the start of the paced run and at its end (the goal: under 10% growth).
Results go to ``bench/results/soak.{md,json}``. Not part of CI (it takes 12 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import WEBHOOK_SECRET
from bench.core import RESULTS, git_state, latency_stats, log, table
from bench.loadgen import Client, LoadSpec
from bench.mix import lifecycle_batch
from bench.server import BIN, ROOT, GunicornConfig, children, connect, create_database, serve, server_env, stop

GUNICORN = GunicornConfig(worker_class="gthread", workers=2, threads=4)  # as make bench (bench/__main__.py)
BROKER = "redis://127.0.0.1:6379/8"
RSS_GROWTH_GOAL = 0.10


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def processes(server, worker) -> dict[str, int]:
    """Name -> pid of every process of the app: gunicorn's master and workers, Celery's."""
    named = {"gunicorn master": server.proc.pid}
    named.update({f"gunicorn worker {i + 1}": pid for i, pid in enumerate(sorted(children(server.proc.pid)))})
    named["celery main"] = worker.pid
    named.update({f"celery child {i + 1}": pid for i, pid in enumerate(sorted(children(worker.pid)))})
    return named


def send(client: Client, port: int, batch, rate: float | None, duration: float | None) -> dict:
    spec = LoadSpec(
        port=port,
        path="/billing/stripe/webhook/",
        bodies=batch.bodies,
        labels=batch.labels,
        label_names=batch.label_names,
        lanes=batch.lanes,
        connections=8,
        duration=duration,
        secret=WEBHOOK_SECRET,
        rate=rate,
    )
    return client.run(spec)


def summary(raw: dict) -> dict:
    ok = sum(1 for s in raw["statuses"] if 200 <= s < 300)
    stats = latency_stats(raw["latencies_ns"])
    return {
        "requests": len(raw["statuses"]),
        "rate": round(len(raw["statuses"]) / raw["elapsed_s"], 1) if raw["elapsed_s"] else 0.0,
        "p50_ms": stats["p50_ms"],
        "p99_ms": stats["p99_ms"],
        "non_2xx": len(raw["statuses"]) - ok,
        "errors": raw["errors"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--minutes", type=int, default=10)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured peak to hold (default 0.7)")
    p.add_argument("--peak-seconds", type=float, default=30.0)
    p.add_argument("--quick", action="store_true", help="2 minutes, 10 s peak: a smoke run (soak-quick.*)")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.peak_seconds = 2, 10.0
    from billing.simulation.lifecycles import generate_lifecycles

    create_database(log)
    env = server_env(CELERY_BROKER_URL=BROKER)
    seen: set = set()
    client = Client()
    worker_log = open(RESULTS / "celery-soak.log.tmp", "ab")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "config", "worker", "--concurrency", "1", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    minutes, rss_start, rss_end, emails = [], {}, {}, {}
    try:
        with serve(GUNICORN, RESULTS / "gunicorn-soak.log.tmp", env_extra={"CELERY_BROKER_URL": BROKER}) as server:
            log("soak: warm-up and peak")
            send(client, server.port, lifecycle_batch(generate_lifecycles, 20, 4999, seen), None, None)
            peak_batch = lifecycle_batch(generate_lifecycles, 800, 5000, seen)
            peak = summary(send(client, server.port, peak_batch, None, args.peak_seconds))
            rate = round(peak["rate"] * args.load, 1)
            log(f"soak: peak {peak['rate']}/s; holding {rate}/s for {args.minutes} min")
            rss_start = {name: rss_kib(pid) for name, pid in processes(server, worker).items()}
            # Each minute's lifecycles (more events than a minute takes) are built while the
            # previous minute runs, so the load does not pause between minutes.
            customers = max(1, int(rate * 60 * 1.3) // 20)
            prepare = ThreadPoolExecutor(1)

            def batch_for(minute):
                return prepare.submit(lifecycle_batch, generate_lifecycles, customers, 6000 + minute, seen)

            upcoming = batch_for(0)
            for minute in range(args.minutes):
                batch = upcoming.result()
                if minute + 1 < args.minutes:
                    upcoming = batch_for(minute + 1)
                row = summary(send(client, server.port, batch, rate, 60.0))
                row["minute"] = minute + 1
                minutes.append(row)
                log(f"soak: minute {minute + 1}: {row}")
            time.sleep(10)  # the worker drains what the last minute enqueued
            with connect() as conn:
                emails = dict(conn.execute("SELECT status, count(*) FROM billing_owedemail GROUP BY status").fetchall())
            rss_end = {name: rss_kib(pid) for name, pid in processes(server, worker).items()}
    finally:
        client.close()
        stop(worker)
        worker_log.close()
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **git_state(),
        "command": "make soak" + (" (python -m bench.soak --quick)" if args.quick else ""),
        "gunicorn": str(GUNICORN),
        "peak": peak,
        "load": args.load,
        "rate_target": rate,
        "minutes": minutes,
        "rss_kib": {"start": rss_start, "end": rss_end},
        "owed_emails": emails,
    }
    growth = {
        name: (rss_end[name] - rss_start[name]) / rss_start[name]
        for name in rss_start
        if rss_start.get(name) and rss_end.get(name)
    }
    worst = max(growth.values()) if growth else None
    result["rss_growth_max"] = worst
    result["passed"] = worst is not None and worst < RSS_GROWTH_GOAL and all(m["non_2xx"] == 0 for m in minutes)
    md = [
        "# Soak (`make soak`)\n",
        f"{result['when']}, commit {result.get('git_commit')}{' (dirty)' if result.get('git_dirty') else ''},"
        f" gunicorn {GUNICORN}, one Celery worker (concurrency 1) on Redis.\n",
        f"Peak (closed loop, 8 connections, {args.peak_seconds:.0f} s): {peak['rate']}/s."
        f" Held at {args.load:.0%}: {rate}/s for {args.minutes} minutes.\n",
        table(
            ["minute", "requests", "rate/s", "p50 ms", "p99 ms", "non-2xx", "transport errors"],
            [
                [
                    m["minute"],
                    m["requests"],
                    m["rate"],
                    m["p50_ms"],
                    m["p99_ms"],
                    m["non_2xx"],
                    sum(m["errors"].values()),
                ]
                for m in minutes
            ],
        ),
        "\n### Memory (RSS) of each process, after warm-up and at the end\n",
        table(
            ["process", "start MiB", "end MiB", "growth"],
            [
                [
                    name,
                    f"{rss_start[name] / 1024:.1f}" if rss_start.get(name) else "-",
                    f"{rss_end[name] / 1024:.1f}" if rss_end.get(name) else "gone",
                    f"{growth[name]:+.1%}" if name in growth else "-",
                ]
                for name in rss_start
            ],
        ),
        "\nOwed e-mails at the end, by status (the worker sends them as they are owed): "
        + (", ".join(f"{status} {count}" for status, count in sorted(emails.items())) or "none")
        + ".\n",
        f"\nGoal: every process grows less than {RSS_GROWTH_GOAL:.0%} and every request is answered 2xx:"
        f" **{'PASS' if result['passed'] else 'FAIL'}**.\n",
    ]
    stem = "soak-quick" if args.quick else "soak"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.costs``: CPU time and SQL statements per request, by event type, in-process.

Not a throughput benchmark: a diagnostic that tells where to optimise, steadier than the HTTP
benchmarks on a shared machine because it counts the CPU time of this one process
(``time.process_time``) and the statements it sends, one request at a time. Each request goes
through Django's WSGI handler exactly as gunicorn calls it (middleware, URL resolution, the
view, the response), signed with the bench secret. The baselines (bare, minimal) get the same
bodies, so the figures can be read as ratios, like the HTTP benchmarks' CPU per request.

It runs against ``billing_bench`` (created afresh, as ``make bench`` does) with the bench
settings. Output: a table on stdout and ``bench/results/costs.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import defaultdict

from bench import WEBHOOK_SECRET
from bench.core import RESULTS, git_state, log, table
from bench.server import create_database, server_env


def _environ(path: str, body: bytes, header: str) -> dict:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1",
        "CONTENT_TYPE": "application/json; charset=utf-8",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_STRIPE_SIGNATURE": header,
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


def measure(customers: int, seed: int, per_statement: bool = False, profiler=None, profile_types=()) -> dict:
    import django

    os.environ.update(server_env())
    django.setup()
    import stripe
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import connection

    from billing.simulation.delivery import encode
    from billing.simulation.lifecycles import generate_lifecycles

    app = WSGIHandler()
    statements = [0]

    def pg_ns() -> int:
        """CPU time of this connection's PostgreSQL backend so far (ns, from /proc/PID/schedstat)."""
        if connection.connection is None:
            return 0
        try:
            with open(f"/proc/{connection.connection.info.backend_pid}/schedstat") as f:
                return int(f.read().split()[0])
        except OSError:  # the database runs elsewhere: no figure
            return 0

    by_statement = defaultdict(lambda: [0, 0.0, 0.0])  # statement -> [count, web s, PG s]
    current = [""]

    def count(execute, sql, params, many, context):
        statements[0] += 1
        if not per_statement:
            return execute(sql, params, many, context)
        pg_before, started = pg_ns(), time.process_time()
        try:
            return execute(sql, params, many, context)
        finally:
            entry = by_statement[(current[0], " ".join(sql.split())[:160])]
            entry[0] += 1
            entry[1] += time.process_time() - started
            entry[2] += (pg_ns() - pg_before) / 1e9

    def call(path: str, body: bytes) -> tuple[float, float, int, str]:
        header = stripe.WebhookSignature.generate_signature_header(body.decode(), WEBHOOK_SECRET)
        environ = _environ(path, body, header)
        status = []
        statements[0] = 0
        pg_before = pg_ns()
        started = time.process_time()
        response = app(environ, lambda s, h, exc_info=None: status.append(s))
        b"".join(response)
        if hasattr(response, "close"):
            response.close()
        seconds = time.process_time() - started
        return seconds, (pg_ns() - pg_before) / 1e9, statements[0], status[0]

    # Warm-up: connections, prepared statements, imports, caches.
    warm = [e for lc in generate_lifecycles(customers=10, seed=seed - 1) for e in lc.events]
    with connection.execute_wrapper(count):
        for event in warm:
            body = encode(event)
            for path in ("/bench/bare/", "/bench/minimal/", "/billing/stripe/webhook/"):
                call(path, body)
        events = [e for lc in generate_lifecycles(customers=customers, seed=seed) for e in lc.events]
        cpu = defaultdict(float)
        pg = defaultdict(float)
        n = defaultdict(int)
        queries = defaultdict(int)
        failed = defaultdict(int)
        for event in events:
            body = encode(event)
            for target, path in (
                ("bare", "/bench/bare/"),
                ("minimal", "/bench/minimal/"),
                ("pipeline", "/billing/stripe/webhook/"),
            ):
                current[0] = event["type"] if target == "pipeline" else target
                profiled = (
                    profiler is not None
                    and target == "pipeline"
                    and ("*" in profile_types or event["type"] in profile_types)
                )
                if profiled:
                    profiler.start()
                seconds, pg_seconds, statements_sent, status = call(path, body)
                if profiled:
                    profiler.stop()
                key = (target, event["type"] if target == "pipeline" else "*")
                cpu[key] += seconds
                pg[key] += pg_seconds
                n[key] += 1
                queries[key] += statements_sent
                if not status.startswith("2"):
                    failed[key] += 1
    rows = []
    for (target, type_), total in cpu.items():
        rows.append(
            {
                "target": target,
                "type": type_,
                "requests": n[(target, type_)],
                "cpu_ms": round(1000 * total / n[(target, type_)], 3),
                "pg_cpu_ms": round(1000 * pg[(target, type_)] / n[(target, type_)], 3),
                "statements": round(queries[(target, type_)] / n[(target, type_)], 2),
                "failed": failed[(target, type_)],
            }
        )

    def per_request(measure, target):
        total = sum(v for (t, _), v in measure.items() if t == target)
        return 1000 * total / sum(v for (t, _), v in n.items() if t == target)

    statements_table = sorted(
        (
            {"event": k[0], "sql": k[1], "count": v[0], "web_ms": round(1000 * v[1], 1), "pg_ms": round(1000 * v[2], 1)}
            for k, v in by_statement.items()
        ),
        key=lambda r: -(r["web_ms"] + r["pg_ms"]),
    )
    return {
        "rows": rows,
        "customers": customers,
        "seed": seed,
        "statements": statements_table,
        **{
            f"{target}_{name}_ms": per_request(measure, target)
            for target in ("pipeline", "minimal", "bare")
            for name, measure in (("cpu", cpu), ("pg_cpu", pg))
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.costs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--customers", type=int, default=100)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--no-create", action="store_true", help="reuse billing_bench as it is")
    p.add_argument(
        "--statements",
        type=int,
        default=0,
        metavar="N",
        help="also time each SQL statement (web and PostgreSQL CPU) and list the N costliest",
    )
    p.add_argument(
        "--profile",
        metavar="TYPES",
        default="",
        help="profile the pipeline's requests of these event types (comma-separated, * for all) with"
        " pyinstrument; writes bench/results/costs-profile.txt (figures are then not comparable)",
    )
    args = p.parse_args(argv)
    if not args.no_create:
        create_database(log)
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002)
    result = measure(
        args.customers,
        args.seed,
        per_statement=bool(args.statements),
        profiler=profiler,
        profile_types=tuple(args.profile.split(",")) if args.profile else (),
    )
    if profiler is not None:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "costs-profile.txt").write_text(
            profiler.output_text(unicode=True, show_all=False, timeline=False)
            + "\n\nBy own time:\n"
            + profiler.output_text(unicode=True, flat=True)
        )
        print(f"profile of {args.profile}: {RESULTS / 'costs-profile.txt'}")
        return 0
    minimal = result["minimal_cpu_ms"]
    minimal_both = minimal + result["minimal_pg_cpu_ms"]
    rows = sorted(result["rows"], key=lambda r: (r["target"] != "pipeline", -r["cpu_ms"] * r["requests"]))
    md = table(
        [
            "target",
            "event type",
            "requests",
            "CPU ms/request",
            "x minimal",
            "PG CPU ms/request",
            "web+PG x minimal",
            "SQL statements",
            "non-2xx",
        ],
        [
            [
                r["target"],
                r["type"],
                r["requests"],
                f"{r['cpu_ms']:.3f}",
                f"{r['cpu_ms'] / minimal:.2f}",
                f"{r['pg_cpu_ms']:.3f}",
                f"{(r['cpu_ms'] + r['pg_cpu_ms']) / minimal_both:.2f}",
                r["statements"],
                r["failed"],
            ]
            for r in rows
        ],
    )
    pipeline_both = result["pipeline_cpu_ms"] + result["pipeline_pg_cpu_ms"]
    summary = (
        f"pipeline, all types: {result['pipeline_cpu_ms']:.3f} ms/request = "
        f"{result['pipeline_cpu_ms'] / minimal:.2f}x minimal ({minimal:.3f} ms); with PostgreSQL's CPU "
        f"{pipeline_both:.3f} ms = {pipeline_both / minimal_both:.2f}x minimal ({minimal_both:.3f} ms); "
        f"bare {result['bare_cpu_ms']:.3f} ms"
    )
    if args.statements:
        md += "\n### Costliest statements (total over the run; timing each adds its own overhead)\n\n" + table(
            ["event", "count", "web ms", "PG ms", "statement"],
            [
                [r["event"], r["count"], r["web_ms"], r["pg_ms"], r["sql"][:110]]
                for r in result["statements"][: args.statements]
            ],
        )
    git = git_state()
    text = (
        f"# In-process CPU per request (`python -m bench.costs`)\n\n{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, "
        f"commit {git.get('git_commit') or '?'}{' (dirty)' if git.get('git_dirty') else ''}, "
        f"{args.customers} lifecycles (seed {args.seed}), one request at a time through Django's WSGI handler."
        f"\n\n{summary}\n\n{md}\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "costs.md").write_text(text)
    (RESULTS / "costs.json").write_text(json.dumps({**result, "git": git}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Targets served by one gunicorn, compared round by round with the same requests.

Fairness on a shared, noisy 2-core machine:

* All targets run in the same server process (same gunicorn settings, same middleware).
* Every target gets byte-identical request bodies and signatures, in the same order; only the
  path differs. A round's events are new (fresh ids, later ``created``) so the pipeline and the
  minimal baseline store every one of them instead of finding duplicates.
* The order of targets rotates from round to round (a Latin square for three targets and three
  rounds), so that no target always runs first, or always after the pipeline filled the table.
* Besides wall-clock figures each run records CPU seconds of the gunicorn processes and of the
  PostgreSQL backends per request, which noise from other tenants barely changes, and the CPU
  time the rest of the machine used meanwhile ("other CPU"), which says how noisy it was.
"""

from __future__ import annotations

import os
import socket
from array import array
from dataclasses import dataclass

from bench import WEBHOOK_SECRET
from bench.core import Context, by_label, fmt, goal, goals_table, latency_stats, log, median, status_counts, table
from bench.loadgen import LoadSpec
from bench.server import BackendPids, CpuMeter, Server


@dataclass(frozen=True)
class Target:
    name: str
    path: str


BARE = Target("bare", "/bench/bare/")
MINIMAL = Target("minimal", "/bench/minimal/")
PIPELINE = Target("pipeline", "/billing/stripe/webhook/")
TARGETS = (BARE, MINIMAL, PIPELINE)
P99_GOAL_MS = 50.0  # every HTTP benchmark's latency goal, at 8 connections
NOISY_OTHER_CPU_PCT = 25.0  # above this, other processes' load shapes the figures


@dataclass
class Batch:
    """Event bodies to send, labelled by event type, optionally grouped in ordered lanes."""

    bodies: list
    labels: array
    label_names: list
    lanes: list | None = None

    @classmethod
    def of(cls, events: list, bodies: list, lanes: list | None = None) -> Batch:
        names: dict = {}
        labels = array("h", (names.setdefault(e["type"], len(names)) for e in events))
        return cls(bodies, labels, list(names), lanes)

    def __len__(self) -> int:
        return len(self.bodies)


def probe(server: Server, target: Target) -> int:
    """Status of an unsigned POST: 404 means the URL does not exist (yet); 400 is expected."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
        )
        return int(s.recv(64)[9:12])


def available_targets(ctx: Context, server: Server, targets) -> tuple[list, dict]:
    ok, missing = [], {}
    for target in targets:
        status = probe(server, target)
        if status == 404:
            missing[target.name] = f"POST {target.path} answers 404 (not there yet?)"
            tail = [line for line in server.log_tail(200).splitlines() if "not included" in line]
            if tail:
                missing[target.name] += "; server log: " + tail[-1].strip()
            log(f"{target.name} unavailable: {missing[target.name]}")
        else:
            ok.append(target)
    return ok, missing


def send(ctx: Context, server: Server, target: Target, batch: Batch, *, duration=None) -> dict:
    """One load run of ``batch`` against ``target``; raw figures plus CPU accounting."""
    spec = LoadSpec(
        port=server.port,
        path=target.path,
        bodies=batch.bodies,
        labels=batch.labels,
        label_names=batch.label_names,
        lanes=batch.lanes,
        connections=ctx.args.connections,
        duration=duration,
        secret=WEBHOOK_SECRET,
    )
    backends = BackendPids()
    try:
        with CpuMeter(server=lambda: [server.proc.pid, *server.worker_pids()], pg=backends) as meter:
            raw = ctx.loadgen().run(spec)
    finally:
        backends.close()
    used = meter.used()
    raw["cpu_s"] = {
        **used,
        "client": raw["client_cpu_s"],
        # Server and PostgreSQL were idle outside the client's window, so this is what the rest
        # of the machine (other tenants, PostgreSQL's background processes) used meanwhile.
        "other": raw["machine_busy_s"] - used["server"] - used["pg"] - raw["client_cpu_s"],
        "steal": raw["machine_steal_s"],
    }
    return raw


def summarize_run(raw: dict) -> dict:
    n = len(raw["latencies_ns"])
    failed = status_counts(raw["statuses"])
    elapsed = raw["elapsed_s"] or float("nan")
    per_req = lambda s: round(1000 * s / n, 3) if n else None  # noqa: E731
    return {
        "requests": n,
        "offered": raw["offered"],
        "stopped_by_duration": raw["stopped_by_duration"],
        "elapsed_s": round(raw["elapsed_s"], 3),
        "rate": round(n / elapsed, 1) if n else 0.0,
        **latency_stats(raw["latencies_ns"]),
        "failed": failed,
        "failed_total": sum(failed.values()),
        "errors": raw["errors"],
        "error_samples": raw["error_samples"],
        "reconnects": raw["reconnects"],
        "server_cpu_ms_per_req": per_req(raw["cpu_s"]["server"]),
        "pg_cpu_ms_per_req": per_req(raw["cpu_s"]["pg"]),
        "client_cpu_pct": round(100 * raw["cpu_s"]["client"] / elapsed, 1),
        "other_cpu_pct": round(100 * raw["cpu_s"]["other"] / elapsed, 1),
        "steal_pct": round(100 * raw["cpu_s"]["steal"] / elapsed, 1),
    }


def check_failures(ctx: Context, what: str, summary: dict) -> None:
    if summary["failed_total"]:
        ctx.warn(
            f"{what}: {summary['failed_total']} of {summary['requests']} requests FAILED "
            f"(status: count {summary['failed']}, 0 = no answer; samples {summary['error_samples'][:3]})"
        )
    if summary["stopped_by_duration"]:
        log(f"{what}: stopped by --duration after {summary['requests']} of {summary['offered']} requests")


def compare(
    ctx: Context,
    server: Server,
    targets,
    *,
    warmup: Batch | None,
    rounds: list,
    duration: float | None,
    per_label: bool = False,
) -> dict:
    """Warm every target up, then run each round's batch against every target, rotating order.

    Returns per-run summaries and, per target, the median rate and pooled latencies.
    """
    runs, raws = [], {t.name: [] for t in targets}
    if warmup is not None:
        for target in targets:
            summary = summarize_run(send(ctx, server, target, warmup))
            log(f"warm-up {target.name}: {summary['requests']} requests, {summary['rate']:.0f}/s")
            check_failures(ctx, f"warm-up of {target.name}", summary)
    for r, batch in enumerate(rounds):
        order = [targets[(r + i) % len(targets)] for i in range(len(targets))]
        for target in order:
            raw = send(ctx, server, target, batch, duration=duration)
            summary = {"target": target.name, "round": r + 1, **summarize_run(raw)}
            if per_label:
                summary["by_type"] = by_label([raw])
            runs.append(summary)
            raws[target.name].append(raw)
            log(
                f"round {r + 1} {target.name}: {summary['requests']} req, {summary['rate']:.0f}/s, "
                f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, failed {summary['failed_total']}, "
                f"other CPU {summary['other_cpu_pct']}%"
            )
            check_failures(ctx, f"round {r + 1} of {target.name}", summary)
    totals = {}
    for target in targets:
        mine = [run for run in runs if run["target"] == target.name]
        pooled = array("q")
        for raw in raws[target.name]:
            pooled.extend(raw["latencies_ns"])
        totals[target.name] = {
            "rounds": len(mine),
            "requests": sum(run["requests"] for run in mine),
            "rate": median(run["rate"] for run in mine),
            "rate_min": min(run["rate"] for run in mine),
            "rate_max": max(run["rate"] for run in mine),
            **latency_stats(pooled),
            "failed_total": sum(run["failed_total"] for run in mine),
            "server_cpu_ms_per_req": median(run["server_cpu_ms_per_req"] for run in mine),
            "pg_cpu_ms_per_req": median(run["pg_cpu_ms_per_req"] for run in mine),
            "client_cpu_pct": median(run["client_cpu_pct"] for run in mine),
            "other_cpu_pct": median(run["other_cpu_pct"] for run in mine),
        }
        if per_label:
            totals[target.name]["by_type"] = by_label(raws[target.name])
    noise = max((t["other_cpu_pct"] or 0 for t in totals.values()), default=0)
    if noise > NOISY_OTHER_CPU_PCT:
        ctx.warn(
            f"the machine was busy: other processes used up to {noise:.0f}% CPU (of "
            f"{100 * (os.cpu_count() or 1)}%) during the runs; rates and latencies are noise-bound, "
            "CPU per request less so"
        )
    return {"runs": runs, "targets": totals}


SUMMARY_HEADERS = [
    "target",
    "requests",
    "rate/s (median)",
    "rate min-max",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "failed",
    "server CPU ms/req",
    "PG CPU ms/req",
    "client CPU %",
    "other CPU %",
]


def summary_rows(totals: dict, missing: dict) -> list:
    rows = []
    for name in [t.name for t in TARGETS] + [n for n in totals if n not in {t.name for t in TARGETS}]:
        if name in totals:
            t = totals[name]
            rows.append(
                [
                    name,
                    t["requests"],
                    t["rate"],
                    f"{t['rate_min']:.0f}-{t['rate_max']:.0f}",
                    t["p50_ms"],
                    t["p90_ms"],
                    t["p99_ms"],
                    t["max_ms"],
                    f"{t['failed_total']}{' !!!' if t['failed_total'] else ''}",
                    t["server_cpu_ms_per_req"],
                    t["pg_cpu_ms_per_req"],
                    t["client_cpu_pct"],
                    t["other_cpu_pct"],
                ]
            )
        elif name in missing:
            rows.append([name, "unavailable"] + ["-"] * (len(SUMMARY_HEADERS) - 2))
    return rows


def ratio(totals: dict, a: str, b: str):
    if a in totals and b in totals and totals[b]["rate"]:
        return round(totals[a]["rate"] / totals[b]["rate"], 3)
    return None


def paired_ratios(runs: list, a: str, b: str) -> list:
    """Rate of ``a`` over ``b`` within each round (runs minutes apart, so noise partly cancels)."""
    out = []
    for r in sorted({run["round"] for run in runs}):
        ra = [x["rate"] for x in runs if x["round"] == r and x["target"] == a]
        rb = [x["rate"] for x in runs if x["round"] == r and x["target"] == b]
        if ra and rb and rb[0]:
            out.append(round(ra[0] / rb[0], 3))
    return out


def cpu_ratio(totals: dict, a: str, b: str):
    cost = lambda t: (t["server_cpu_ms_per_req"] or 0) + (t["pg_cpu_ms_per_req"] or 0)  # noqa: E731
    if a in totals and b in totals and cost(totals[b]):
        return round(cost(totals[a]) / cost(totals[b]), 2)
    return None


def verdict(
    ctx: Context,
    result: dict,
    missing: dict,
    *,
    rate_goal: float,
    subject: str = "pipeline",
    label: str = "pipeline",
    extra_goals=(),
    extra_md: str = "",
) -> dict:
    """Ratios, the goals every HTTP benchmark shares (rate against minimal, p99, no failures)
    plus ``extra_goals``, and the markdown report."""
    totals, runs = result["targets"], result["runs"]
    ratios = {
        f"{subject}/minimal": ratio(totals, subject, "minimal"),
        f"{subject}/bare": ratio(totals, subject, "bare"),
        "minimal/bare": ratio(totals, "minimal", "bare"),
        f"{subject}/minimal per round": paired_ratios(runs, subject, "minimal"),
        # Server + PostgreSQL CPU per request, the figure that other tenants' load barely moves:
        # on a CPU-bound machine the rate ratio tends to the inverse of this one.
        f"CPU per request {subject}/minimal": cpu_ratio(totals, subject, "minimal"),
    }
    s = totals.get(subject)
    at = f" (goal is at 8 connections; ran at {ctx.args.connections})" if ctx.args.connections != 8 else ""
    rate_ratio = ratios[f"{subject}/minimal"]
    goals = [
        goal(
            f"{label} rate >= {rate_goal:.0%} of minimal's",
            None if rate_ratio is None else rate_ratio >= rate_goal,
            "unavailable" if rate_ratio is None else f"{rate_ratio:.0%}",
        ),
        goal(
            f"{label} p99 < {P99_GOAL_MS:.0f} ms{at}",
            None if s is None else s["p99_ms"] < P99_GOAL_MS,
            "unavailable" if s is None else f"{s['p99_ms']} ms",
        ),
        *extra_goals,
        goal(
            f"{label} answered 2xx to every request",
            None if s is None else s["failed_total"] == 0,
            "unavailable" if s is None else f"{s['failed_total']} failed",
        ),
    ]
    rounds = table(
        [
            "round",
            "target",
            "requests",
            "rate/s",
            "p50 ms",
            "p99 ms",
            "failed",
            "server CPU ms/req",
            "PG CPU ms/req",
            "other CPU %",
        ],
        [
            [
                r["round"],
                r["target"],
                r["requests"],
                r["rate"],
                r["p50_ms"],
                r["p99_ms"],
                r["failed_total"],
                r["server_cpu_ms_per_req"],
                r["pg_cpu_ms_per_req"],
                r["other_cpu_pct"],
            ]
            for r in runs
        ],
    )
    md = (
        table(SUMMARY_HEADERS, summary_rows(totals, missing))
        + "\n\nRates are medians over rounds; latencies are percentiles over all rounds' requests. "
        + "Failed = non-2xx answers or no answer.\n\n"
        + "Ratios: "
        + ", ".join(f"{k} = {fmt(v, 3) if not isinstance(v, list) else v}" for k, v in ratios.items())
        + "\n\n"
        + goals_table(goals)
        + "\n"
        + extra_md
        + "\n### Rounds\n\n"
        + rounds
        + "\n"
    )
    for name, why in missing.items():
        md += f"\n{name}: UNAVAILABLE: {why}\n"
    return {"ratios": ratios, "goals": goals, "markdown": md}

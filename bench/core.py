"""What every benchmark shares: the run context, statistics and the report.

Statistics are computed here, in the harness, from the raw per-request figures the load
generator returns, so that rounds can be pooled: a percentile over all rounds' samples is
steadier than a median of per-round percentiles on a noisy machine, while a rate is a
per-round figure (its median is reported). Percentiles use the nearest-rank method.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    """Passed to every benchmark's ``run``: the command line and shared services."""

    args: object
    quick: bool
    gunicorn: object  # bench.server.GunicornConfig
    client: object = None  # bench.loadgen.Client, created on first use
    git: dict | None = None  # git_state() when the benchmark started (the server loads that code)
    warnings: list = field(default_factory=list)

    def loadgen(self):
        if self.client is None:
            from bench.loadgen import Client

            self.client = Client()
        return self.client

    def warn(self, msg: str) -> None:
        """A problem the reader must see: printed now and repeated in the report."""
        self.warnings.append(msg)
        log("WARNING: " + msg)


# --- statistics ---------------------------------------------------------------------------


def percentile(sorted_values, q: float):
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def latency_stats(latencies_ns) -> dict:
    ordered = sorted(latencies_ns)
    ms = lambda v: None if v is None else round(v / 1e6, 2)  # noqa: E731
    return {
        "p50_ms": ms(percentile(ordered, 0.50)),
        "p90_ms": ms(percentile(ordered, 0.90)),
        "p99_ms": ms(percentile(ordered, 0.99)),
        "max_ms": ms(ordered[-1] if ordered else None),
        "mean_ms": ms(sum(ordered) / len(ordered) if ordered else None),
    }


def status_counts(statuses) -> dict:
    """Non-2xx answers by status; 0 stands for a transport error (no answer)."""
    counts: dict = {}
    for s in statuses:
        if not 200 <= s < 300:
            counts[str(s)] = counts.get(str(s), 0) + 1
    return counts


def by_label(raw_runs) -> dict:
    """Latency and failures per label (event type) over several raw runs."""
    groups: dict = {}
    for raw in raw_runs:
        names = raw["label_names"]
        for lat, status, label in zip(raw["latencies_ns"], raw["statuses"], raw["labels"], strict=True):
            g = groups.setdefault(names[label], (array("q"), array("h")))
            g[0].append(lat)
            g[1].append(status)
    return {
        name: {"requests": len(lat), **latency_stats(lat), "failed": status_counts(st)}
        for name, (lat, st) in sorted(groups.items())
    }


# --- machine and versions --------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def git_state() -> dict:
    """The commit the code under test came from (read-only git commands only)."""

    def git(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], capture_output=True, text=True, timeout=10, cwd=RESULTS.parent.parent
            ).stdout.strip()
        except OSError:
            return None

    return {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def meta(ctx: Context) -> dict:
    def version(mod):
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:  # noqa: BLE001
            return None

    try:
        from bench.server import connect

        with connect() as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]
    except Exception:  # noqa: BLE001
        pg = None
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(ctx.git or git_state()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": loadavg(),
        "python": platform.python_version(),
        "versions": {m: version(m) for m in ("django", "gunicorn", "psycopg", "stripe")},
        "postgres": pg,
        "gunicorn": str(ctx.gunicorn),
        "args": {k: v for k, v in vars(ctx.args).items() if k != "func"},
    }


# --- report --------------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list, rows: list) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )


def goal(text: str, passed, value: str) -> dict:
    """``passed`` None means the goal could not be checked (e.g. the pipeline is unavailable)."""
    return {"goal": text, "value": value, "result": {True: "PASS", False: "FAIL", None: "N/A"}[passed]}


def goals_table(goals: list) -> str:
    return table(["goal", "measured", "result"], [[g["goal"], g["value"], g["result"]] for g in goals])


def write_report(name: str, ctx: Context, result: dict) -> Path:
    """``bench/results/<name>[-quick].json`` (all figures) and ``.md`` (the tables)."""
    RESULTS.mkdir(exist_ok=True)
    stem = f"{name}-quick" if ctx.quick else name
    result = {"benchmark": name, "meta": meta(ctx), "warnings": list(ctx.warnings), **result}
    md = f"# Benchmark `{name}`{' (quick)' if ctx.quick else ''}\n\n"
    md += f"{result['meta']['when']}, commit {result['meta']['git_commit']}"
    md += f"{' (dirty)' if result['meta']['git_dirty'] else ''}, {result['meta']['cpus']} CPUs, "
    md += f"gunicorn {result['meta']['gunicorn']}\n\n{result.get('markdown', '')}\n"
    if ctx.warnings:
        md += "\n## WARNINGS\n\n" + "\n".join(f"- {w}" for w in ctx.warnings) + "\n"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    print(md, flush=True)
    return RESULTS / f"{stem}.md"

"""``python -m bench tune``: which gunicorn settings suit this machine (run it on purpose only).

Each candidate gets a fresh server, a warm-up and the same webhook workload for the minimal
baseline and the pipeline, at the benchmark's connection count, while the load generator runs
on the same cores, as in the benchmarks. Two passes over the candidates, the second in reverse
order, so that a noisy minute does not pick the winner. The pick: the highest pipeline rate
whose p99 stays under the goal (50 ms), else the highest rate; the result goes into
``bench.__main__.DEFAULT_GUNICORN`` by hand, with its figures.
"""

from __future__ import annotations

from bench.core import RESULTS, Context, log, median, table
from bench.server import GunicornConfig, serve
from bench.targets import MINIMAL, P99_GOAL_MS, PIPELINE, available_targets, compare
from bench.webhook import Workload

CANDIDATES = [
    GunicornConfig("sync", 2, 1),
    GunicornConfig("sync", 3, 1),
    GunicornConfig("sync", 4, 1),
    GunicornConfig("gthread", 1, 8),
    GunicornConfig("gthread", 2, 2),
    GunicornConfig("gthread", 2, 4),
    GunicornConfig("gthread", 3, 2),
    GunicornConfig("gthread", 3, 3),
    GunicornConfig("gthread", 4, 2),
]
FULL = {"subscriptions": 300, "updates": 3, "passes": 3}
QUICK = {"subscriptions": 100, "updates": 2, "passes": 1}


def run(ctx: Context) -> dict:
    opts = dict(QUICK if ctx.quick else FULL)
    for key in ("subscriptions", "updates"):
        opts[key] = getattr(ctx.args, key) or opts[key]
    order = list(range(len(CANDIDATES)))
    measured: dict = {i: [] for i in order}
    for p in range(opts["passes"]):
        for i in order if p % 2 == 0 else order[::-1]:
            config = CANDIDATES[i]
            workload = Workload(opts["subscriptions"], opts["updates"], tag=f"t{p}c{i}")
            with serve(config, RESULTS / "gunicorn-tune.log.tmp") as server:
                targets, _ = available_targets(ctx, server, [MINIMAL, PIPELINE])
                result = compare(
                    ctx, server, targets, warmup=workload.setup(), rounds=[workload.round(0)], duration=None
                )
            measured[i].append(result["targets"])
            log(
                f"tune pass {p + 1} {config}: "
                + ", ".join(f"{name} {t['rate']:.0f}/s p99 {t['p99_ms']} ms" for name, t in result["targets"].items())
            )
    rows, figures = [], []
    for i in order:
        fig = {"config": str(CANDIDATES[i])}
        for name in ("minimal", "pipeline"):
            runs = [m[name] for m in measured[i] if name in m]
            if runs:
                fig[name] = {k: median(r[k] for r in runs) for k in ("rate", "p50_ms", "p99_ms", "other_cpu_pct")}
                fig[name]["rates"] = [r["rate"] for r in runs]
                fig[name]["failed_total"] = sum(r["failed_total"] for r in runs)
        figures.append(fig)
        rows.append(
            [fig["config"]]
            + [
                fig.get(n, {}).get(k)
                for n in ("pipeline", "minimal")
                for k in ("rate", "p50_ms", "p99_ms", "failed_total", "other_cpu_pct")
            ]
        )
    subject = "pipeline" if any("pipeline" in f for f in figures) else "minimal"
    ok = [f for f in figures if f.get(subject, {}).get("p99_ms", 1e9) < P99_GOAL_MS]
    best = max(ok or figures, key=lambda f: f.get(subject, {}).get("rate", 0))
    md = (
        table(
            [
                "gunicorn",
                "pipeline /s",
                "p50 ms",
                "p99 ms",
                "failed",
                "other CPU %",
                "minimal /s",
                "p50 ms",
                "p99 ms",
                "failed",
                "other CPU %",
            ],
            rows,
        )
        + f"\n\nMedians over {opts['passes']} pass(es), {ctx.args.connections} connections. "
        + f"Highest {subject} rate{f' with p99 < {P99_GOAL_MS:.0f} ms' if ok else ' (none had p99 < 50 ms)'}: "
        + f'**{best["config"]}** (default now: {ctx.gunicorn}). "Other CPU" is what the rest of the '
        + "machine used meanwhile (of 200% on 2 cores): high values mean the figures are noise-bound.\n"
    )
    return {"options": opts, "candidates": figures, "best": best["config"], "markdown": md}

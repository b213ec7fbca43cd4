"""Benchmarks of the webhook pipeline, run by ``make bench`` (``python -m bench --help``).

Layout (each module says why it is built the way it is):

* ``__main__``        command line; picks benchmarks from ``BENCHMARKS`` below.
* ``core``            what every benchmark shares: the run context, statistics, the report.
* ``server``          the benchmark database and a gunicorn process (always cleaned up).
* ``loadgen``         the HTTP load generator, run in its own process.
* ``targets``         the pipeline and the two baselines, compared round by round.
* ``webhook``, ``mix``, ``tune``, ``backfill``: the benchmarks themselves.
* ``soak``            ``make soak``: the mix held at 70% of its peak for 10 minutes (not in CI).
* ``settings``, ``urls``, ``baseline_views``: what the benchmark server runs.

A benchmark is a module with ``run(ctx) -> dict`` (the harness writes its report), or a
standalone command ``"module:main"`` with ``main(argv) -> int`` that writes its own report and
is given ``--quick`` when the harness is; register it in ``BENCHMARKS``. The harness
process never sets Django up (only the server runs Django): event bodies come from the pure
``billing.simulation`` builders, the one place that knows Stripe's current payload layout.
"""

# Module path of each benchmark, imported lazily; the first ones run when none is named.
BENCHMARKS = {
    "webhook": "bench.webhook",
    "mix": "bench.mix",
    "tune": "bench.tune",
    "backfill": "bench.backfill:main",  # not HTTP; its own command (python -m bench.backfill)
}
DEFAULT_BENCHMARKS = ("webhook", "mix", "backfill")

# The endpoint secret that the benchmark server trusts and the load generator signs with.
WEBHOOK_SECRET = "whsec_bench_0123456789abcdef"

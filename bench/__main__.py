"""``python -m bench [BENCHMARK ...] [options]``: run benchmarks, write bench/results/.

Without names it runs the default set (webhook, mix). ``--quick`` is a smoke run of a minute
or so: tiny workloads, one round; its reports go to ``*-quick.*`` so that they never replace
the figures of a full run.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time

from bench import BENCHMARKS, DEFAULT_BENCHMARKS
from bench.core import Context, git_state, log, write_report
from bench.server import GunicornConfig, create_database

# Chosen with `python -m bench tune` (2 cores, load generator on the same cores, 8 connections,
# other tenants using 1-1.4 cores meanwhile), two runs, pipeline/minimal rates per second:
#   gthread 2x4: 101/441 and 71/403 (best or second in both runs)
#   gthread 1x8: 77/421 and 80/323; gthread 3x2: 62/285 and 54/312; gthread 4x2: 52/237 and 65/288
#   sync 2-6 workers: 44-68/142-221 (no keep-alive: a TCP connection per request; no overlap of
#   one request's database waits with another's work)
# Two processes let Python use both cores despite the GIL; four threads each give every one of
# the 8 connections a thread, so a request waiting on PostgreSQL does not hold up another.
DEFAULT_GUNICORN = GunicornConfig(worker_class="gthread", workers=2, threads=4)


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"any of {', '.join(BENCHMARKS)} (default: {' '.join(DEFAULT_BENCHMARKS)})",
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (one round, small workloads)")
    p.add_argument("--connections", type=int, default=8, help="concurrent client connections (default 8)")
    p.add_argument(
        "--duration",
        type=float,
        help="at most this many seconds of load per target and round (default 120, quick 15); "
        "a run normally ends earlier, when its requests are all sent",
    )
    p.add_argument("--rounds", type=int, help="rounds per target (default 3, quick 1)")
    p.add_argument("--subscriptions", type=int, help="webhook: subscriptions (default 2000)")
    p.add_argument("--updates", type=int, help="webhook: updates per subscription and round (default 3)")
    p.add_argument("--customers", type=int, help="mix: lifecycles per round (default 200)")
    g = p.add_argument_group("server (the same for every target)")
    g.add_argument("--worker-class", default=DEFAULT_GUNICORN.worker_class, choices=["sync", "gthread"])
    g.add_argument("--workers", type=int, default=DEFAULT_GUNICORN.workers)
    g.add_argument("--threads", type=int, default=DEFAULT_GUNICORN.threads)
    g = p.add_argument_group("profiling (webhook only)")
    g.add_argument(
        "--profile", action="store_true", help="profile the pipeline in one sync worker instead of benchmarking"
    )
    g.add_argument("--profiler", choices=["pyinstrument", "py-spy"], default="pyinstrument")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any goal FAILs")
    args = p.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.benchmarks = args.benchmarks or list(DEFAULT_BENCHMARKS)
    return args


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse(argv)
    # A SIGTERM (CI cancelling, `timeout`) must unwind like Ctrl-C, so that the finally blocks
    # stop gunicorn (in its own session, it would outlive us) and the load generator.
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    ctx = Context(args=args, quick=args.quick, gunicorn=GunicornConfig(args.worker_class, args.workers, args.threads))
    failed_goals, reports = [], []
    try:
        create_database(log)
        # The code every benchmark runs, as it was at the start: the reports the earlier benchmarks
        # write must not make the later ones look "dirty".
        code = git_state()
        for name in args.benchmarks:
            ctx.warnings, ctx.git = [], code
            log(f"=== {name} ===")
            module, _, command = BENCHMARKS[name].partition(":")
            if command:  # a standalone benchmark that writes its own report
                if getattr(importlib.import_module(module), command)(["--quick"] if args.quick else []):
                    failed_goals.append(f"{name}: see its report")
                continue
            result = importlib.import_module(module).run(ctx)
            reports.append(write_report(name + ("-profile" if args.profile and name == "webhook" else ""), ctx, result))
            failed_goals += [f"{name}: {g['goal']}" for g in result.get("goals", []) if g["result"] == "FAIL"]
    finally:
        if ctx.client is not None:
            ctx.client.close()
    log(f"done in {time.monotonic() - started:.0f}s; reports: {', '.join(str(r) for r in reports)}")
    for line in failed_goals:
        log(f"GOAL FAILED: {line}")
    return 1 if args.strict and failed_goals else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench webhook --profile``: where a pipeline request spends its time.

One sync worker (one request at a time, so samples are never mixed up between requests), the
webhook workload's first round sent by 2 connections (enough to keep the worker busy; more
would only queue). Not a benchmark: the profiler slows the worker down, so no figure from this
run is comparable with the others.

* ``--profiler pyinstrument`` (default; in requirements/dev.in): started and stopped around
  the load by hooks in ``bench.gunicorn_profile``; writes ``webhook-profile-pyinstrument.txt`` (call tree and
  functions by own time) and ``.html``.
* ``--profiler py-spy`` (if installed): samples the worker from outside, without touching it,
  and sees C code (psycopg, json) as well; writes the folded stacks
  ``webhook-profile-py-spy.folded`` (open it in https://www.speedscope.app) and a summary
  ``webhook-profile-py-spy.txt`` of the functions by own and by total time.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

from bench.core import RESULTS, Context, log, table
from bench.server import BIN, GunicornConfig, serve
from bench.targets import MINIMAL, PIPELINE, available_targets, send, summarize_run

CONNECTIONS = 2
SIZE = {"subscriptions": 500, "updates": 2}  # 500 warm-up creates, then 1,000 updates profiled


def marker(server, path: str) -> None:
    """A request that only the profiling hooks act upon (see bench.gunicorn_profile)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        s.recv(1024)


def profile_webhook(ctx: Context) -> dict:
    from bench.gunicorn_profile import START_PATH, STOP_PATH
    from bench.webhook import Workload

    size = {k: getattr(ctx.args, k) or v for k, v in SIZE.items()}
    workload = Workload(size["subscriptions"], size["updates"])
    ctx.args.connections = CONNECTIONS
    stem = RESULTS / f"webhook-profile-{ctx.args.profiler}"
    config = ctx.gunicorn = GunicornConfig("sync", 1, 1)
    pyinstrument = ctx.args.profiler == "pyinstrument"
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not pyinstrument and not spy:
        raise SystemExit("py-spy is not installed: `.venv/bin/pip install py-spy`, or use --profiler pyinstrument")
    for suffix in (".txt", ".html", ".folded"):
        stem.with_suffix(suffix).unlink(missing_ok=True)
    with serve(
        config,
        RESULTS / "gunicorn-profile.log.tmp",
        env_extra={"BENCH_PROFILE_OUT": str(stem)},
        extra_args=("-c", "python:bench.gunicorn_profile") if pyinstrument else (),
    ) as server:
        targets, missing = available_targets(ctx, server, [PIPELINE])
        target = PIPELINE if targets else MINIMAL
        if not targets:
            ctx.warn(f"pipeline unavailable ({missing['pipeline']}): profiling the minimal baseline instead")
        send(ctx, server, target, workload.setup())
        recorder = None
        if pyinstrument:
            marker(server, START_PATH)
        else:
            recorder = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server.worker_pids()[0]),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(stem.with_suffix(".folded")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1)  # let py-spy attach before the load starts
        summary = summarize_run(send(ctx, server, target, workload.round(0)))
        if pyinstrument:
            marker(server, STOP_PATH)
        else:
            recorder.send_signal(signal.SIGINT)
            _, err = recorder.communicate(timeout=60)
            if recorder.returncode not in (0, -signal.SIGINT):
                ctx.warn(f"py-spy failed ({recorder.returncode}): {err.decode(errors='replace')[-500:]}")
    files = [stem.with_suffix(".txt"), stem.with_suffix(".html")] if pyinstrument else [stem.with_suffix(".folded")]
    if not pyinstrument and files[0].exists():
        stem.with_suffix(".txt").write_text(folded_summary(files[0].read_text()))
        files.append(stem.with_suffix(".txt"))
    written = [str(f.relative_to(RESULTS.parent.parent)) for f in files if f.exists()]
    log(f"profile of {target.name} written: {', '.join(written) or 'NOTHING (see gunicorn-profile.log.tmp)'}")
    md = (
        f"Profile of `{target.name}` ({ctx.args.profiler}, one sync worker, {summary['requests']} requests, "
        f"{summary['failed_total']} failed; profiled timings are NOT benchmark figures).\n\n"
        + "\n".join(f"- {w}" for w in written)
        + "\n"
    )
    if stem.with_suffix(".txt").exists():
        md += "\n```\n" + "\n".join(stem.with_suffix(".txt").read_text().splitlines()[:60]) + "\n```\n"
    return {
        "target": target.name,
        "profiler": ctx.args.profiler,
        "size": size,
        "files": written,
        "load": summary,
        "markdown": md,
    }


def folded_summary(folded: str, top: int = 30) -> str:
    """Own time by package, and the project's functions by total time, from folded stacks."""
    root = RESULTS.parent.parent
    project_dirs = {p.name for p in root.iterdir() if p.is_dir()}

    def where(frame: str) -> tuple[str, str]:
        """(package, "function (file)") of a ``function (path:line)`` frame; py-spy gives
        paths relative to their sys.path entry (``billing/inbox.py``, ``psycopg/cursor.py``)."""
        name, _, loc = frame.rpartition(" (")
        path = loc.rsplit(":", 1)[0].split("site-packages/")[-1].removeprefix(f"{root}/")
        first = path.split("/")[0].removesuffix(".py")
        if first in project_dirs:
            return "project: " + first, f"{name} ({path})"
        if first in sys.stdlib_module_names:
            return "python: " + first, f"{name} ({path})"
        return first, f"{name} ({path})"

    by_package, project, samples = Counter(), Counter(), 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [where(f) for f in stack.split(";")]
        package = frames[-1][0]
        if package == "psycopg" and "wait" in frames[-1][1].split(" (")[0].lower():
            package = "psycopg, waiting for PostgreSQL"
        by_package[package] += n
        for pkg, func in set(frames):
            if pkg.startswith("project: "):
                project[func] += n
    pct = lambda n: round(100 * n / samples, 1) if samples else 0.0  # noqa: E731
    return (
        f"{samples} samples of the worker (idle time left out)\n\nOwn time by package (where the "
        "CPU or the wait is)\n\n"
        + table(["%", "package"], [[pct(n), p] for p, n in by_package.most_common(top)])
        + "\n\nProject functions by total time (their own and what they call)\n\n"
        + table(["%", "function"], [[pct(n), f] for f, n in project.most_common(top)])
        + "\n"
    )

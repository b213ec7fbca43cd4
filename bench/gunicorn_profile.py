"""Gunicorn hooks that let the harness profile a sync worker with pyinstrument.

Loaded by the server in profile mode only: ``-c python:bench.gunicorn_profile``. The harness
marks the window to profile with two requests, which Django answers 404: ``START_PATH``
(after the warm-up) and ``STOP_PATH`` (after the load), which also writes
``$BENCH_PROFILE_OUT.txt`` and ``.html`` before it is answered. Profiling the window, not each
request, keeps pyinstrument's per-session overhead out of the way; with the worker kept busy
the little time it spends waiting shows up as ``accept``/``select`` frames.
"""

import os

START_PATH = "/bench/profile-start/"
STOP_PATH = "/bench/profile-stop/"
_profiler = None


def pre_request(worker, req):
    global _profiler
    if req.path == START_PATH:
        from pyinstrument import Profiler

        _profiler = Profiler(interval=0.002, async_mode="disabled")  # the HTML grows with samples
        _profiler.start()
    elif req.path == STOP_PATH and _profiler is not None:
        _profiler.stop()
        out = os.environ["BENCH_PROFILE_OUT"]
        with open(out + ".html", "w") as f:
            f.write(_profiler.output_html())
        with open(out + ".txt", "w") as f:
            f.write(_profiler.output_text(unicode=True, color=False, show_all=False))
            f.write("\n\n=== Functions by own time ===\n\n")
            f.write(_profiler.output_text(unicode=True, color=False, flat=True))

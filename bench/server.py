"""The benchmark database and the gunicorn server under test.

The database is ``billing_bench`` on the server named by ``DATABASE_URL``, dropped and created
afresh by each run so that figures never depend on what an earlier run left behind.
Gunicorn runs in its own process group, and ``serve()`` kills that group whatever happens, so
that no worker survives a failed or interrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BENCH_DB = os.environ.get("BENCH_DATABASE", "billing_bench")  # another name lets two runs share a server
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/billing"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"

MINIMAL_TABLE_SQL = """
CREATE TABLE bench_minimal_event (
    id varchar(255) PRIMARY KEY,
    type varchar(255) NOT NULL,
    payload jsonb NOT NULL,
    status varchar(16) NOT NULL,
    received_at timestamptz NOT NULL,
    processed_at timestamptz
)
"""


def database_url(name: str) -> str:
    """DATABASE_URL with its database replaced by ``name`` (same server and credentials)."""
    parts = urlsplit(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    if not parts.scheme.startswith("postgres"):
        raise SystemExit(f"bench needs a PostgreSQL DATABASE_URL, not {parts.scheme}://")
    return urlunsplit(parts._replace(path="/" + name))


def connect(name: str = BENCH_DB):
    import psycopg

    return psycopg.connect(database_url(name), autocommit=True)


def server_env(**extra: str) -> dict:
    """Environment of every Django process the harness starts (migrate, gunicorn)."""
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    env.update(
        DATABASE_URL=database_url(BENCH_DB),
        DJANGO_SETTINGS_MODULE="bench.settings",
        DJANGO_SECRET_KEY="bench",
        BILLING_INPROCESS_SWEEP="false",
        PYTHONDONTWRITEBYTECODE="1",
        # As deployed: the request only enqueues its e-mail task on Redis; no worker runs
        # during the benchmark (it would be measured as the webhook's cost otherwise).
        CELERY_BROKER_URL=os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER_URL),
    )
    env.update(extra)
    return env


def create_database(log) -> None:
    """Drop and create ``billing_bench``, migrate it and add the minimal baseline's table."""
    with connect("postgres") as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"migrate failed:\n{done.stdout}\n{done.stderr}")
    with connect() as conn:
        conn.execute(MINIMAL_TABLE_SQL)
    log(f"database {BENCH_DB} created and migrated in {time.monotonic() - started:.1f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class GunicornConfig:
    """How the server is run; the same for every target of a benchmark."""

    worker_class: str = "gthread"
    workers: int = 2
    threads: int = 4

    def __str__(self) -> str:
        if self.worker_class == "sync":
            return f"sync, {self.workers} workers"
        return f"{self.worker_class}, {self.workers} workers x {self.threads} threads"


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log_path: Path
    config: GunicornConfig

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master's children."""
        return children(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (read from /proc; none once it is gone)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids) -> dict[int, float]:
    """User+system CPU seconds of each live pid (from /proc; pids that vanished are skipped)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


class CpuMeter:
    """CPU seconds used by sets of processes that change while a block runs.

    ``sources`` maps a name to a function returning the pids to count now. PostgreSQL backends
    come and go during a run (Django reconnects every CONN_MAX_AGE = 60 s), so the pids are
    polled every ``interval`` seconds: a process seen first after the start counts from zero,
    one that exits loses at most its last interval.
    """

    def __init__(self, interval: float = 0.5, **sources):
        self.sources, self.interval = sources, interval
        self.first: dict = {name: {} for name in sources}
        self.last: dict = {name: {} for name in sources}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self, initial: bool = False) -> None:
        for name, pids in self.sources.items():
            for pid, seconds in cpu_seconds(pids()).items():
                self.first[name].setdefault(pid, seconds if initial else 0.0)
                self.last[name][pid] = seconds

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> CpuMeter:
        self.sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def used(self) -> dict:
        return {name: sum(v - self.first[name][pid] for pid, v in self.last[name].items()) for name in self.sources}


class BackendPids:
    """The pids of billing_bench's PostgreSQL backends, over one connection of the harness."""

    def __init__(self):
        self.conn = connect()

    def __call__(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [BENCH_DB]
        ).fetchall()
        return [pid for (pid,) in rows]

    def close(self) -> None:
        self.conn.close()


@contextmanager
def serve(config: GunicornConfig, log_path: Path, *, env_extra: dict | None = None, extra_args: tuple = ()):
    """Run gunicorn on a free port until the block ends; kill its process group afterwards."""
    port = free_port()
    cmd = [
        str(BIN / "gunicorn"),
        "config.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        config.worker_class,
        "--workers",
        str(config.workers),
        "--threads",
        str(config.threads),
        "--backlog",
        "2048",
        "--timeout",
        "120",
        "--graceful-timeout",
        "5",
        "--log-level",
        "warning",
        *extra_args,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logfile:
        logfile.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        logfile.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=server_env(**(env_extra or {})),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(port, proc, log_path, config)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(proc)


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    """Until every worker answers: poll ``/bench/bare/`` (workers boot in parallel)."""
    deadline = time.monotonic() + timeout
    answered = 0
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited ({server.proc.returncode}):\n{server.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                s.sendall(b"GET /bench/bare/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    answered += 1
                    # Enough answers that each worker has very likely booted and served one.
                    if answered >= 4 * server.config.workers:
                        return
                    continue
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn not ready after {timeout}s:\n{server.log_tail()}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            # The master is gone; make sure no orphaned worker of its group survives.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        break

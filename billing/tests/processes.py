"""The app as it is deployed, as child processes of a test: servers, workers, and what they use.

The fault tests (``pytest -m faults``, ``make test-faults``) start real processes and break
them for real:

* gunicorn through ``bench.server.serve`` (its own process group, killed whatever happens),
* Celery workers: ``celery -A config worker`` (prefork, optionally with the embedded beat),
* a Redis of the test's own (``redis-server`` on a free port, without persistence), never the
  machine's shared one, so that it can be stopped and restarted,
* PgBouncer in transaction pooling mode in front of the test database,
* a throwaway PostgreSQL cluster (``initdb`` into a temporary directory, ``pg_ctl``) for the
  test that restarts the database: the machine's shared server is never restarted.

Every process runs with ``billing.tests.process_settings``. Servers and workers never talk to
the test process: the tests read the database and count the e-mail files they leave.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlunsplit

from django.core.mail.backends.filebased import EmailBackend as FileBackend

from bench.server import BIN, ROOT, GunicornConfig, Server, children, free_port, serve, server_env, stop
from billing.emails import build_message
from billing.simulation.delivery import DeliveryReport, arrange, deliver
from billing.simulation.lifecycles import generate_lifecycles

from .conftest import SECRET, WEBHOOK_URL

SETTINGS = "billing.tests.process_settings"


def database_url_of(settings_dict: dict, *, port: int | None = None) -> str:
    """A ``postgres://`` URL for a Django settings dict (the test database), maybe via another port."""
    user = settings_dict["USER"] or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict["PASSWORD"] else ""
    netloc = f"{user}{password}@{settings_dict['HOST'] or '127.0.0.1'}:{port or settings_dict['PORT'] or 5432}"
    return urlunsplit(("postgres", netloc, "/" + settings_dict["NAME"], "", ""))


def app_env(database_url: str, mail_dir: Path, *, broker_url: str = "", **extra: str) -> dict[str, str]:
    """What every server and worker of a test is started with (``bench.server.server_env`` adds the rest)."""
    env = {
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "EMAIL_URL": f"filemail://{mail_dir}",
        "STRIPE_WEBHOOK_SECRETS": SECRET,
        "STRIPE_API_KEY": "",
        # Sweep soon: a test waits for what the sweep delivers.
        "BILLING_OUTBOX_SWEEP_AFTER_SECONDS": "3",
        "BILLING_OUTBOX_SWEEP_INTERVAL_SECONDS": "2",
        "BILLING_INPROCESS_SWEEP": "false" if broker_url else "true",
    }
    env.update(extra)
    return env


def full_env(env_extra: dict[str, str]) -> dict[str, str]:
    """The whole environment of a child: the test's own, with ``env_extra`` over it."""
    return server_env(**env_extra)


# --- gunicorn --------------------------------------------------------------------------------


@contextmanager
def gunicorn(env_extra: dict[str, str], log_path: Path, *, workers: int = 2, threads: int = 4):
    """A gunicorn master with ``workers`` gthread workers, ready when the block starts."""
    with serve(GunicornConfig(workers=workers, threads=threads), log_path, env_extra=env_extra) as server:
        yield server


def webhook_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}{WEBHOOK_URL}"


def wait_for_workers(server: Server, count: int, *, exclude: set[int] = frozenset(), timeout: float = 30.0) -> list:
    """Until the master has ``count`` workers none of which is in ``exclude`` (it respawned them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == count and not set(pids) & set(exclude):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"gunicorn has workers {server.worker_pids()}, not {count} new ones:\n{server.log_tail()}")


# --- Celery ----------------------------------------------------------------------------------


@dataclass
class CeleryWorker:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_pids(self) -> list[int]:
        """The prefork pool's processes: the worker's children."""
        return children(self.proc.pid)


@contextmanager
def celery_worker(name: str, env_extra: dict[str, str], log_dir: Path, *, beat: bool = False, concurrency: int = 1):
    """``celery -A config worker`` (prefork) on the test's broker, ready when the block starts.

    ``beat``: with the embedded beat, which sends ``sweep_owed_emails`` on the schedule of
    ``process_settings``. Killed (its whole process group) when the block ends.
    """
    log_path = log_dir / f"celery-{name}.log"
    cmd = [
        str(BIN / "celery"),
        "-A",
        "config",
        "worker",
        "-n",
        f"{name}@%h",
        "-c",
        str(concurrency),
        "-l",
        "info",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    if beat:
        cmd += ["-B", "-s", str(log_dir / f"beat-{name}.db")]
    with open(log_path, "ab") as logfile:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env(env_extra), stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker = CeleryWorker(name, proc, log_path)
    try:
        wait_until(lambda: f"{name}@" in worker.log() and " ready." in worker.log(), 60, proc=proc, what=worker.log)
        yield worker
    finally:
        stop(proc)


# --- Redis -----------------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` of the test's own, without persistence: a restart loses every queued message."""

    def __init__(self, work_dir: Path):
        self.port = free_port()
        self.work_dir = work_dir
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.work_dir / "redis.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                cmd, cwd=self.work_dir, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(lambda: self.ping(), 20, proc=self.proc, what=lambda: "redis-server did not answer")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it (SIGKILL: the broker vanishes, as in a crash or a lost host)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@contextmanager
def redis_server(work_dir: Path):
    redis = RedisServer(work_dir)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


# --- PostgreSQL and PgBouncer: run as the postgres user when the test runs as root --------------


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb, postgres and pgbouncer refuse to run as root: run them as ``postgres`` then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_owned_dir(prefix: str):
    """A temporary directory that the ``postgres`` user can use (pytest's are private to root)."""
    path = Path(tempfile.mkdtemp(prefix=f"billing-faults-{prefix}-"))
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(path, user.pw_uid, user.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            os.chown(p, user.pw_uid, user.pw_gid)


def pgbouncer_executable() -> str | None:
    return shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer",) if Path(p).exists()), None)


def pgbouncer_version() -> tuple[int, ...] | None:
    exe = pgbouncer_executable()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(n) for n in found.groups()) if found else None


# PgBouncer 1.21 tracks protocol-level prepared statements (``max_prepared_statements``); older
# versions hand one client's server connection to the next client with its statements.
PGBOUNCER_PREPARED_STATEMENTS = (1, 21, 0)


@dataclass
class PgBouncer:
    port: int
    version: tuple[int, ...]
    proc: subprocess.Popen
    log_path: Path

    @property
    def tracks_prepared_statements(self) -> bool:
        return self.version >= PGBOUNCER_PREPARED_STATEMENTS


@contextmanager
def pgbouncer(*, upstream_port: int = 5432, pool_size: int = 4):
    """PgBouncer in ``pool_mode = transaction`` in front of the PostgreSQL on ``upstream_port``.

    A small pool (``pool_size`` server connections per database) for many more clients, as in
    production: consecutive transactions of one client land on different server connections.
    """
    version = pgbouncer_version()
    if version is None:
        raise RuntimeError("pgbouncer is not installed (make test-faults installs Debian's package)")
    port = free_port()
    with postgres_owned_dir("pgbouncer") as work_dir:
        yield from _run_pgbouncer(work_dir, version, port, upstream_port, pool_size)


def _run_pgbouncer(work_dir: Path, version, port: int, upstream_port: int, pool_size: int):
    (work_dir / "users.txt").write_text('"postgres" ""\n')
    settings = [
        "[databases]",
        f"* = host=127.0.0.1 port={upstream_port}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        f"unix_socket_dir = {work_dir}",
        "auth_type = trust",
        f"auth_file = {work_dir / 'users.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        "max_client_conn = 500",
        "ignore_startup_parameters = extra_float_digits",
    ]
    if version >= PGBOUNCER_PREPARED_STATEMENTS:
        settings.append("max_prepared_statements = 200")
    (work_dir / "pgbouncer.ini").write_text("\n".join(settings) + "\n")
    _give_to_postgres(work_dir)
    log_path = work_dir / "pgbouncer.log"
    with open(log_path, "ab") as logfile:
        proc = subprocess.Popen(
            _as_postgres([pgbouncer_executable(), str(work_dir / "pgbouncer.ini")]),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: _accepts(port), 20, proc=proc, what=lambda: log_path.read_text(errors="replace"))
        yield PgBouncer(port, version, proc, log_path)
    finally:
        stop(proc)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on a free port, run by ``pg_ctl``."""

    def __init__(self, work_dir: Path):
        self.dir = work_dir  # the postgres user's (``postgres_owned_dir``)
        self.port = free_port()
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        self.bin = bins[-1].parent if bins else Path(shutil.which("pg_ctl") or "pg_ctl").parent

    def url(self, name: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def _pg_ctl(self, *args: str) -> None:
        """``pg_ctl`` with the server's output to its log (a pipe would be held open by the server)."""
        cmd = [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "postgres.log")]
        subprocess.run(_as_postgres([*cmd, "-w", "-t", "60", *args]), check=True, stdout=subprocess.DEVNULL)

    def init(self) -> None:
        _give_to_postgres(self.dir)
        cmd = [str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"]
        subprocess.run(_as_postgres([*cmd, "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "start")

    def restart(self, mode: str = "immediate") -> None:
        """``immediate``: no checkpoint, crash recovery at start, as after a crash of the server."""
        self._pg_ctl("-m", mode, "restart")

    def stop(self) -> None:
        self._pg_ctl("-m", "immediate", "stop")

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')


@contextmanager
def postgres_cluster():
    with postgres_owned_dir("postgres") as work_dir:
        cluster = PostgresCluster(work_dir)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            try:
                cluster.stop()
            except subprocess.CalledProcessError:
                pass  # already down: a failed restart


def manage(env_extra: dict[str, str], *args: str) -> str:
    """Run ``manage.py`` with the children's environment; its standard output."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=full_env(env_extra), capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


SNAPSHOT_CODE = (
    "import json; from billing.tests.lifecycle_state import snapshot; print(json.dumps(snapshot(), default=str))"
)


def snapshot_of(env_extra: dict[str, str]) -> dict:
    """``lifecycle_state.snapshot()`` of the database the children use, read by a child of its own."""
    return json.loads(manage(env_extra, "shell", "-c", SNAPSHOT_CODE).strip().splitlines()[-1])


def as_json(value) -> dict:
    """A snapshot as ``snapshot_of`` returns it (tuples as lists, times as text), to compare the two."""
    return json.loads(json.dumps(value, default=str))


# --- Deliveries ------------------------------------------------------------------------------


@dataclass
class SplitReport:
    reports: list[DeliveryReport] = field(default_factory=list)
    answers: Counter = field(default_factory=Counter)  # status code (None: no answer) -> attempts

    @property
    def attempts(self) -> int:
        return sum(r.sent for r in self.reports)


def deliver_split(urls: list[str], deliveries: list[dict], *, rng, passes: int = 6, on_result=None) -> SplitReport:
    """Post ``deliveries`` (already arranged: shuffled, duplicated) across ``urls``, all at once.

    Each delivery goes to a server drawn at random; one thread per server posts its share with
    ``billing.simulation.delivery.deliver``, which re-delivers every non-2xx in a later round,
    as Stripe's retries do. What still fails after a pass (its prerequisite was in another
    server's share, not yet applied, or the database was down) is dealt out again in the next
    pass, after a pause that doubles from pass to pass (0.5 s to 8 s), as Stripe's backoff does.
    """
    result = SplitReport()
    lock = threading.Lock()

    def record(event, status, round_number):
        with lock:
            result.answers[status] += 1
        if on_result is not None:
            on_result(event, status, round_number)

    pending = list(deliveries)
    for pass_number in range(passes):
        shares: list[list[dict]] = [[] for _ in urls]
        for event in pending:
            shares[rng.randrange(len(urls))].append(event)
        reports: list[DeliveryReport | BaseException | None] = [None] * len(urls)

        def post(index: int, share: list[dict], reports=reports) -> None:
            try:
                reports[index] = deliver(urls[index], share, secret=SECRET, max_rounds=4, on_result=record)
            except BaseException as exc:  # noqa: BLE001 - reported below
                reports[index] = exc

        threads = [threading.Thread(target=post, args=(i, share)) for i, share in enumerate(shares) if share]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        failures = [r for r in reports if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        done = [r for r in reports if isinstance(r, DeliveryReport)]
        result.reports.extend(done)
        by_id = {event["id"]: event for event in pending}
        pending = [by_id[event_id] for report in done for event_id in report.gave_up]
        if not pending:
            return result
        time.sleep(min(0.5 * 2**pass_number, 8.0))  # Stripe's next retries come later and later
    raise AssertionError(f"still failing after {passes} passes: {sorted({e['type'] for e in pending})}")


def observed(fault: str, **facts) -> None:
    """One line on what a fault did, for bench/results/faults.md (shown by ``pytest -rP``)."""
    print(f"FAULT {fault}: " + ", ".join(f"{name}={value}" for name, value in facts.items()))


# --- Waiting ---------------------------------------------------------------------------------


def wait_until(condition, timeout: float = 20.0, *, proc: subprocess.Popen | None = None, what=lambda: "") -> bool:
    """Poll ``condition`` until it holds (then ``True``, so ``assert wait_until(...)`` reads right).

    Raises ``AssertionError`` (with the tail of ``what()``) when ``timeout`` seconds pass first,
    or when ``proc`` exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{what()[-3000:]}")
        time.sleep(0.1)
    if not condition():
        raise AssertionError(f"not so after {timeout}s:\n{what()[-3000:]}")
    return True


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- E-mails ---------------------------------------------------------------------------------

HEADER = re.compile(r"^(Subject|To): (.*)$", re.MULTILINE)
SEPARATOR = "-" * 79  # what Django's file backend writes after each message


def sent_mail(mail_dir: Path) -> Counter:
    """How often each e-mail, as (subject, recipient), was sent: Django's file backend writes
    the messages to ``*.log`` files in ``mail_dir`` (a file may hold several)."""
    found = Counter()
    for path in sorted(mail_dir.glob("*.log")):
        for chunk in path.read_text().split(SEPARATOR):
            headers = dict(HEADER.findall(chunk))
            if headers:
                found[(headers["Subject"].strip(), headers["To"].strip())] += 1
    return found


class HeldFileBackend(FileBackend):
    """Django's file backend that can be held mid-send, so a test can kill the process sending.

    While the file named by ``FAULTS_MAIL_HOLD`` exists, a send first writes
    ``<that file>.<pid>`` (who is sending, for the test) and waits: the task is then inside
    ``billing.tasks.deliver``, holding the owed e-mail's row lock, with nothing sent yet.
    """

    def send_messages(self, email_messages):
        hold = Path(os.environ["FAULTS_MAIL_HOLD"])
        if hold.exists():
            Path(f"{hold}.{os.getpid()}").write_text("sending")
            while hold.exists():
                time.sleep(0.05)
        return super().send_messages(email_messages)


# --- Runs ------------------------------------------------------------------------------------


def lifecycle_run(*, customers: int, seed: int, duplicates: float = 0.3):
    """(in-order events, the same shuffled with duplicates) of ``customers`` simulated lifecycles."""
    lifecycles = generate_lifecycles(customers=customers, seed=seed)
    in_order = sorted((event for lc in lifecycles for event in lc.events), key=lambda event: event["created"])
    shuffled = arrange([lc.events for lc in lifecycles], rng=random.Random(seed), shuffle=True, duplicates=duplicates)
    return in_order, shuffled


def in_order_state(client, events: list[dict]) -> tuple[dict, dict[str, tuple[str, str]]]:
    """The rows in-order delivery leaves (as ``snapshot_of`` returns them) and the e-mail each
    owed e-mail's key stands for, as (subject, recipient); the rows are cleared afterwards.

    Delivered in this process: the e-mails are sent eagerly to ``mail.outbox``.
    """
    from django.core import mail

    from billing.models import OwedEmail

    from .lifecycle_state import clear_rows, deliver_until_accepted, snapshot

    mail.outbox.clear()
    deliver_until_accepted(client, events)
    expected = as_json(snapshot())
    sent = {(m.subject, ", ".join(m.to)) for m in mail.outbox}
    messages = {}
    for owed in OwedEmail.objects.select_related("account", "invoice", "subscription"):
        message = build_message(owed)
        messages[owed.key] = (message.subject, ", ".join(message.to))
    assert set(messages.values()) == sent, "in order, every owed e-mail is sent"
    clear_rows()
    mail.outbox.clear()
    return expected, messages


def mail_owed_by_sent_rows(messages: dict[str, tuple[str, str]]) -> Counter:
    """The e-mails the sent ``OwedEmail`` rows of the test database stand for, once each."""
    from billing.models import OwedEmail

    return Counter(messages[key] for key in OwedEmail.objects.filter(status="sent").values_list("key", flat=True))


def wait_for_owed_emails(timeout: float = 60.0) -> None:
    """Until no owed e-mail of the test database is pending (sent or given up)."""
    from billing.models import OwedEmail

    pending = OwedEmail.objects.filter(status=OwedEmail.Status.PENDING)
    wait_until(lambda: not pending.exists(), timeout, what=lambda: f"pending: {list(pending.values_list('key'))}")

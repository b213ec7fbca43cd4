"""The load generator: N keep-alive HTTP/1.1 connections driven by one selector loop.

Why this shape, on a 2-core machine where the client steals CPU from the server it measures:

* Its own process (``Client``), so that the harness's memory and garbage collector
  never pause it, and so its CPU time can be measured on its own (``client_cpu``).
* One thread, non-blocking sockets and ``selectors`` (epoll): no GIL hand-offs between client
  threads (which add up to 5 ms of switch interval to a latency) and no asyncio machinery.
* Requests are complete byte strings built and signed just before the clock starts, so a
  request costs the client a ``send`` and a few ``recv``s. A Stripe signature is only valid for
  300 s, so a lane whose signatures are older than ``RESIGN_AFTER`` is signed again when it is
  taken (only long runs ever do this).
* Work comes in *lanes*: a lane's requests go out in order on one connection, each after the
  previous answer (a subscription's lifecycle); a free connection takes the next lane. Lanes of
  one request make a plain shared queue.
* With ``rate`` set (the soak), request k starts no earlier than k / rate seconds into the run:
  the connections still wait for each answer, but the load is held at that rate below the peak.
* A latency is measured with ``perf_counter_ns`` from the first byte sent (or from connecting,
  when the server closed the connection after the previous answer, as a sync worker does) to
  the last byte of the answer. Nothing is retried except a request whose reused keep-alive
  connection was closed before any answer (a race the server invites; counted as
  ``reconnects``). Every non-2xx and every transport error is counted and kept as a sample.
"""

from __future__ import annotations

import gc
import os
import selectors
import socket
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass

RESIGN_AFTER = 240.0  # seconds; Stripe's default tolerance is 300
REQUEST_TIMEOUT = 60.0  # seconds without an answer before a request is given up as an error
MAX_ERROR_SAMPLES = 10


@dataclass
class LoadSpec:
    port: int
    path: str
    bodies: list  # of bytes
    labels: array  # label index of each body ('h')
    label_names: list
    lanes: list | None = None  # lists of body indexes; None: every body is a lane of its own
    connections: int = 8
    duration: float | None = None  # no new request is started after this many seconds
    secret: str | None = None  # sign each body with it (Stripe-Signature)
    host: str = "127.0.0.1"
    rate: float | None = None  # at most this many requests started per second (None: closed loop only)


class Requests:
    """Request bytes per body index, signed in bulk before the run and re-signed when stale."""

    def __init__(self, spec: LoadSpec):
        self.spec = spec
        self.head = (
            f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
            "User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\n"
            "Accept: */*; q=0.5, application/xml\r\nContent-Type: application/json; charset=utf-8\r\n"
        ).encode()
        self.signed_at = [0.0] * len(spec.bodies)
        self.data = [b""] * len(spec.bodies)
        if spec.secret:
            import stripe  # only here: importing stripe takes a while

            self._generate = stripe.WebhookSignature.generate_signature_header
        for i in range(len(spec.bodies)):
            self.build(i)

    def build(self, i: int) -> None:
        body = self.spec.bodies[i]
        head = self.head + b"Content-Length: %d\r\n" % len(body)
        if self.spec.secret:
            now = time.time()
            header = self._generate(body.decode(), self.spec.secret, timestamp=int(now))
            head += b"Stripe-Signature: " + header.encode() + b"\r\n"
            self.signed_at[i] = now
        self.data[i] = head + b"\r\n" + body

    def refresh(self, lane) -> None:
        if self.spec.secret:
            stale = time.time() - RESIGN_AFTER
            for i in lane:
                if self.signed_at[i] < stale:
                    self.build(i)


class Conn:
    __slots__ = ("sock", "lane", "pos", "index", "start", "out", "inbuf", "reused", "writing")

    def __init__(self):
        self.sock = None
        self.lane = ()
        self.pos = 0
        self.index = -1
        self.start = 0
        self.out = None
        self.inbuf = bytearray()
        self.reused = False  # has this socket already carried an answered request?
        self.writing = False  # registered for EVENT_WRITE (a partial send)?


def run(spec: LoadSpec) -> dict:
    """Send the spec's requests; return raw per-request figures (the harness does statistics)."""
    gc.disable()  # the loop makes little garbage; a collection pause would be a fake latency
    requests = Requests(spec)
    lanes = deque(spec.lanes if spec.lanes is not None else ([i] for i in range(len(spec.bodies))))
    sel = selectors.DefaultSelector()
    latencies, statuses, labels = array("q"), array("h"), array("h")
    errors: Counter = Counter()
    error_samples: list = []
    reconnects = 0
    perf = time.perf_counter_ns
    machine0, cpu0, t0 = machine_cpu(), time.process_time(), perf()
    deadline = t0 + int(spec.duration * 1e9) if spec.duration else None
    last_done = t0
    outstanding = {}
    paused: deque = deque()  # connections whose next request is not due yet (``rate``)
    interval = int(1e9 / spec.rate) if spec.rate else 0
    started = 0

    def record_failure(conn: Conn, reason: str) -> None:
        """The current request got no answer (status 0); its connection is dropped."""
        errors[reason.split(":")[0]] += 1
        if len(error_samples) < MAX_ERROR_SAMPLES:
            error_samples.append(reason)
        latencies.append(perf() - conn.start)
        statuses.append(0)
        labels.append(spec.labels[conn.index])
        close(conn)

    def fail(conn: Conn, reason: str) -> None:
        record_failure(conn, reason)
        start_next(conn)

    def close(conn: Conn) -> None:
        if conn.sock is not None:
            outstanding.pop(conn.sock.fileno(), None)
            sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def send(conn: Conn) -> None:
        """Connect if needed and send the current request (or what is left of it)."""
        if conn.sock is None:
            sock = socket.create_connection((spec.host, spec.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, conn)
            conn.sock, conn.reused, conn.writing = sock, False, False
        outstanding[conn.sock.fileno()] = conn
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        conn.out = conn.out[sent:]
        if bool(conn.out) != conn.writing:  # poll for writability only while a send is partial
            conn.writing = bool(conn.out)
            sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.writing else 0), conn)

    def start_next(conn: Conn) -> None:
        nonlocal started
        while True:
            if conn.pos >= len(conn.lane):
                if not lanes or (deadline and perf() >= deadline):
                    close(conn)
                    return
                conn.lane, conn.pos = lanes.popleft(), 0
                requests.refresh(conn.lane)
            if deadline and perf() >= deadline:
                close(conn)
                return
            if interval and perf() < t0 + started * interval:
                paused.append(conn)  # resumed by the main loop when its turn comes
                return
            started += 1
            conn.index = conn.lane[conn.pos]
            conn.pos += 1
            conn.out = memoryview(requests.data[conn.index])
            conn.inbuf.clear()
            conn.start = perf()
            try:
                send(conn)
                return
            except OSError as exc:
                record_failure(conn, f"connect: {exc}")

    def on_readable(conn: Conn) -> None:
        nonlocal last_done, reconnects
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            return fail(conn, f"recv: {exc}")
        if not chunk:
            if not conn.inbuf and conn.reused:
                # The server closed an idle keep-alive connection as we reused it: send again.
                reconnects += 1
                close(conn)
                conn.out = memoryview(requests.data[conn.index])
                try:
                    return send(conn)
                except OSError as exc:
                    return fail(conn, f"connect: {exc}")
            return fail(conn, "closed: connection closed before a complete answer")
        buf = conn.inbuf
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            return fail(conn, "protocol: answer without Content-Length")
        eol = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : eol if eol > 0 else len(head)])
        if len(buf) < end + 4 + length:
            return
        done = perf()
        latencies.append(done - conn.start)
        statuses.append(int(buf[9:12]))
        labels.append(spec.labels[conn.index])
        last_done = done
        outstanding.pop(conn.sock.fileno(), None)
        if b"\r\nconnection: close" in head:
            close(conn)
        else:
            conn.reused = True
        start_next(conn)

    conns = [Conn() for _ in range(spec.connections)]
    for conn in conns:
        start_next(conn)
    while outstanding or paused:
        wait = 0.5
        if paused:
            wait = max(0.0, min(wait, (t0 + started * interval - perf()) / 1e9))
        for key, mask in sel.select(timeout=wait):
            conn = key.data
            if conn.sock is None:
                continue
            if mask & selectors.EVENT_WRITE:
                try:
                    send(conn)
                except OSError as exc:
                    fail(conn, f"send: {exc}")
                    continue
            if mask & selectors.EVENT_READ and conn.sock is not None:
                on_readable(conn)
        for _ in range(len(paused)):
            if perf() < t0 + started * interval:
                break
            start_next(paused.popleft())
        too_old = perf() - int(REQUEST_TIMEOUT * 1e9)
        for conn in [c for c in outstanding.values() if c.start < too_old]:
            fail(conn, f"timeout: no answer within {REQUEST_TIMEOUT:.0f}s")
    machine1, cpu1 = machine_cpu(), time.process_time()
    sel.close()
    elapsed = ((last_done if last_done > t0 else perf()) - t0) / 1e9
    return {
        "latencies_ns": latencies,
        "statuses": statuses,
        "labels": labels,
        "label_names": spec.label_names,
        "offered": len(spec.bodies),
        "elapsed_s": elapsed,
        "client_cpu_s": cpu1 - cpu0,
        # The whole machine's busy and stolen CPU seconds while the requests ran.
        "machine_busy_s": machine1[0] - machine0[0],
        "machine_steal_s": machine1[1] - machine0[1],
        "errors": dict(errors),
        "error_samples": error_samples,
        "reconnects": reconnects,
        "stopped_by_duration": bool(lanes) or any(c.pos < len(c.lane) for c in conns),
    }


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - fields[3] - fields[4] - steal) / tick, steal / tick


def _serve(conn) -> None:
    """The load generator process: run each spec received, send back its figures (or error)."""
    while True:
        spec = conn.recv()
        try:
            conn.send(run(spec))
        except Exception as exc:  # noqa: BLE001 - the harness re-raises it
            conn.send(exc)


class Client:
    """The load generator's process, reused for every run of a session; ``close`` kills it
    even in the middle of a run (an interrupted benchmark must not leave it behind)."""

    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="bench-loadgen")
        self.proc.start()

    def run(self, spec: LoadSpec) -> dict:
        self.conn.send(spec)
        result = self.conn.recv()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(5)

"""Posting events as Stripe's webhook sender does: signed, one POST each, non-2xx retried later.

Stripe delivers at least once and in no guaranteed order, and retries every answer that is
not a 2xx (https://docs.stripe.com/webhooks#retries). ``arrange`` makes the order and the
duplicates; ``deliver`` makes the retries: an event that failed is sent again only after the
rest of its round, as Stripe's retry comes after the other traffic of the moment.
"""

from __future__ import annotations

import heapq
import http.client
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import stripe

# What Stripe's sender calls itself (https://docs.stripe.com/webhooks#receive-events).
USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"


class DeliveryError(Exception):
    """The endpoint could not be reached at all (refused, unknown host, timed out)."""


def sign(payload_bytes: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header for a body, made by stripe-python itself.

    https://docs.stripe.com/webhooks#verify-manually: ``t=<unix>,v1=<HMAC-SHA256 of "t.body">``.
    """
    payload = payload_bytes.decode("utf-8") if isinstance(payload_bytes, (bytes, bytearray)) else payload_bytes
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)


def encode(event: dict) -> bytes:
    """The body Stripe would post: the event as pretty-printed JSON."""
    return json.dumps(event, indent=2).encode("utf-8")


def arrange(
    events: Sequence[dict] | Sequence[Sequence[dict]],
    *,
    rng: random.Random,
    shuffle: bool,
    duplicates: float,
) -> list[dict]:
    """The order of deliveries: lifecycles interleaved, maybe shuffled, some events twice.

    ``events`` is either one list of events or one list per lifecycle. Without ``shuffle`` the
    lifecycles are merged by ``created``, each keeping its own order (the order Stripe creates
    them in). Each event is delivered a second time with probability ``duplicates``, at a later
    place in the sequence; the copy is the same dict, so its body is byte for byte the same.
    """
    streams = [events] if not events or isinstance(events[0], dict) else events
    if shuffle:
        ordered = [event for stream in streams for event in stream]
        rng.shuffle(ordered)
    else:
        ordered = list(heapq.merge(*streams, key=lambda event: event["created"]))
    n = len(ordered)
    placed = [(float(i), event) for i, event in enumerate(ordered)]
    placed += [(rng.uniform(i, n), event) for i, event in enumerate(ordered) if rng.random() < duplicates]
    placed.sort(key=lambda pair: pair[0])  # stable: an original stays before its copy on a tie
    return [event for _, event in placed]


@dataclass
class DeliveryReport:
    sent: int = 0  # HTTP attempts, retries included
    succeeded: int = 0  # attempts answered with a 2xx
    non_2xx: Counter = field(default_factory=Counter)  # failed attempts by status code ("error": no answer)
    retried: int = 0  # attempts after the first round
    gave_up: list[str] = field(default_factory=list)  # event ids still without a 2xx after max_rounds
    rounds: int = 0

    @property
    def ok(self) -> bool:
        return not self.gave_up


class _Connection:
    """One keep-alive HTTP(S) connection, reopened when the server closed it."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeliveryError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._open = lambda: cls(parts.hostname, parts.port, timeout=timeout)
        self.conn = self._open()
        self.last_error = ""

    def post(self, body: bytes, headers: dict) -> int | None:
        """The status code, or None if no answer came (the reason is in ``last_error``)."""
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile is no failure
            try:
                self.conn.request("POST", self.path, body=body, headers=headers)
                response = self.conn.getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                self.last_error = f"{type(exc).__name__}: {exc}"
                if attempt == 2 or not isinstance(
                    exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
                ):
                    return None
        return None

    def close(self):
        self.conn.close()
        self.conn = self._open()


def deliver(
    url: str,
    events: Sequence[dict],
    *,
    secret: str,
    max_rounds: int = 8,
    timeout: float = 10.0,
    on_result: Callable[[dict, int | None, int], None] | None = None,
) -> DeliveryReport:
    """POST each event to ``url``; deliver every non-2xx again in a later round.

    Each attempt is signed when sent, as Stripe signs each retry anew, so a long run stays
    inside the receiver's tolerance window. ``on_result(event, status, round)`` is called after
    every attempt (status None: no answer). Raises ``DeliveryError`` if the endpoint never
    answers at all.
    """
    connection = _Connection(url, timeout)
    report = DeliveryReport()
    pending = list(events)
    answered = False
    try:
        for round_number in range(1, max_rounds + 1):
            if not pending:
                break
            report.rounds = round_number
            failed = []
            for event in pending:
                body = encode(event)
                headers = {
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                    "Stripe-Signature": sign(body, secret),
                }
                status = connection.post(body, headers)
                report.sent += 1
                report.retried += round_number > 1
                if status is None and not answered:
                    raise DeliveryError(f"no answer from {url}: {connection.last_error}")
                answered = True
                if status is not None and 200 <= status < 300:
                    report.succeeded += 1
                else:
                    report.non_2xx[status if status is not None else "error"] += 1
                    failed.append(event)
                if on_result:
                    on_result(event, status, round_number)
            pending = failed
    finally:
        connection.conn.close()
    report.gave_up = [event["id"] for event in pending]
    return report

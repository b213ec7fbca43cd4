"""Post realistic, signed Stripe webhook events to a URL, offline (what ``stripe trigger`` does, without Stripe).

Examples::

    manage.py simulate_stripe_events --customers 20 --seed 7
    manage.py simulate_stripe_events --customers 20 --seed 7 --start 2026-01-15
    manage.py simulate_stripe_events --customers 50 --seed 7 --shuffle --duplicates 0.2
    manage.py simulate_stripe_events --customers 5 --seed 1 --client-reference-id 1 2 3 4 5
    manage.py simulate_stripe_events --customers 5 --seed 1 --dry-run --output events.jsonl

Each lifecycle ends in the hour before now, so the subscriptions still running are in their
current period and the app shows current entitlements. ``--start`` pins the dates instead: the
same ``--seed`` and ``--start`` give the same events (ids, times, amounts), so a run can be
repeated exactly. The seed alone fixes everything but the dates.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from datetime import UTC, datetime

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from billing.progress import Progress
from billing.simulation.delivery import DeliveryError, arrange, deliver
from billing.simulation.lifecycles import generate_lifecycles

DEFAULT_URL = "http://127.0.0.1:8000/billing/stripe/webhook/"


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _instant(value: str) -> int:
    """``--start``: Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise)."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected Unix seconds or an ISO date such as 2026-01-15") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def _utc(unix: int) -> str:
    return f"{datetime.fromtimestamp(unix, tz=UTC):%Y-%m-%d %H:%M} UTC"


def _probability(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


class Command(BaseCommand):
    help = (
        "Post a realistic, signed lifecycle of Stripe events (trials, renewals, failed payments, "
        "seat changes, refunds) to a webhook URL, retrying every non-2xx as Stripe does."
    )

    def add_arguments(self, parser):
        parser.add_argument("--url", default=DEFAULT_URL, help=f"Webhook endpoint (default: {DEFAULT_URL}).")
        parser.add_argument("--secret", help="Signing secret (default: the first of STRIPE_WEBHOOK_SECRETS).")
        parser.add_argument("--customers", type=_positive_int, default=5, help="Lifecycles to simulate (default 5).")
        parser.add_argument("--seed", type=int, default=0, help="Same seed, same events (default 0).")
        parser.add_argument(
            "--start",
            type=_instant,
            metavar="WHEN",
            help="When the lifecycles begin: an ISO date (2026-01-15) or Unix seconds. "
            "Default: each lifecycle is placed to end now.",
        )
        parser.add_argument("--shuffle", action="store_true", help="Deliver in random order.")
        parser.add_argument(
            "--duplicates", type=_probability, default=0.0, help="Probability that an event is delivered twice."
        )
        parser.add_argument(
            "--client-reference-id",
            dest="client_reference_ids",
            action="extend",
            nargs="+",
            metavar="ID",
            help="Account ids for checkout.session.completed, one per customer in order "
            "(without it: no Checkout, subscriptions made through the API).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Print what would be sent; send nothing.")
        parser.add_argument("--output", metavar="FILE", help="Also write the arranged events as JSON lines.")
        parser.add_argument("--max-rounds", type=_positive_int, default=8, help="Delivery rounds (default 8).")
        parser.add_argument("--timeout", type=float, default=10.0, help="Seconds to wait for each answer.")

    def handle(self, *args, **options):
        start = options["start"]
        lifecycles = generate_lifecycles(
            customers=options["customers"],
            seed=options["seed"],
            start=start,
            end=int(time.time()) if start is None else None,
            client_reference_ids=options["client_reference_ids"],
        )
        events = arrange(
            [lifecycle.events for lifecycle in lifecycles],
            rng=random.Random(f"arrange:{options['seed']}"),
            shuffle=options["shuffle"],
            duplicates=options["duplicates"],
        )
        unique = sum(len(lifecycle.events) for lifecycle in lifecycles)
        scenarios = Counter(lifecycle.scenario for lifecycle in lifecycles)
        self.stdout.write(
            f"{len(lifecycles)} customers (seed {options['seed']}): "
            + ", ".join(f"{name} ×{count}" for name, count in sorted(scenarios.items()))
            + f"\n{len(events)} deliveries of {unique} events ({len(events) - unique} duplicates)"
            + (", shuffled" if options["shuffle"] else ", in Stripe's order")
            + f"\nEvents dated {_utc(min(e['created'] for e in events))} to {_utc(max(e['created'] for e in events))}"
        )

        if options["output"]:
            self._write_jsonl(options["output"], events)
        if options["dry_run"]:
            for event in events:
                self.stdout.write(f"{event['created']} {event['id']} {event['type']} {event['data']['object']['id']}")
            return

        secret = options["secret"] or next(iter(getattr(settings, "STRIPE_WEBHOOK_SECRETS", None) or []), "")
        if not secret:
            raise CommandError("No signing secret: pass --secret or set STRIPE_WEBHOOK_SECRETS.")
        progress = _Reporter(self.stdout, total=len(events))
        try:
            report = deliver(
                options["url"],
                events,
                secret=secret,
                max_rounds=options["max_rounds"],
                timeout=options["timeout"],
                on_result=progress,
            )
        except DeliveryError as exc:
            raise CommandError(
                f"Could not reach the webhook: {exc}. Is the app running? `make run` serves it."
            ) from exc
        finally:
            progress.close()

        failures = ", ".join(f"{code} ×{count}" for code, count in sorted(report.non_2xx.items(), key=str)) or "none"
        self.stdout.write(
            f"Sent {report.sent} requests in {report.rounds} round(s) to {options['url']}: "
            f"{report.succeeded} answered 2xx, {report.retried} were retries.\nNon-2xx answers: {failures}."
        )
        if report.gave_up:
            raise CommandError(
                f"{len(report.gave_up)} deliveries never got a 2xx in {report.rounds} rounds: "
                + ", ".join(report.gave_up[:10])
                + (" …" if len(report.gave_up) > 10 else "")
            )
        self.stdout.write(self.style.SUCCESS(f"All {len(events)} deliveries answered 2xx."))

    def _write_jsonl(self, path: str, events: list[dict]):
        try:
            with open(path, "w", encoding="utf-8") as out:
                for event in events:
                    out.write(json.dumps(event, separators=(",", ":")) + "\n")
        except OSError as exc:
            raise CommandError(f"Cannot write {path}: {exc}") from exc
        self.stdout.write(f"Wrote {len(events)} events to {path}")


class _Reporter:
    """Progress of the first round (billing.progress: tqdm on a terminal, plain lines otherwise), then one line per retry round."""

    def __init__(self, stdout, *, total: int):
        self.stdout = stdout
        # tqdm needs the raw stream: OutputWrapper would end each of its updates with a newline.
        self.progress = Progress(total=total, desc="deliveries", stream=getattr(stdout, "_out", sys.stdout))
        self.round = 1
        self.failed = 0

    def __call__(self, event: dict, status: int | None, round_number: int):
        if round_number != self.round:
            self.close()
            self.stdout.write(f"Round {round_number}: delivering again the {self.failed} that got no 2xx")
            self.round, self.failed = round_number, 0
        self.failed += not (status is not None and 200 <= status < 300)
        if self.progress is not None:
            self.progress.update()

    def close(self):
        if self.progress is not None:
            self.progress.close()
            self.progress = None

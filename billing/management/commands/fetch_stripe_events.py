"""Recover events Stripe could not deliver, from its Events API, into the same inbox.

    manage.py fetch_stripe_events --since 3d
    manage.py fetch_stripe_events --since 2026-11-01 --type invoice.paid --dry-run

Stripe retries a webhook for three days; the Events API keeps 30 days. Events already in
the inbox are skipped (a failed one is left to ``reprocess_stripe_events``); new ones go through
``billing.webhook.inbox.receive``, exactly like a delivery (the API call itself is authenticated with
``STRIPE_API_KEY``, so there is no signature to check). https://docs.stripe.com/api/events/list
"""

import json
import re
from collections import Counter
from datetime import timedelta

import stripe
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing import stripe_api
from billing.management.options import parse_since
from billing.models import StripeEvent
from billing.progress import Progress
from billing.stripe_payloads import envelope_problem
from billing.webhook import inbox


def since_value(value: str):
    match = re.fullmatch(r"(\d+)([dh])", value)
    if match:
        amount, unit = int(match[1]), match[2]
        return timezone.now() - (timedelta(days=amount) if unit == "d" else timedelta(hours=amount))
    return parse_since(value)


class Command(BaseCommand):
    help = "Fetch events from Stripe's Events API and apply those missing from the inbox."

    def add_arguments(self, parser):
        parser.add_argument("--since", default="3d", help="e.g. 3d, 12h, 2026-11-01 (default 3d).")
        parser.add_argument("--type", action="append", dest="types", help="Only this event type (repeatable).")
        parser.add_argument("--limit", type=int, help="Stop after this many events from the API.")
        parser.add_argument("--dry-run", action="store_true", help="Report what is missing; store nothing.")

    def handle(self, *args, **options):
        since = since_value(options["since"])
        counts = Counter()
        try:
            with Progress(total=None, desc="fetching events", stream=self.stderr._out) as progress:
                for payload in stripe_api.iter_events(created_gte=since, types=options["types"]):
                    if options["limit"] is not None and counts["seen"] >= options["limit"]:
                        break
                    counts["seen"] += 1
                    progress.update()
                    if envelope_problem(payload):
                        counts["malformed"] += 1
                        continue
                    if StripeEvent.objects.filter(pk=payload["id"]).exists():
                        counts["already in inbox"] += 1
                        continue
                    if options["dry_run"]:
                        counts["missing"] += 1
                        self.stdout.write(f"missing {payload['id']} {payload['type']}")
                        continue
                    outcome = inbox.receive(payload, json.dumps(payload))
                    counts[outcome.status] += 1
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        except stripe.StripeError as exc:
            raise CommandError(f"Stripe API error after {counts['seen']} event(s): {exc.user_message or exc}") from exc
        summary = ", ".join(f"{key} {value}" for key, value in sorted(counts.items()) if key != "seen")
        suffix = " (dry run, nothing stored)" if options["dry_run"] else ""
        self.stdout.write(
            f"fetched {counts['seen']} event(s) since {since:%Y-%m-%d %H:%M} UTC: {summary or 'none'}{suffix}"
        )
        if counts[StripeEvent.Status.FAILED]:
            raise CommandError(f"{counts[StripeEvent.Status.FAILED]} event(s) failed; see reprocess_stripe_events")

"""Re-apply stored Stripe events: after a bug fix, or when Stripe gave up retrying.

    manage.py reprocess_stripe_events                      # every failed event, oldest first
    manage.py reprocess_stripe_events --status received    # stuck ones too
    manage.py reprocess_stripe_events --id evt_1 --id evt_2
    manage.py reprocess_stripe_events --type invoice.paid --since 2026-01-01 --dry-run

Each event is applied in its own transaction by ``billing.webhook.inbox.process_event``, the same path
as a webhook delivery: a processed event is never applied twice.
"""

from collections import Counter

from django.core.management.base import BaseCommand, CommandError

from billing.management.options import parse_since
from billing.models import StripeEvent
from billing.progress import Progress
from billing.webhook import inbox


class Command(BaseCommand):
    help = "Re-apply stored Stripe events (failed ones by default), oldest first."

    def add_arguments(self, parser):
        parser.add_argument(
            "--status",
            action="append",
            choices=[StripeEvent.Status.FAILED, StripeEvent.Status.RECEIVED, StripeEvent.Status.IGNORED],
            help="Which events (repeatable; default: failed).",
        )
        parser.add_argument("--id", action="append", dest="ids", help="An event id (repeatable).")
        parser.add_argument("--type", action="append", dest="types", help="An event type (repeatable).")
        parser.add_argument("--since", help="Only events Stripe created on or after this date.")
        parser.add_argument("--limit", type=int, help="At most this many events.")
        parser.add_argument("--dry-run", action="store_true", help="List what would be re-applied; change nothing.")

    def handle(self, *args, **options):
        events = StripeEvent.objects.all()
        if options["ids"]:
            events = events.filter(pk__in=options["ids"])
            missing = set(options["ids"]) - set(events.values_list("pk", flat=True))
            if missing:
                raise CommandError(f"unknown event id(s): {', '.join(sorted(missing))}")
        else:
            events = events.filter(status__in=options["status"] or [StripeEvent.Status.FAILED])
        if options["types"]:
            events = events.filter(type__in=options["types"])
        if options["since"]:
            events = events.filter(created__gte=parse_since(options["since"]))
        ids = list(events.order_by("created", "pk").values_list("pk", "type")[: options["limit"]])

        if options["dry_run"]:
            for event_id, event_type in ids:
                self.stdout.write(f"would re-process {event_id} {event_type}")
            self.stdout.write(f"{len(ids)} event(s) would be re-processed (dry run, nothing changed)")
            return

        outcomes = Counter()
        with Progress(total=len(ids), desc="re-processing", stream=self.stderr._out) as progress:
            for event_id, event_type in ids:
                outcome = inbox.process_event(event_id)
                outcomes[outcome.status] += 1
                if outcome.status == StripeEvent.Status.FAILED:
                    self.stderr.write(f"{event_id} {event_type} failed: {outcome.error.strip().splitlines()[-1]}")
                progress.update()
        summary = ", ".join(f"{status} {count}" for status, count in sorted(outcomes.items())) or "nothing to do"
        self.stdout.write(f"re-processed {len(ids)} event(s): {summary}")
        if outcomes[StripeEvent.Status.FAILED]:
            raise CommandError(f"{outcomes[StripeEvent.Status.FAILED]} event(s) still failing")

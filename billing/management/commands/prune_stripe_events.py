"""Delete settled inbox events older than a retention window, in batches.

    manage.py prune_stripe_events                          # processed and ignored, received over 90 days ago
    manage.py prune_stripe_events --older-than-days 365 --batch-size 5000
    manage.py prune_stripe_events --dry-run                # counts only; deletes nothing

Only ``processed`` and ``ignored`` events go. ``failed`` and ``received`` ones are never deleted,
however old: they are work still to do (``reprocess_stripe_events``) and the evidence for it.

Age is counted from ``received_at``, when this app stored the event, not from Stripe's
``created``: an event recovered late by ``fetch_stripe_events`` is kept for the full window
after it arrived, and since an event is received after Stripe created it, a window of 30 days
or more (the minimum) also covers everything Stripe's Events API can still hand back. So a
pruned event can never come back as a "new" one and be applied twice.

What else reads the inbox, and what pruning means for it:

* Nothing points at an event by foreign key. Mirrored rows keep ``last_event_id`` (text, shown
  by the admin as is) and history rows give the event *type* as their reason: both stay valid.
  The admin's "N events in the inbox" link on a mirrored row just counts fewer.
* The seats of a subscription period that is not the mirror's current one are read back from
  the newest stored snapshot of that period (``billing.services.subscriptions.period_quantity``);
  once those snapshots are pruned the invoice line's quantity is used, which is what Stripe billed.
* ``backfill_renewal_invoices`` links renewals from stored invoice events: run it before pruning
  the events it needs.

Each batch selects primary keys in key order (keyset: no batch rescans what an earlier one
deleted) and deletes them with the ORM in a transaction of its own, re-checking the status, so
an event re-processed meanwhile into ``failed`` stays. Stop it at any time and run it again.
Progress goes to stderr (a bar on a terminal, a line every few seconds otherwise), the summary
to stdout.
"""

from collections import Counter
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from billing.models import StripeEvent
from billing.progress import Progress

PRUNABLE = (StripeEvent.Status.PROCESSED, StripeEvent.Status.IGNORED)
DEFAULT_DAYS = 90
MINIMUM_DAYS = 30  # Stripe's Events API keeps 30 days: https://docs.stripe.com/api/events
DEFAULT_BATCH_SIZE = 1000


class Command(BaseCommand):
    help = "Delete processed and ignored Stripe events received more than N days ago (never failed ones)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than-days",
            type=int,
            default=DEFAULT_DAYS,
            metavar="N",
            help=f"Keep events received in the last N days (default {DEFAULT_DAYS}, at least {MINIMUM_DAYS}).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help=f"Events deleted per transaction (default {DEFAULT_BATCH_SIZE}).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Report what would be deleted; delete nothing.")

    def handle(self, *args, **options):
        days, batch_size = options["older_than_days"], options["batch_size"]
        if days < MINIMUM_DAYS:
            raise CommandError(
                f"--older-than-days must be at least {MINIMUM_DAYS}: younger events can still come back from "
                "Stripe's Events API (fetch_stripe_events), and the inbox is what keeps them from being applied twice"
            )
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        cutoff = timezone.now() - timedelta(days=days)
        prunable = StripeEvent.objects.filter(status__in=PRUNABLE, received_at__lt=cutoff)
        expected = Counter(
            {row["status"]: row["n"] for row in prunable.order_by().values("status").annotate(n=Count("pk"))}
        )
        total = sum(expected.values())
        scope = f"processed and ignored events received before {cutoff:%Y-%m-%d %H:%M} UTC"

        if options["dry_run"]:
            self.stdout.write(f"would delete {total} {scope} ({_by_status(expected)}); dry run, nothing deleted")
            return

        deleted, batches, last_pk = Counter(), 0, ""
        with Progress(total=total, desc="pruning stripe events", stream=self.stderr._out) as progress:
            while True:
                pks = list(prunable.filter(pk__gt=last_pk).order_by("pk").values_list("pk", flat=True)[:batch_size])
                if not pks:
                    break
                last_pk = pks[-1]
                with transaction.atomic():
                    for status in PRUNABLE:  # the status is checked again: a row re-processed meanwhile stays
                        deleted[status] += prunable.filter(pk__in=pks, status=status).delete()[0]
                batches += 1
                progress.update(len(pks))
        self.stdout.write(f"deleted {sum(deleted.values())} {scope} ({_by_status(deleted)}) in {batches} batch(es)")


def _by_status(counts: Counter) -> str:
    return ", ".join(f"{status} {counts[status]}" for status in PRUNABLE)

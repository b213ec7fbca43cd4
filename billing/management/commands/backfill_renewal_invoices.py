"""Fill in renewals' missing ``effective_date`` and ``stripe_invoice_id`` from stored events.

    manage.py backfill_renewal_invoices                         # everything still missing
    manage.py backfill_renewal_invoices --dry-run               # what would change; changes nothing
    manage.py backfill_renewal_invoices --since 2026-03-01      # renewals effective since then
    manage.py backfill_renewal_invoices --subscription sub_1 --subscription sub_2
    manage.py backfill_renewal_invoices --batch-size 5000

The same function as migration 0003 (``billing.backfill.backfill_renewal_invoices``), with the
real models. Each batch commits on its own: stop it at any time (Ctrl-C) and run it again, it
resumes; a run after a complete one changes nothing. Progress goes to stderr (a bar on a
terminal, a line every few seconds otherwise), the summary to stdout.
"""

from django.core.management.base import BaseCommand, CommandError
from django.db import NotSupportedError

from billing.backfill import DEFAULT_BATCH_SIZE, BackfillReport, backfill_renewal_invoices
from billing.management.options import parse_since
from billing.models import Renewal, StripeEvent, Subscription
from billing.progress import Progress
from provisioning.models import Entitlement


class Command(BaseCommand):
    help = "Derive missing renewal effective dates and link renewals to invoices from stored events."

    def add_arguments(self, parser):
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help=f"Renewals per batch (whole subscriptions; each batch is one transaction). Default {DEFAULT_BATCH_SIZE}.",
        )
        parser.add_argument("--dry-run", action="store_true", help="Report what would change; change nothing.")
        parser.add_argument(
            "--since",
            help="Only renewals effective on or after this date (or, not dated yet, created since).",
        )
        parser.add_argument(
            "--subscription",
            action="append",
            dest="subscriptions",
            metavar="STRIPE_ID",
            help="Only renewals of this Stripe subscription (sub_...; repeatable).",
        )

    def handle(self, *args, **options):
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        since = parse_since(options["since"]) if options["since"] else None
        subscriptions = options["subscriptions"] or []
        if subscriptions:
            known = set(Subscription.objects.filter(stripe_id__in=subscriptions).values_list("stripe_id", flat=True))
            unknown = sorted(set(subscriptions) - known)
            if unknown:
                raise CommandError(f"unknown subscription(s): {', '.join(unknown)}")

        bar = _ProgressAdapter(self.stderr._out)
        try:
            report = backfill_renewal_invoices(
                renewal_model=Renewal,
                history_model=Renewal.history.model,
                subscription_model=Subscription,
                event_model=StripeEvent,
                entitlement_model=Entitlement,
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                since=since,
                subscription_ids=subscriptions,
                progress=bar,
            )
        except NotSupportedError as exc:
            raise CommandError(f"{exc}: point DATABASE_URL at the PostgreSQL database to backfill") from None
        except KeyboardInterrupt:
            bar.close()
            if bar.last is not None:
                self._print_summary(bar.last)
            raise CommandError(
                "interrupted: the batches above are committed; run the command again to resume"
            ) from None
        bar.close()
        self._print_summary(report)

    def _print_summary(self, report: BackfillReport) -> None:
        title = "renewal backfill" + (" (dry run: nothing was changed)" if report.dry_run else "")
        self.stdout.write(title)
        width = max(len(label) for label, _ in report.summary())
        for label, value in report.summary():
            self.stdout.write(f"  {label:<{width}}  {value:>10,}")
        for heading, samples in (
            ("conflicts", report.conflict_samples),
            ("unreadable events of malformed invoices", report.malformed_samples),
        ):
            if samples:
                self.stdout.write(f"{heading} (first {len(samples)}):")
                for sample in samples:
                    self.stdout.write(f"  {sample}")
        rate = report.renewals / report.seconds if report.seconds else 0
        self.stdout.write(
            f"{report.batches} batch(es), {report.subscriptions:,} subscription(s) in {report.seconds:,.1f} s"
            f" ({rate:,.0f} renewals/s)"
        )


class _ProgressAdapter:
    """Feeds the backfill's running report to ``billing.progress.Progress`` (bar or lines)."""

    def __init__(self, stream):
        self.stream = stream
        self.progress: Progress | None = None
        self.last: BackfillReport | None = None

    def __call__(self, report: BackfillReport) -> None:
        if self.progress is None:
            self.progress = Progress(total=report.total, desc="renewals", stream=self.stream)
        self.progress.update(report.renewals - self.progress.done)
        self.last = report

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

"""Backfill renewals' ``effective_date`` and ``stripe_invoice_id`` from what is already stored.

For migration 0003 (frozen models) and ``manage.py backfill_renewal_invoices`` (real models): it
touches only fields that exist at migration 0002 and never overwrites a value. Dates come from
entitlements and the subscription, links from stored invoice events by the live handlers' rule
(``matching.decide_link``). Batches of whole subscriptions by keyset among renewals still missing
a value, each a few ORM queries, decisions in Python and one set-based write with its history
rows, in one transaction: a re-run resumes, and changes nothing after a complete run. PostgreSQL
only: events are found through 0003's expression index, the write is ``UPDATE ... FROM unnest()``
(SQLite, for ``make run``, starts empty). See docs/decisions/0004-backfill-renewal-invoices.rst.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime

import orjson
from django.db import DEFAULT_DB_ALIAS, IntegrityError, NotSupportedError, connections, transaction
from django.db.models import CharField, Func, OuterRef, Q, Subquery, TextField, Value
from django.db.models.expressions import RawSQL
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, NullIf

from . import matching
from .stripe_payloads import customer_of, invoice_subscription_id, read_invoice_lines, subscription_line

logger = logging.getLogger(__name__)

INVOICE_EVENT_TYPES = ("invoice.created", "invoice.paid")
PAID_KIND = "paid"  # provisioning.Entitlement.Kind.PAID, as stored
HISTORY_CHANGE_REASON = "backfill_renewal_invoices"
DEFAULT_BATCH_SIZE = 1000
SAMPLE_LIMIT = 20  # conflicts and unreadable events quoted in the report; beyond that only counted
WRITE_ATTEMPTS = 3  # a batch whose write meets a concurrent change (a unique violation) is redone

# The subscription an invoice event names, current layout first (``invoice_subscription_id``).
# Migration 0003 indexes exactly this expression where type IN EVENT_TYPES_SQL, with statistics
# on it: keep them identical, or every batch scans the whole inbox.
EVENT_SUBSCRIPTION_SQL = (
    "COALESCE(payload #>> '{data,object,parent,subscription_details,subscription}',"
    " payload #>> '{data,object,subscription}')"
)
EVENT_TYPES_SQL = "('invoice.created', 'invoice.paid')"
EVENT_INDEX_NAME = "stripeevent_invoice_subscription"

# What a batch reads of each renewal: its own fields, then the windows it moves from and to.
RENEWAL_FIELDS = ("pk", "subscription_id", "effective_date", "stripe_invoice_id", "processed", "in_scope")
WINDOW_FIELDS = ("from_entitlement__expires_at", "to_entitlement__starts_at", "to_entitlement__expires_at")


def _count(label: str | None = None):
    """A count of the report, added up over batches; ``label`` puts it in the summary."""
    return field(default=0, metadata={"label": label})


@dataclass
class BackfillReport:
    """What a run did (or, with ``dry_run``, would do).

    Invoice outcomes (``linked`` .. ``malformed``) count each invoice of a subscription in
    scope once; renewal outcomes count renewals in scope (those still missing a value).
    """

    dry_run: bool = False
    total: int | None = None  # renewals in scope when the run started
    seconds: float = 0.0
    renewals: int = _count("renewals examined")
    renewals_changed: int = _count("renewals changed")
    linked: int = _count("linked")
    already_linked: int = _count("already linked")
    conflicts: int = _count("conflicts")
    unmatched: int = _count("unmatched invoices")
    malformed: int = _count("malformed invoices")  # none of the invoice's events could be read
    unreadable_events: int = _count("unreadable invoice events")  # data.object not an object: no subscription
    effective_dates_derived: int = _count("effective dates derived")
    effective_dates_underivable: int = _count("effective dates not derivable")
    still_unlinked: int = _count("renewals still without invoice")
    out_of_scope: int = _count("invoices matching renewals outside --since")
    history_rows: int = _count("history rows written")
    subscriptions: int = _count()
    batches: int = _count()
    conflict_samples: list[str] = field(default_factory=list)
    malformed_samples: list[str] = field(default_factory=list)

    def add(self, batch: BackfillReport) -> None:
        """Fold in the counts and samples of one committed batch."""
        for each in fields(self):
            if "label" in each.metadata:
                setattr(self, each.name, getattr(self, each.name) + getattr(batch, each.name))
        self.conflict_samples = (self.conflict_samples + batch.conflict_samples)[:SAMPLE_LIMIT]
        self.malformed_samples = (self.malformed_samples + batch.malformed_samples)[:SAMPLE_LIMIT]

    def summary(self) -> list[tuple[str, int]]:
        """The figures an operator reads at the end of a run, in order."""
        labels = [(each.metadata["label"], each.name) for each in fields(self) if each.metadata.get("label")]
        relabel = {"renewals changed": "renewals that would change"} if self.dry_run else {}
        return [(relabel.get(label, label), getattr(self, name)) for label, name in labels]


def backfill_renewal_invoices(
    *,
    renewal_model,
    subscription_model,
    event_model,
    entitlement_model,
    history_model=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    since: date | datetime | None = None,
    subscription_ids: Sequence[str] | None = None,
    progress: Callable[[BackfillReport], None] | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> BackfillReport:
    """Fill in missing ``effective_date`` and ``stripe_invoice_id`` of renewals; return the report.

    ``history_model`` (the renewal's django-simple-history model) gets one "changed" row per
    renewal written. ``since`` keeps renewals that take effect (or, not dated yet, were created)
    on or after it; ``subscription_ids`` keeps renewals of those Stripe subscriptions.
    ``progress`` is called with the running report once the total is known, then after each
    committed batch; an exception from it stops the run, and a re-run resumes from there.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if connections[using].vendor != "postgresql":
        raise NotSupportedError("the renewal backfill runs on PostgreSQL only")
    started = time.monotonic()
    if isinstance(since, date) and not isinstance(since, datetime):
        since = datetime(since.year, since.month, since.day, tzinfo=UTC)
    models = (renewal_model, subscription_model, event_model, entitlement_model, history_model)
    run = _Run(*models, using, since, tuple(subscription_ids or ()), dry_run)
    report = BackfillReport(dry_run=dry_run, total=run.in_scope.count())
    report.unreadable_events = 0 if subscription_ids else run.count_unreadable_events()
    progress = progress or (lambda report: None)
    progress(report)  # the total is known: a progress bar can start
    for subscription_pks in run.batches(batch_size):
        report.add(run.batch(subscription_pks))
        report.seconds = time.monotonic() - started
        progress(report)
    report.seconds = time.monotonic() - started
    return report


# --- Deciding (no database access) ----------------------------------------------------------


@dataclass(eq=False)
class _Renewal:
    """A renewal as loaded for a batch, the windows it moves from and to, and what is decided."""

    pk: int
    effective_date: datetime | None
    stripe_invoice_id: str | None
    processed: bool = False
    in_scope: bool = True
    from_expires: datetime | None = None  # from_entitlement.expires_at
    to_starts: datetime | None = None  # to_entitlement.starts_at
    to_expires: datetime | None = None  # to_entitlement.expires_at
    changed: bool = False


def derived_effective_date(position: int, renewals: list[_Renewal], subscription, paid_window_ends) -> datetime | None:
    """When ``renewals[position]`` takes effect, from what the app already knows; None if unknown.

    ``renewals`` are the subscription's, in creation (pk) order: provisioning plans one at trial
    start (effective at ``trial_end``) and one after each paid period (effective at its end);
    ``paid_window_ends``, the ends of its ``paid`` entitlements in order. The most direct wins:

    1. the paid window the renewal moved to starts at it (``to_entitlement.starts_at``);
    2. the window it moved from ends at it (``from_entitlement.expires_at``);
    3. the first renewal of a subscription with a trial: ``trial_end``;
    4. otherwise the end of the paid period before it: the window the previous renewal moved
       to, else the paid window of the same rank, else, for the latest renewal not processed
       yet, the subscription's current period end.
    """
    renewal = renewals[position]
    rank = position - 1 if subscription.trial_end is not None else position
    return (  # datetimes are never false: each ``or`` moves on only from a missing value
        renewal.to_starts
        or renewal.from_expires
        or (subscription.trial_end if position == 0 else None)
        or (renewals[position - 1].to_expires if position > 0 else None)
        or (paid_window_ends[rank] if 0 <= rank < len(paid_window_ends) else None)
        or (subscription.current_period_end if position == len(renewals) - 1 and not renewal.processed else None)
    )


class _Unreadable(Exception):
    """An invoice event from which no service period can be read."""


def _parse(invoice_object: dict | str | None) -> dict:
    """An event's ``data.object`` as a dict, parsed if it is JSON text; raises _Unreadable.

    orjson parses a few times faster than ``json``; what it refuses (integers beyond 64 bits) goes
    to ``json``, so the outcome is the standard library's.
    """
    if isinstance(invoice_object, str):
        try:
            try:
                invoice_object = orjson.loads(invoice_object)
            except orjson.JSONDecodeError:
                invoice_object = json.loads(invoice_object)
        except ValueError as exc:
            raise _Unreadable(f"{type(exc).__name__}: {exc}"[:200]) from exc
    if not isinstance(invoice_object, dict):
        raise _Unreadable("data.object is not an object")
    return invoice_object


def service_period_start(invoice_object: dict | str | None, subscription_stripe_id: str) -> datetime | None:
    """``period.start`` of the invoice's subscription line (None if it has none); raises _Unreadable.

    ``invoice_object`` is the event's ``data.object`` or its JSON text. The line is the one the live
    handlers pick (``read_invoice(...).subscription_line``), by the readers of what decides the match
    only: lines, customer and subscription (reading the whole invoice doubled the time).
    """
    obj = _parse(invoice_object)
    lines = obj.get("lines")
    if not isinstance(lines, dict) or not isinstance(lines.get("data"), list):
        raise _Unreadable("the invoice has no lines")
    try:
        customer_of(obj)  # an invoice the live handlers could not place on an account matches nothing
        subscription_id, lines = invoice_subscription_id(obj), read_invoice_lines(obj)
    except Exception as exc:  # noqa: BLE001 - any unreadable payload is counted, never a crash
        raise _Unreadable(f"{type(exc).__name__}: {exc}"[:200]) from exc
    if subscription_id != subscription_stripe_id:
        raise _Unreadable(f"the invoice names subscription {subscription_id or 'none'}")
    line = subscription_line(lines)
    if line is None and any(each.is_subscription_period for each in lines):
        raise _Unreadable("its subscription line has no period")
    return line.period_start if line is not None else None  # None: only invoice items, it pays for no period


def _decide_dates(subscription, renewals: list[_Renewal], paid_window_ends, report: BackfillReport) -> None:
    taken = {r.effective_date for r in renewals if r.effective_date is not None}
    for position, renewal in enumerate(renewals):
        if renewal.effective_date is not None or not renewal.in_scope:
            continue
        when = derived_effective_date(position, renewals, subscription, paid_window_ends)
        if when is None or when in taken:  # unknown, or another renewal of the subscription has it
            report.effective_dates_underivable += 1
            continue
        taken.add(when)
        renewal.effective_date, renewal.changed = when, True
        report.effective_dates_derived += 1


def _link_invoice(subscription, renewals, invoice_id, events, linked_elsewhere: bool, report) -> None:
    """Apply the live rule to one invoice, trying its snapshots (``events``: (id, JSON text)) in order.

    As the live handlers do, link on the first snapshot that decides (``invoice.created``, else
    ``invoice.paid``), parsing each only when reached; one with the lines of the last read is skipped.
    """
    decision, problems, read = None, [], None  # decision: None until a snapshot is read (malformed)
    for event_id, text in events:
        try:
            obj = _parse(text)
            shape = (obj.get("lines"), obj.get("parent"), obj.get("subscription"))
            if shape == read:
                continue
            period_start = service_period_start(obj, subscription.stripe_id)
        except _Unreadable as exc:
            problems.append(f"{event_id} ({invoice_id}): {exc}")
            continue
        read = shape
        candidates = ((r.effective_date, r.stripe_invoice_id, r) for r in renewals)
        decision = matching.decide_link(candidates, invoice_id, period_start, invoice_already_linked=linked_elsewhere)
        if decision.outcome != matching.Decision.UNMATCHED:  # no period start is UNMATCHED too
            break
    if decision is None:
        report.malformed += 1
        report.malformed_samples.extend(problems)
    elif decision.outcome == matching.Decision.LINK and decision.renewal.in_scope:
        decision.renewal.stripe_invoice_id, decision.renewal.changed = invoice_id, True
        report.linked += 1
    elif decision.outcome == matching.Decision.LINK:
        report.out_of_scope += 1
    elif decision.outcome == matching.Decision.ALREADY_LINKED:
        report.already_linked += 1
    elif decision.outcome == matching.Decision.CONFLICT:
        report.conflicts += 1
        kept = decision.renewal
        sample = f"renewal {kept.pk} of {subscription.stripe_id} is linked to {kept.stripe_invoice_id}"
        report.conflict_samples.append(f"{sample}; {invoice_id} also matches it (kept the first)")
    else:
        report.unmatched += 1


# --- Reading and writing ------------------------------------------------------------------


class _Run:
    """One run: its models (maybe frozen), scope, queries and writes."""

    def __init__(self, renewal, subscription, event, entitlement, history, using, since, subscription_ids, dry_run):
        self.renewal_model, self.history_model, self.using, self.dry_run = renewal, history, using, dry_run
        managers = (model._default_manager.db_manager(using) for model in (renewal, subscription, event, entitlement))
        self.renewals, self.subscriptions, self.events, self.entitlements = managers
        # Renewals the run is for: missing a value, and within the operator's filters.
        self.scope = Q(effective_date__isnull=True) | Q(stripe_invoice_id__isnull=True)
        if since is not None:
            self.scope &= Q(effective_date__gte=since) | Q(effective_date__isnull=True, created_at__gte=since)
        if subscription_ids:
            self.scope &= Q(subscription__stripe_id__in=subscription_ids)
        self.in_scope = self.renewals.filter(self.scope)

    def batches(self, size: int):
        """Subscription pks in batches of whole subscriptions with up to ``size`` renewals in scope,
        by keyset on ``subscription_id``; each batch is chosen once the one before it is done."""
        rows = in_scope = self.in_scope.order_by("subscription_id").values_list("subscription_id", flat=True)
        while subscription_pks := sorted(set(rows[:size])):
            yield subscription_pks
            rows = in_scope.filter(subscription_id__gt=subscription_pks[-1])

    def invoice_events(self):
        """Invoice events, with the subscription each names (``named``) and its ``data.object`` as JSON text."""
        named = RawSQL(EVENT_SUBSCRIPTION_SQL, (), output_field=CharField())  # what 0003's index holds
        text = Cast("payload__data__object", TextField())
        return self.events.filter(type__in=INVOICE_EVENT_TYPES).annotate(named=named, text=text)

    def count_unreadable_events(self) -> int:
        """Invoice events whose ``data.object`` is not an object (they name no subscription)."""
        kind = Coalesce(Func("payload__data__object", function="jsonb_typeof"), Value(""), output_field=CharField())
        return self.invoice_events().filter(named__isnull=True).alias(kind=kind).exclude(kind="object").count()

    def batch(self, subscription_pks: list[int], attempts: int = WRITE_ATTEMPTS) -> BackfillReport:
        """Read, decide and (unless a dry run) write one batch, in a transaction of its own."""
        try:
            with transaction.atomic(using=self.using):
                report, changes = self.decide(subscription_pks)
                report.renewals_changed = len(changes)
                if changes and not self.dry_run:
                    report.renewals_changed, report.history_rows = self.write(changes)
                return report
        except IntegrityError:  # a live handler dated or linked one of these meanwhile
            if attempts == 1:
                raise
            logger.warning("renewal backfill: batch from %s met a concurrent change; redoing it", subscription_pks[0])
            return self.batch(subscription_pks, attempts - 1)

    def decide(self, subscription_pks: list[int]) -> tuple[BackfillReport, list[_Renewal]]:
        """The batch's counts and changed renewals, from the same few queries whatever its size."""
        report = BackfillReport(dry_run=self.dry_run, batches=1, subscriptions=len(subscription_pks))
        subscriptions = self.subscriptions.filter(pk__in=subscription_pks).order_by("pk")
        subscriptions = subscriptions.values_list("pk", "stripe_id", "trial_end", "current_period_end", named=True)
        renewals: dict[int, list[_Renewal]] = {s.pk: [] for s in subscriptions}
        # All renewals of the batch's subscriptions; the database says which are in scope.
        rows = self.renewals.filter(subscription_id__in=subscription_pks).order_by("subscription_id", "pk")
        rows = rows.annotate(processed=Q(processed_at__isnull=False), in_scope=self.scope)
        for pk, subscription_pk, *values in rows.values_list(*RENEWAL_FIELDS, *WINDOW_FIELDS):
            renewals[subscription_pk].append(_Renewal(pk, *values))

        undated = [s for s in subscriptions if any(r.in_scope and r.effective_date is None for r in renewals[s.pk])]
        paid = self.entitlements.filter(stripe_subscription_id__in=[s.stripe_id for s in undated], kind=PAID_KIND)
        paid_ends: dict[str, list[datetime]] = {}
        for stripe_id, expires_at in paid.order_by("starts_at").values_list("stripe_subscription_id", "expires_at"):
            paid_ends.setdefault(stripe_id, []).append(expires_at)
        for subscription in undated:
            _decide_dates(subscription, renewals[subscription.pk], paid_ends.get(subscription.stripe_id, []), report)

        unlinked = [s for s in subscriptions if any(r.in_scope and r.stripe_invoice_id is None for r in renewals[s.pk])]
        invoices = self.read_invoices([s.stripe_id for s in unlinked])
        for subscription in unlinked:
            for invoice_id, (linked_to, events) in invoices.get(subscription.stripe_id, {}).items():
                elsewhere = linked_to not in (None, subscription.pk)  # an invoice is never linked twice
                _link_invoice(subscription, renewals[subscription.pk], invoice_id, events, elsewhere, report)

        in_scope = [r for rows in renewals.values() for r in rows if r.in_scope]
        report.renewals, report.still_unlinked = len(in_scope), sum(r.stripe_invoice_id is None for r in in_scope)
        return report, [r for rows in renewals.values() for r in rows if r.changed]

    def read_invoices(self, stripe_ids: list[str]) -> dict[str, dict[str, tuple[int | None, list]]]:
        """{subscription: {invoice: (linked_to, [(event id, JSON text)])}} in the order Stripe created the
        events, as the live handlers saw them; ``linked_to``: the subscription pk of a renewal linked to it."""
        invoice = Coalesce(NullIf("object_id", Value("")), KT("payload__data__object__id"), output_field=CharField())
        linked = self.renewals.filter(stripe_invoice_id=OuterRef("invoice")).order_by()  # unique: no ordering
        linked_to = Subquery(linked.values("subscription_id")[:1])
        rows = self.invoice_events().filter(named__in=stripe_ids).annotate(invoice=invoice, linked_to=linked_to)
        rows = rows.order_by("created", "pk").values_list("pk", "invoice", "named", "linked_to", "text")
        invoices: dict[str, dict[str, tuple]] = {}
        for event_id, invoice_id, stripe_id, linked, text in rows:
            events = invoices.setdefault(stripe_id, {}).setdefault(invoice_id or f"?{event_id}", (linked, []))[1]
            events.append((event_id, text))
        return invoices

    def write(self, changes: list[_Renewal]) -> tuple[int, int]:
        """Write the batch's decisions and their history rows; (renewals updated, history rows).

        One ``UPDATE ... FROM unnest(arrays)`` whose ``RETURNING`` feeds the history ``INSERT``: the
        row django-simple-history writes on a save (every tracked field, type "~", no user, our
        reason). The reads took no locks: ``COALESCE`` keeps a value a live handler wrote since, and
        a unique violation redoes the batch. Columns are the attnames migrations 0001-0002 create.
        """
        quote = connections[self.using].ops.quote_name
        sql = f"""
            UPDATE {quote(self.renewal_model._meta.db_table)} AS r
               SET effective_date = COALESCE(r.effective_date, c.effective_date),
                   stripe_invoice_id = COALESCE(r.stripe_invoice_id, c.stripe_invoice_id), updated_at = %s
              FROM unnest(%s::bigint[], %s::timestamptz[], %s::text[]) AS c(id, effective_date, stripe_invoice_id)
             WHERE r.id = c.id AND ((r.effective_date IS NULL AND c.effective_date IS NOT NULL)
                                    OR (r.stripe_invoice_id IS NULL AND c.stripe_invoice_id IS NOT NULL))"""
        columns = [[r.pk for r in changes], [r.effective_date for r in changes], [r.stripe_invoice_id for r in changes]]
        params = [datetime.now(UTC), *columns]
        if self.history_model is not None:  # dated at the update's instant, as a save() dates it
            history = {f.attname for f in self.history_model._meta.concrete_fields}
            tracked = [f.attname for f in self.renewal_model._meta.concrete_fields if f.attname in history]
            copied = ", ".join(map(quote, tracked))
            sql = f"""WITH updated AS ({sql} RETURNING r.*)
                INSERT INTO {quote(self.history_model._meta.db_table)}
                       ({copied}, history_date, history_change_reason, history_type, history_user_id)
                SELECT {copied}, updated_at, %s, '~', NULL FROM updated"""
            params.append(HISTORY_CHANGE_REASON)
        with connections[self.using].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount, cursor.rowcount if self.history_model is not None else 0

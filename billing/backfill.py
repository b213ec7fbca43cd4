"""Backfill renewals' ``effective_date`` and ``stripe_invoice_id`` from what is already stored.

Teams adopting this app arrive with renewals that nothing linked to invoices, and an inbox full
of past events. One function, ``backfill_renewal_invoices``, does the work for both entry
points: the data migration ``0003_backfill_renewal_invoices`` (frozen models from
``apps.get_model``) and ``manage.py backfill_renewal_invoices`` (the real models). It takes the
model classes as arguments and uses only fields that exist at migration 0002, so that the
migration keeps working when the models move on.

What it decides, per renewal that still misses a value (existing values are never overwritten):

* ``effective_date``, from the renewal's entitlements and its subscription
  (``derived_effective_date``);
* ``stripe_invoice_id``, from the stored ``invoice.created`` / ``invoice.paid`` events: the
  service period is read by ``billing.stripe_payloads.read_invoice`` (its subscription line),
  and the renewal is chosen by ``billing.matching.decide_link``, the rule of the live handlers.
  An invoice already linked is not linked twice; a renewal linked to another invoice keeps its
  link (a conflict, reported); an event that cannot be read is counted, never a crash.

How it scales (docs/decisions/0004-backfill-renewal-invoices.rst): work goes in batches of whole
subscriptions, chosen by keyset pagination on ``subscription_id`` among renewals that still miss
a value, so a re-run resumes where an interrupted one stopped and a run after a complete one
changes nothing. Each batch costs a fixed number of queries (its subscriptions, renewals and
entitlements, the invoice events of its subscriptions) and one statement that updates its
renewals and writes their history rows, in a transaction of its own: memory stays flat and an
interruption loses at most the batches not yet committed. On PostgreSQL the events are found
through the expression index of migration 0003, the write is ``UPDATE ... FROM unnest(...)``,
and reading the next batches (two threads) and writing the previous one overlap with deciding
the current one, each thread on a connection of its own; batches are still decided and
committed in key order. Elsewhere (SQLite for ``make run``) the ORM does the
same one batch at a time, through JSON lookups and ``bulk_update``.
"""
from __future__ import annotations

import gc
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone

import orjson
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connections, transaction
from django.db.models import Q

from . import matching
from .stripe_payloads import invoice_subscription_id, read_invoice

logger = logging.getLogger(__name__)

INVOICE_EVENT_TYPES = ("invoice.created", "invoice.paid")
PAID_KIND = "paid"  # provisioning.Entitlement.Kind.PAID, as stored
HISTORY_CHANGE_REASON = "backfill_renewal_invoices"
DEFAULT_BATCH_SIZE = 1000
SAMPLE_LIMIT = 20  # conflicts and unreadable events quoted in the report, beyond that only counted
PREFETCH_PAGES = 64  # effective_io_concurrency while reading a batch's events (_prefetching_scan)
WRITE_ATTEMPTS = 3  # a batch whose write hits a unique constraint is read and decided again

# The subscription an invoice event names, as SQL: current layout first, legacy second, the
# order of ``stripe_payloads.invoice_subscription_id``. Migration 0003 indexes exactly this
# expression (partial, on INVOICE_EVENT_TYPES) and keeps statistics on it; keep them identical
# or the index is unused.
EVENT_SUBSCRIPTION_SQL = (
    "COALESCE(payload #>> '{data,object,parent,subscription_details,subscription}',"
    " payload #>> '{data,object,subscription}')"
)
EVENT_TYPES_SQL = "('invoice.created', 'invoice.paid')"  # the index's predicate, literally
EVENT_INDEX_NAME = "stripeevent_invoice_subscription"


@dataclass
class BackfillReport:
    """What a run did (or, with ``dry_run``, would do).

    Invoice outcomes (``linked`` .. ``malformed``) count each invoice of a subscription in
    scope once; renewal outcomes count renewals in scope (those still missing a value).
    """

    dry_run: bool = False
    total: int | None = None  # renewals in scope when the run started
    renewals: int = 0  # renewals in scope examined so far
    subscriptions: int = 0
    batches: int = 0
    renewals_changed: int = 0
    effective_dates_derived: int = 0
    effective_dates_underivable: int = 0
    linked: int = 0
    already_linked: int = 0
    conflicts: int = 0
    unmatched: int = 0
    malformed: int = 0
    unreadable_events: int = 0  # invoice events whose data.object is not an object: no subscription to file them under
    out_of_scope: int = 0  # invoices matching a renewal that the --since filter leaves out
    still_unlinked: int = 0  # renewals in scope left without an invoice (not invoiced yet, or no event)
    history_rows: int = 0
    seconds: float = 0.0
    conflict_samples: list[str] = field(default_factory=list)
    malformed_samples: list[str] = field(default_factory=list)

    def add(self, other: "BackfillReport") -> None:
        """Fold in the counts of one committed batch."""
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("conflict_samples", "malformed_samples"):
            mine = getattr(self, name)
            mine.extend(getattr(other, name)[: max(0, SAMPLE_LIMIT - len(mine))])

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> list[tuple[str, int]]:
        """The figures an operator reads at the end of a run, in order."""
        return [
            ("renewals examined", self.renewals),
            ("renewals changed" if not self.dry_run else "renewals that would change", self.renewals_changed),
            ("linked", self.linked),
            ("already linked", self.already_linked),
            ("conflicts", self.conflicts),
            ("unmatched invoices", self.unmatched),
            ("malformed invoices", self.malformed),
            ("unreadable invoice events", self.unreadable_events),
            ("effective dates derived", self.effective_dates_derived),
            ("effective dates not derivable", self.effective_dates_underivable),
            ("renewals still without invoice", self.still_unlinked),
            ("invoices matching renewals outside --since", self.out_of_scope),
            ("history rows written", self.history_rows),
        ]


_COUNTS = (
    "renewals",
    "subscriptions",
    "batches",
    "renewals_changed",
    "effective_dates_derived",
    "effective_dates_underivable",
    "linked",
    "already_linked",
    "conflicts",
    "unmatched",
    "malformed",
    "out_of_scope",
    "still_unlinked",
    "history_rows",
)


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
    concurrent: bool = True,
) -> BackfillReport:
    """Fill in missing ``effective_date`` and ``stripe_invoice_id`` of renewals; return the report.

    ``history_model`` (the renewal's django-simple-history model) gets one "changed" row per
    renewal written, in bulk, with reason ``backfill_renewal_invoices``. ``since`` keeps
    renewals that take effect (or, not dated yet, were created) on or after it;
    ``subscription_ids`` keeps renewals of those Stripe subscriptions. ``progress`` is called
    with the running report once the total is known, then after each committed batch; an
    exception from it stops the run with every batch before committed, and a re-run resumes
    from there.

    With ``concurrent`` (the default) on PostgreSQL, outside a transaction, the next batch is
    read and the previous one written on connections of their own while this thread decides
    (``_run_overlapped``); the result is the same as one batch after the other.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    started = time.monotonic()
    source_class = _PostgresSource if connections[using].vendor == "postgresql" else _PortableSource
    source = source_class(
        renewal_model=renewal_model,
        subscription_model=subscription_model,
        event_model=event_model,
        entitlement_model=entitlement_model,
        history_model=history_model,
        using=using,
    )
    scope = _Scope(_as_datetime(since), tuple(subscription_ids or ()))
    report = BackfillReport(dry_run=dry_run)
    report.total = source.count_in_scope(scope)
    if not scope.subscription_ids:
        report.unreadable_events = source.count_unreadable_events()
    if progress is not None:
        progress(report)  # the total is known: a progress bar can start

    def committed(batch: BackfillReport) -> None:
        report.add(batch)
        report.seconds = time.monotonic() - started
        if progress is not None:
            progress(report)

    with _fewer_collections():
        if concurrent and _can_overlap(source):
            _run_overlapped(source, scope, batch_size, dry_run, committed)
        else:
            _run_sequential(source, scope, batch_size, dry_run, committed)
    report.seconds = time.monotonic() - started
    return report


# Python's cyclic garbage collector, during a run: every 700 new containers (a parsed event
# makes dozens) it looks at the young ones, and every few hundred such passes at everything
# alive, Django and the loaded code included. What a batch makes is freed by reference
# counting (no cycles), so those passes find next to nothing; on 1,000,000 renewals they took
# 4.9 s of the deciding thread's time. The run freezes what is alive before it (never
# looked at again) and collects the young less often; both are put back afterwards.
GC_THRESHOLD_DURING_RUN = 50_000


@contextmanager
def _fewer_collections():
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_DURING_RUN, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _as_datetime(value: date | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)


@dataclass(frozen=True)
class _Scope:
    since: datetime | None
    subscription_ids: tuple[str, ...]

    def renewal_filter(self) -> Q:
        """Renewals the run is for: missing a value, and within the operator's filters."""
        condition = Q(effective_date__isnull=True) | Q(stripe_invoice_id__isnull=True)
        if self.since is not None:
            condition &= Q(effective_date__gte=self.since) | Q(effective_date__isnull=True, created_at__gte=self.since)
        if self.subscription_ids:
            condition &= Q(subscription__stripe_id__in=self.subscription_ids)
        return condition

    def includes(self, effective_date, stripe_invoice_id, created_at) -> bool:
        """``renewal_filter`` on a loaded row (the subscription filter chose the batch already)."""
        if effective_date is not None and stripe_invoice_id is not None:
            return False
        if self.since is None:
            return True
        return effective_date >= self.since if effective_date is not None else created_at >= self.since


# --- Deciding -----------------------------------------------------------------------------


class _Renewal:
    """A renewal as loaded for one batch, and what the batch decides for it."""

    __slots__ = (
        "pk",
        "effective_date",
        "stripe_invoice_id",
        "processed_at",
        "from_entitlement_id",
        "to_entitlement_id",
        "from_expires",
        "to_starts",
        "to_expires",
        "in_scope",
        "new_effective_date",
        "new_invoice_id",
    )

    def __init__(self, pk, effective_date, stripe_invoice_id, processed_at, from_entitlement_id=None,
                 to_entitlement_id=None, in_scope=True, *, from_expires=None, to_starts=None, to_expires=None):
        self.pk = pk
        self.effective_date = effective_date
        self.stripe_invoice_id = stripe_invoice_id
        self.processed_at = processed_at
        self.from_entitlement_id = from_entitlement_id
        self.to_entitlement_id = to_entitlement_id
        self.in_scope = in_scope
        # The windows it moves from and to (filled in from the batch's entitlements).
        self.from_expires = from_expires
        self.to_starts = to_starts
        self.to_expires = to_expires
        self.new_effective_date = None
        self.new_invoice_id = None


@dataclass(frozen=True)
class _Subscription:
    pk: int
    stripe_id: str
    trial_end: datetime | None
    current_period_end: datetime | None


def derived_effective_date(
    position: int,
    renewals: Sequence[_Renewal],
    subscription: _Subscription,
    paid_window_ends: Sequence[datetime],
) -> datetime | None:
    """When ``renewals[position]`` takes effect, from what the app already knows; None if unknown.

    ``renewals`` are the subscription's renewals in creation (primary key) order: provisioning
    plans one at trial start (effective at ``trial_end``) and one after each paid period
    (effective at its end). ``paid_window_ends`` are the ends of its ``paid`` entitlements in
    order. The most direct evidence wins:

    1. the paid window the renewal moved to starts at it (``to_entitlement.starts_at``);
    2. the window it moved from ends at it (``from_entitlement.expires_at``);
    3. the first renewal of a subscription with a trial: ``trial_end``;
    4. otherwise the end of the paid period before it: the window the previous renewal moved
       to, else the paid window of the same rank, else, for the latest renewal not processed
       yet, the subscription's current period end.
    """
    renewal = renewals[position]
    if renewal.to_starts is not None:
        return renewal.to_starts
    if renewal.from_expires is not None:
        return renewal.from_expires
    has_trial = subscription.trial_end is not None
    if position == 0 and has_trial:
        return subscription.trial_end
    if position > 0 and renewals[position - 1].to_expires is not None:
        return renewals[position - 1].to_expires
    rank = position - 1 if has_trial else position
    if 0 <= rank < len(paid_window_ends):
        return paid_window_ends[rank]
    if position == len(renewals) - 1 and renewal.processed_at is None:
        return subscription.current_period_end
    return None


class _Unreadable(Exception):
    """An invoice event from which no service period can be read."""


def service_period_start(invoice_object, subscription_stripe_id: str) -> datetime | None:
    """``period.start`` of the invoice's subscription line (None if it has none); raises _Unreadable.

    The line is the one ``read_invoice(...).subscription_line`` picks for the live handlers.
    ``invoice_object`` is ``data.object`` of the event, or the whole event as JSON text.
    """
    return _service_period_start(_invoice_object(invoice_object), subscription_stripe_id)


def _loads(raw):
    """``json.loads``, through orjson (about a third of the cost on a stored event).

    orjson refuses what the standard library accepts (integers beyond 64 bits, for one);
    those fall back to ``json`` so the outcome is the standard library's either way.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _invoice_object(raw) -> dict:
    """``data.object`` of a stored event given as JSON text (or already that object)."""
    if not isinstance(raw, (str, bytes)):
        obj = raw
    else:
        try:
            event = _loads(raw)
        except ValueError as exc:
            raise _Unreadable(f"{type(exc).__name__}: {exc}"[:200]) from exc
        data = event.get("data") if isinstance(event, dict) else None
        obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise _Unreadable("data.object is not an object")
    return obj


def _service_period_start(obj: dict, subscription_stripe_id: str) -> datetime | None:
    try:
        lines = obj.get("lines")
        if not isinstance(lines, dict) or not isinstance(lines.get("data"), list):
            raise _Unreadable("the invoice has no lines")
        snapshot = read_invoice(obj)
        if snapshot.subscription_id != subscription_stripe_id:
            raise _Unreadable(f"the invoice names subscription {snapshot.subscription_id or 'none'}")
        line = snapshot.subscription_line
        if line is None:
            if any(each.is_subscription_period for each in snapshot.lines):
                raise _Unreadable("its subscription line has no period")
            return None  # only invoice items: it pays for no period
        return line.period_start
    except _Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable payload is counted, never a crash
        raise _Unreadable(f"{type(exc).__name__}: {exc}"[:200]) from exc


def _decide_subscription(
    subscription: _Subscription,
    renewals: list[_Renewal],
    paid_window_ends: list[datetime],
    invoices: dict[str, list[tuple[str, object]]],
    linked_to: dict[str, int | None],
    report: BackfillReport,
    event_payload: Callable[[str], object],
) -> None:
    """Decide dates, then links, for one subscription's renewals (mutates them and ``report``)."""
    taken = {r.effective_date for r in renewals if r.effective_date is not None}
    for position, renewal in enumerate(renewals):
        if renewal.effective_date is not None or not renewal.in_scope:
            continue
        when = derived_effective_date(position, renewals, subscription, paid_window_ends)
        if when is None or when in taken:  # unknown, or another renewal of the subscription has it
            report.effective_dates_underivable += 1
            continue
        taken.add(when)
        renewal.effective_date = renewal.new_effective_date = when
        report.effective_dates_derived += 1

    # Invoices in the order Stripe created their first event: the order the live handlers saw.
    for invoice_id, events in invoices.items():
        owner = linked_to.get(invoice_id)  # the subscription whose renewal has this invoice, if any
        elsewhere = owner is not None and owner != subscription.pk
        _link_invoice(subscription, renewals, invoice_id, events, elsewhere, report, event_payload)


def _link_invoice(subscription, renewals, invoice_id, events, already_linked_elsewhere, report,
                  event_payload) -> None:
    """Apply the live rule to one invoice, trying its events' snapshots oldest first.

    The live handlers link on the first snapshot that matches (``invoice.created``, or
    ``invoice.paid`` if the draft matched nothing); so does this. Events are parsed lazily:
    usually only the first one is. An event given as None has the lines, parent and
    subscription of the one before it (``_PostgresSource.invoice_events``): skipped if that one
    was read (the same period), read through ``event_payload`` if it was unreadable.
    """
    decision = None
    problems = []
    tried = set()
    read = None  # lines, parent and subscription of the last snapshot read
    previous_read = False  # the event before this one was read, or skipped as the same as the one read
    for event_id, invoice_object in events:
        if invoice_object is None:
            if previous_read:
                continue
            invoice_object = event_payload(event_id)
        try:
            obj = _invoice_object(invoice_object)
            shape = (obj.get("lines"), obj.get("parent"), obj.get("subscription"))
            if shape == read:
                previous_read = True
                continue  # the same lines for the same subscription: the same period, already tried
            period_start = _service_period_start(obj, subscription.stripe_id)
        except _Unreadable as exc:
            problems.append(f"{event_id} ({invoice_id}): {exc}")
            previous_read = False
            continue
        read = shape
        previous_read = True
        if period_start is None or period_start in tried:
            tried.add(period_start)
            continue
        tried.add(period_start)
        decision = matching.decide_link(
            ((r.effective_date, r.stripe_invoice_id, r) for r in renewals),
            invoice_id,
            period_start,
            invoice_already_linked=already_linked_elsewhere,
        )
        if decision.outcome != matching.Decision.UNMATCHED:
            break
    outcome = decision.outcome if decision is not None else None
    if outcome == matching.Decision.LINK:
        renewal = decision.renewal
        if renewal.in_scope:
            renewal.stripe_invoice_id = renewal.new_invoice_id = invoice_id
            report.linked += 1
        else:
            report.out_of_scope += 1
    elif outcome == matching.Decision.ALREADY_LINKED:
        report.already_linked += 1
    elif outcome == matching.Decision.CONFLICT:
        report.conflicts += 1
        if len(report.conflict_samples) < SAMPLE_LIMIT:
            report.conflict_samples.append(
                f"renewal {decision.renewal.pk} of {subscription.stripe_id} is linked to "
                f"{decision.renewal.stripe_invoice_id}; {invoice_id} also matches it (kept the first)"
            )
    elif tried:
        report.unmatched += 1
    else:
        report.malformed += 1
        report.malformed_samples.extend(problems[: max(0, SAMPLE_LIMIT - len(report.malformed_samples))])


@dataclass
class _BatchData:
    """What one batch reads: its subscriptions, all their renewals, paid windows and invoice events."""

    subscriptions: dict
    renewals_by_sub: dict
    windows: dict
    invoices: dict
    linked_to: dict
    event_payload: Callable[[str], object]  # the source's reader of one event, for those invoice_events gave as None


def _read_batch(source, scope: _Scope, subscription_pks: list[int], *, thorough: bool) -> _BatchData:
    """Everything the batch's decisions need, in four or five queries whatever its size.

    ``thorough`` also asks which of the batch's invoices are linked to renewals of *other*
    subscriptions (invoices linked within the batch are seen anyway). That only happens with
    damaged data, and the unique constraint on ``stripe_invoice_id`` catches it at write time,
    so the first attempt at a batch skips the question and a retry after a unique violation
    (or a dry run, which writes nothing) asks it.
    """
    subscriptions, renewals_by_sub = source.load_renewals(scope, subscription_pks)
    need_dates, need_links = [], []
    for subscription in subscriptions.values():
        renewals = renewals_by_sub.get(subscription.pk, ())
        if any(r.in_scope and r.effective_date is None for r in renewals):
            need_dates.append(subscription)
        if any(r.in_scope and r.stripe_invoice_id is None for r in renewals):
            need_links.append(subscription.stripe_id)
    windows = source.entitlement_windows(need_dates, renewals_by_sub) if need_dates else {}
    invoices = source.invoice_events(need_links) if need_links else {}
    linked_to = {}
    for subscription in subscriptions.values():
        for renewal in renewals_by_sub.get(subscription.pk, ()):
            if renewal.stripe_invoice_id is not None:
                linked_to[renewal.stripe_invoice_id] = subscription.pk
    if thorough and invoices:
        linked_to.update(source.linked_to([i for by_invoice in invoices.values() for i in by_invoice]))
    return _BatchData(subscriptions, renewals_by_sub, windows, invoices, linked_to, source.event_payload)


def _decide_batch(data: _BatchData, dry_run: bool) -> tuple[list[_Renewal], BackfillReport]:
    """The batch's decisions (renewals to write) and its counts; no database access."""
    report = BackfillReport(dry_run=dry_run, batches=1, subscriptions=len(data.subscriptions))
    changes = []
    for subscription in data.subscriptions.values():
        renewals = data.renewals_by_sub.get(subscription.pk, [])
        report.renewals += sum(1 for r in renewals if r.in_scope)
        _decide_subscription(
            subscription,
            renewals,
            data.windows.get(subscription.stripe_id, []),
            data.invoices.get(subscription.stripe_id, {}),
            data.linked_to,
            report,
            data.event_payload,
        )
        for renewal in renewals:
            if renewal.in_scope and renewal.stripe_invoice_id is None:
                report.still_unlinked += 1
            if renewal.new_effective_date is not None or renewal.new_invoice_id is not None:
                changes.append(renewal)
    if dry_run:
        report.renewals_changed = len(changes)
    return changes, report


def _write_batch(source, changes: list[_Renewal], report: BackfillReport) -> BackfillReport:
    """Write one batch's decisions in a transaction of its own (the caller's connection)."""
    with transaction.atomic(using=source.using):
        if changes:
            report.renewals_changed, report.history_rows = source.write(changes)
    return report


def _run_batch(source, scope: _Scope, subscription_pks: list[int], dry_run: bool, *,
               thorough: bool = False) -> BackfillReport:
    """Read, decide and (unless ``dry_run``) write one batch, in one transaction."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        thorough = thorough or dry_run or attempt > 1
        try:
            if dry_run:
                return _decide_batch(_read_batch(source, scope, subscription_pks, thorough=True), dry_run)[1]
            with transaction.atomic(using=source.using):
                data = _read_batch(source, scope, subscription_pks, thorough=thorough)
                changes, report = _decide_batch(data, dry_run)
                return _write_batch(source, changes, report)
        except IntegrityError:
            # A live handler linked or dated one of these renewals meanwhile: decide again.
            if attempt == WRITE_ATTEMPTS:
                raise
            logger.warning("renewal backfill: the batch from subscription %s hit a unique constraint (an invoice"
                           " linked elsewhere, or a concurrent change); deciding it again", subscription_pks[0])
    raise AssertionError("unreachable")


def _run_sequential(source, scope, batch_size, dry_run, committed, after=None, thorough=False) -> None:
    """One batch after the other on the caller's connection: keyset pagination on subscription_id."""
    while True:
        subscription_pks = source.next_subscriptions(scope, after, batch_size)
        if not subscription_pks:
            return
        committed(_run_batch(source, scope, subscription_pks, dry_run, thorough=thorough))
        after = subscription_pks[-1]
        thorough = False


# --- Overlapping the database and Python --------------------------------------------------
#
# Deciding a batch is Python (JSON, read_invoice, matching); reading and writing it is mostly
# PostgreSQL's work, and reading is the longest part: on 1,000,000 renewals, 43 ms a batch
# against 20 ms deciding and 23 ms writing, measured inside the command. So READERS threads
# read batches N + 1, N + 2 ... ahead while this thread decides batch N, and a writer thread
# writes and commits batch N - 1. Each thread has its own connection (Django's are per thread).
# The readers take the batches' keys in turn (keyset pagination needs the previous batch's last
# key, so that step is serialized), read them in parallel, and this thread decides and the
# writer commits them in key order, as a sequential run would. Batches hold disjoint
# subscriptions, so reading ahead sees what a sequential run would. An invoice linked to another
# subscription's renewal (damaged data, or a live handler meanwhile) surfaces as a unique
# violation in the writer: that batch is then decided again on its own, thoroughly, and the
# overlap resumes after it.

_DONE = object()
_QUEUE_WAIT = 0.2  # seconds between looks at the stop flag while a queue is full or empty
READERS = 2  # threads reading batches ahead, each on its own connection
READ_AHEAD = 3  # batches read and not yet decided, at most


def _can_overlap(source) -> bool:
    connection = connections[source.using]
    return connection.vendor == "postgresql" and not connection.in_atomic_block


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_QUEUE_WAIT)
            return True
        except queue.Full:
            continue
    return False


class _ReadAhead:
    """Batches read ahead by ``READERS`` threads, handed over in key order by ``next()``.

    At most ``READ_AHEAD`` batches are read and not yet taken: memory stays that of a few
    batches whatever the table's size.
    """

    def __init__(self, source, scope, batch_size, dry_run, after, stop: threading.Event):
        self.source, self.scope, self.batch_size, self.dry_run = source, scope, batch_size, dry_run
        self.stop = stop
        self.after = after  # the last key handed to a reader
        self.keys = threading.Lock()  # one reader at a time takes the next batch's keys
        self.changed = threading.Condition()
        self.numbered = 0  # batches numbered so far (by the readers)
        self.taken = 0  # batches handed over so far (to next())
        self.ready: dict[int, object] = {}  # number -> (after, data), or _DONE
        self.failure: BaseException | None = None
        self.threads = [threading.Thread(target=self._read, name=f"backfill-reader-{i + 1}", daemon=True)
                        for i in range(READERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _read(self) -> None:
        try:
            while not self.stop.is_set():
                with self.keys:
                    if self.after is _DONE:
                        return
                    after = self.after
                    subscription_pks = self.source.next_subscriptions(self.scope, after, self.batch_size)
                    number = self.numbered
                    self.numbered += 1
                    self.after = subscription_pks[-1] if subscription_pks else _DONE
                if not subscription_pks:
                    self._hand(number, _DONE)
                    return
                with self.changed:  # not further ahead than READ_AHEAD batches
                    while number - self.taken >= READ_AHEAD and not self.stop.is_set():
                        self.changed.wait(_QUEUE_WAIT)
                if self.stop.is_set():
                    return
                data = _read_batch(self.source, self.scope, subscription_pks, thorough=self.dry_run)
                self._hand(number, (after, data))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            with self.changed:
                self.failure = self.failure or exc
                self.changed.notify_all()
        finally:
            connections[self.source.using].close()

    def _hand(self, number: int, item) -> None:
        with self.changed:
            self.ready[number] = item
            self.changed.notify_all()

    def next(self):
        """The next batch in key order, ``_DONE`` at the end (or once stopped); raises a reader's failure."""
        with self.changed:
            while self.taken not in self.ready:
                if self.failure is not None:
                    raise self.failure
                if self.stop.is_set() or not any(thread.is_alive() for thread in self.threads):
                    return _DONE
                self.changed.wait(_QUEUE_WAIT)
            item = self.ready.pop(self.taken)
            self.taken += 1
            self.changed.notify_all()
            return item


def _write_behind(source, inbox: queue.Queue, outbox: queue.Queue, stop: threading.Event) -> None:
    try:
        while True:
            try:
                item = inbox.get(timeout=_QUEUE_WAIT)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is _DONE or stop.is_set():
                return  # a batch not started when the run stops is dropped: it is read again next run
            after, changes, report = item
            try:
                outbox.put(_write_batch(source, changes, report))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outbox.put((after, exc))
                stop.set()
                return
    finally:
        connections[source.using].close()


def _run_overlapped(source, scope, batch_size, dry_run, committed) -> None:
    """Overlapped runs; a batch whose write hits a unique constraint is redone on its own, thoroughly."""
    after = None
    while True:
        failed_after = _overlap(source, scope, batch_size, dry_run, committed, after)
        if failed_after is _DONE:
            return
        subscription_pks = source.next_subscriptions(scope, failed_after, batch_size)
        if not subscription_pks:
            return
        committed(_run_batch(source, scope, subscription_pks, dry_run, thorough=True))
        after = subscription_pks[-1]


def _overlap(source, scope, batch_size, dry_run, committed, start_after):
    """Batches after ``start_after`` until the end (``_DONE``) or a unique violation (its batch's key)."""
    stop = threading.Event()
    to_write: queue.Queue = queue.Queue(maxsize=1)
    written: queue.Queue = queue.Queue()
    reader = _ReadAhead(source, scope, batch_size, dry_run, start_after, stop)
    writer = None
    if not dry_run:
        writer = threading.Thread(target=_write_behind, args=(source, to_write, written, stop),
                                  name="backfill-writer", daemon=True)
    retry_after = _DONE  # the key before the batch whose write hit a unique constraint

    def collect(block: bool) -> None:
        """Hand the committed batches on, in order; note a conflict; re-raise other failures."""
        nonlocal retry_after
        while True:
            alive = writer.is_alive()  # looked at before the queue: nothing put after is missed
            try:
                item = written.get(timeout=_QUEUE_WAIT) if block else written.get_nowait()
            except queue.Empty:
                if block and alive:
                    continue
                return
            if isinstance(item, BackfillReport):
                committed(item)
                continue
            after, exc = item
            if not isinstance(exc, IntegrityError):
                raise exc
            logger.warning("renewal backfill: a batch hit a unique constraint; deciding it again")
            retry_after = after

    reader.start()
    if writer is not None:
        writer.start()
    try:
        while True:
            item = reader.next()
            if item is _DONE:
                break
            after, data = item
            changes, report = _decide_batch(data, dry_run)
            if writer is None:
                committed(report)
                continue
            if not _put(to_write, (after, changes, report), stop):
                break
            collect(block=False)
        if writer is not None:
            _put(to_write, _DONE, stop)
            collect(block=True)
    finally:
        stop.set()
        reader.join()
        if writer is not None:
            writer.join()
    return retry_after


# --- Reading and writing ------------------------------------------------------------------


class _PortableSource:
    """Reads and writes through the ORM: any database Django supports (SQLite for ``make run``)."""

    def __init__(self, *, renewal_model, subscription_model, event_model, entitlement_model, history_model, using):
        self.renewals = renewal_model._default_manager.db_manager(using)
        self.subscriptions = subscription_model._default_manager.db_manager(using)
        self.events = event_model._default_manager.db_manager(using)
        self.entitlements = entitlement_model._default_manager.db_manager(using)
        self.renewal_model, self.event_model, self.history_model = renewal_model, event_model, history_model
        self.using = using

    def select(self, manager, field: str, values: list, columns: tuple, order_by: tuple = ("pk",)) -> list[tuple]:
        """``columns`` of the rows whose ``field`` is one of ``values``, in ``order_by`` order."""
        return list(manager.filter(**{f"{field}__in": values}).order_by(*order_by).values_list(*columns))

    def count_in_scope(self, scope: _Scope) -> int:
        return self.renewals.filter(scope.renewal_filter()).count()

    def next_subscriptions(self, scope: _Scope, after: int | None, limit: int) -> list[int]:
        """The next subscriptions (keyset on ``subscription_id``) with up to ``limit`` renewals in scope."""
        rows = self.renewals.filter(scope.renewal_filter())
        if after is not None:
            rows = rows.filter(subscription_id__gt=after)
        picked = rows.order_by("subscription_id").values_list("subscription_id", flat=True)[:limit]
        return sorted(set(picked))

    def load_renewals(self, scope: _Scope, subscription_pks: list[int]):
        subscriptions = {
            pk: _Subscription(pk, stripe_id, trial_end, period_end)
            for pk, stripe_id, trial_end, period_end in self.select(
                self.subscriptions, "pk", subscription_pks, ("pk", "stripe_id", "trial_end", "current_period_end")
            )
        }
        renewals_by_sub: dict[int, list[_Renewal]] = {}
        # No join to the entitlements: the batch reads them once, by subscription (below).
        rows = self.select(
            self.renewals,
            "subscription_id",
            subscription_pks,
            ("pk", "subscription_id", "effective_date", "stripe_invoice_id", "processed_at", "created_at",
             "from_entitlement_id", "to_entitlement_id"),
            order_by=("subscription_id", "pk"),
        )
        for pk, sub_pk, effective, invoice_id, processed, created, from_id, to_id in rows:
            renewals_by_sub.setdefault(sub_pk, []).append(
                _Renewal(pk, effective, invoice_id, processed, from_id, to_id,
                         scope.includes(effective, invoice_id, created))
            )
        return subscriptions, renewals_by_sub

    def entitlement_windows(self, subscriptions: list[_Subscription], renewals_by_sub) -> dict[str, list[datetime]]:
        """Each subscription's paid window ends, in order; fills in its renewals' from/to windows."""
        ends: dict[str, list[datetime]] = {}
        windows: dict[int, tuple[datetime, datetime]] = {}
        rows = self.select(
            self.entitlements,
            "stripe_subscription_id",
            [s.stripe_id for s in subscriptions],
            ("pk", "stripe_subscription_id", "kind", "starts_at", "expires_at"),
            order_by=("stripe_subscription_id", "starts_at"),
        )
        for pk, stripe_id, kind, starts_at, expires_at in rows:
            windows[pk] = (starts_at, expires_at)
            if kind == PAID_KIND:
                ends.setdefault(stripe_id, []).append(expires_at)
        renewals = [r for s in subscriptions for r in renewals_by_sub.get(s.pk, ())]
        elsewhere = {r.from_entitlement_id for r in renewals} | {r.to_entitlement_id for r in renewals}
        elsewhere -= windows.keys() | {None}
        if elsewhere:  # a renewal pointing at another subscription's window: unusual, still read
            for pk, starts_at, expires_at in self.select(
                self.entitlements, "pk", sorted(elsewhere), ("pk", "starts_at", "expires_at")
            ):
                windows[pk] = (starts_at, expires_at)
        for renewal in renewals:
            if renewal.from_entitlement_id in windows:
                renewal.from_expires = windows[renewal.from_entitlement_id][1]
            if renewal.to_entitlement_id in windows:
                renewal.to_starts, renewal.to_expires = windows[renewal.to_entitlement_id]
        return ends

    def invoice_events(self, stripe_ids: list[str]) -> dict[str, dict[str, list]]:
        """Invoice events of these subscriptions, grouped: {sub: {invoice: [(event id, data.object)]}}."""
        wanted = set(stripe_ids)
        rows = (
            self.events.filter(type__in=INVOICE_EVENT_TYPES)
            .filter(
                Q(payload__data__object__parent__subscription_details__subscription__in=stripe_ids)
                | Q(payload__data__object__subscription__in=stripe_ids)
            )
            .order_by("created", "pk")
            .values_list("pk", "object_id", "payload")
        )
        invoices: dict[str, dict[str, list]] = {}
        for event_id, object_id, payload in rows:
            obj = payload.get("data", {}).get("object") if isinstance(payload, dict) else None
            if not isinstance(obj, dict):
                continue  # counted by count_unreadable_events
            stripe_id = invoice_subscription_id(obj)
            if stripe_id not in wanted:
                continue
            invoice_id = object_id or str(obj.get("id") or f"?{event_id}")
            invoices.setdefault(stripe_id, {}).setdefault(invoice_id, []).append((event_id, obj))
        return invoices

    def event_payload(self, event_id: str):
        """What ``invoice_events`` gives for one event (its ``data.object``), for an event given as None."""
        payload = self.events.values_list("payload", flat=True).get(pk=event_id)
        data = payload.get("data") if isinstance(payload, dict) else None
        return data.get("object") if isinstance(data, dict) else data

    def linked_to(self, invoice_ids: list[str]) -> dict[str, int]:
        """{invoice id: subscription pk of the renewal linked to it} for those linked anywhere."""
        return dict(
            self.renewals.filter(stripe_invoice_id__in=invoice_ids).values_list("stripe_invoice_id", "subscription_id")
        )

    def count_unreadable_events(self) -> int:
        count = 0
        for payload in self.events.filter(type__in=INVOICE_EVENT_TYPES).values_list("payload", flat=True).iterator():
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
                count += 1
        return count

    def write(self, changes: list[_Renewal]) -> tuple[int, int]:
        """Write the batch's decisions and their history rows; (renewals updated, history rows)."""
        now = datetime.now(timezone.utc)
        rows = [
            self.renewal_model(
                pk=r.pk, effective_date=r.effective_date, stripe_invoice_id=r.stripe_invoice_id, updated_at=now
            )
            for r in changes
        ]
        self.renewals.bulk_update(rows, ["effective_date", "stripe_invoice_id", "updated_at"], batch_size=500)
        if self.history_model is None:
            return len(rows), 0
        tracked = _tracked_fields(self.renewal_model, self.history_model)
        history = [
            self.history_model(
                **{name: value for name, value in zip(tracked, values)},
                history_date=now,
                history_change_reason=HISTORY_CHANGE_REASON,
                history_type="~",
            )
            for values in self.renewals.filter(pk__in=[r.pk for r in changes]).values_list(*tracked)
        ]
        self.history_model._default_manager.db_manager(self.using).bulk_create(history, batch_size=500)
        return len(rows), len(history)


class _PostgresSource(_PortableSource):
    """The same, with the two hot statements in SQL: the event lookup and the bulk write."""

    def select(self, manager, field: str, values: list, columns: tuple, order_by: tuple = ("pk",)) -> list[tuple]:
        """The same select in SQL: one array parameter instead of thousands, fast timestamps.

        ``IN (%s, %s, ...)`` with a few thousand values costs more Python (Django compiling,
        psycopg merging) than the query costs PostgreSQL. And Django registers a Python subclass
        of psycopg's timestamptz loader, several times slower than psycopg's own C loader used
        here; the connection's time zone is UTC either way, so the values are the same.
        """
        from psycopg.types.datetime import TimestamptzLoader

        quote = connections[self.using].ops.quote_name
        meta = manager.model._meta
        column = lambda name: quote(_column(meta, name))  # noqa: E731
        kind = "bigint" if all(isinstance(value, int) for value in values) else "text"
        sql = (
            f"SELECT {', '.join(map(column, columns))} FROM {quote(meta.db_table)}"
            f" WHERE {column(field)} = ANY(%s::{kind}[]) ORDER BY {', '.join(map(column, order_by))}"
        )
        with connections[self.using].cursor() as cursor:
            cursor.cursor.adapters.register_loader("timestamptz", TimestamptzLoader)
            cursor.execute(sql, [_pg_array(values)])
            return cursor.fetchall()

    def invoice_events(self, stripe_ids: list[str]) -> dict[str, dict[str, list]]:
        """As the portable source, with each event's payload as JSON text, or None for an event
        whose lines, parent and subscription are those of the event before it (``_link_invoice``).
        """
        from psycopg.types.datetime import TimestamptzLoader

        events = self.event_model._meta.db_table
        subscription = EVENT_SUBSCRIPTION_SQL.replace("payload", "e.payload")
        # The payload travels as text and is parsed only when needed (usually one event per
        # invoice). Printing a jsonb is the costly part of this query (about half of it, with
        # sending and fetching the text), so it is printed only for an invoice's first event and
        # for a later one whose (lines, parent, subscription) differ from the one before it:
        # only those can name another period. Also for one whose lines have no ``data`` array:
        # the one before it, with the same lines, was unreadable, and _link_invoice would
        # otherwise fetch this one on its own. The subscription expression is the one migration
        # 0003 indexes and keeps statistics on. The window sorts a batch's events (about 2.6 MB
        # at the default batch size, within the default work_mem); the order across invoices
        # is made here.
        sql = f"""
            SELECT created, id, invoice_id, stripe_id,
                   CASE WHEN row_number() OVER w = 1 OR shape IS DISTINCT FROM lag(shape) OVER w
                             OR jsonb_typeof(shape[1] -> 'data') IS DISTINCT FROM 'array'
                        THEN payload::text END
              FROM (SELECT e.created, e.id, e.payload,
                           COALESCE(NULLIF(e.object_id, ''), e.payload #>> '{{data,object,id}}', '?' || e.id)
                               AS invoice_id,
                           {subscription} AS stripe_id,
                           ARRAY[e.payload #> '{{data,object,lines}}', e.payload #> '{{data,object,parent}}',
                                 e.payload #> '{{data,object,subscription}}'] AS shape
                      FROM {events} e
                     WHERE e.type IN {EVENT_TYPES_SQL}
                       AND {subscription} = ANY(%s::text[])) AS e
            WINDOW w AS (PARTITION BY invoice_id, stripe_id ORDER BY created, id)
        """
        with transaction.atomic(using=self.using), connections[self.using].cursor() as cursor:
            with self._prefetching_scan(cursor):
                cursor.cursor.adapters.register_loader("timestamptz", TimestamptzLoader)
                cursor.execute(sql, [_pg_array(stripe_ids)])
                rows = cursor.fetchall()
        rows.sort(key=lambda row: (row[0], row[1]))
        invoices: dict[str, dict[str, list]] = {}
        for _, event_id, invoice_id, stripe_id, payload_text in rows:
            invoices.setdefault(stripe_id, {}).setdefault(invoice_id, []).append((event_id, payload_text))
        return invoices

    def event_payload(self, event_id: str) -> str:
        with connections[self.using].cursor() as cursor:
            cursor.execute(f"SELECT payload::text FROM {self.event_model._meta.db_table} WHERE id = %s", [event_id])
            return cursor.fetchone()[0]

    # Whether this server accepts effective_io_concurrency > 0 (not where posix_fadvise is
    # missing, macOS for one); None until the first batch asks.
    _can_prefetch: bool | None = None

    @contextmanager
    def _prefetching_scan(self, cursor):
        """Within it, this transaction reads the events by a bitmap heap scan that prefetches.

        A batch's events (about 2,000 for 1,000 renewals) lie on as many heap pages, spread
        over a table of gigabytes: once it outgrows memory, a plain index scan reads them one
        by one, each waiting for the disk. A bitmap heap scan visits them in physical order
        and, with ``effective_io_concurrency``, asks the kernel for the next pages ahead
        (``posix_fadvise``); measured on 1,000,000 renewals' events read cold, 35-41 ms a
        batch instead of 96-146 ms. The planner underestimates the rows per subscription
        and would pick the plain index scan, hence ``enable_indexscan = off``. Both are set
        for the transaction only and put back afterwards, so a caller's transaction (the
        data migration's) keeps its own settings for everything else.
        """
        cursor.execute("SELECT current_setting('enable_indexscan'), current_setting('effective_io_concurrency'),"
                       " set_config('enable_indexscan', 'off', true)")
        before = cursor.fetchone()[:2]
        prefetch = "SELECT set_config('effective_io_concurrency', %s, true)"
        if self._can_prefetch is None:
            try:
                with transaction.atomic(using=self.using):  # a savepoint: a refusal leaves the rest intact
                    cursor.execute(prefetch, [str(PREFETCH_PAGES)])
                self._can_prefetch = True
            except DatabaseError:
                self._can_prefetch = False
                logger.info("renewal backfill: this server refuses effective_io_concurrency; reading events"
                            " without prefetching")
        elif self._can_prefetch:
            cursor.execute(prefetch, [str(PREFETCH_PAGES)])
        yield
        # Not reached on an error: rolling the transaction (or savepoint) back restores them.
        cursor.execute("SELECT set_config('enable_indexscan', %s, true), set_config('effective_io_concurrency', %s, true)",
                       list(before))

    def count_unreadable_events(self) -> int:
        # The partial index holds NULL for events naming no subscription (one-off invoices and
        # unreadable ones), so this reads only those.
        sql = f"""
            SELECT count(*) FROM {self.event_model._meta.db_table}
             WHERE type IN {EVENT_TYPES_SQL} AND {EVENT_SUBSCRIPTION_SQL} IS NULL
               AND jsonb_typeof(payload -> 'data' -> 'object') IS DISTINCT FROM 'object'
        """
        with connections[self.using].cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0]

    def write(self, changes: list[_Renewal]) -> tuple[int, int]:
        """One statement: update from arrays, and insert a history row per updated renewal.

        ``COALESCE`` keeps a value a live handler wrote since the batch was read: the backfill
        never overwrites; the unique constraints turn a real collision into a retry.
        """
        quote = connections[self.using].ops.quote_name
        meta = self.renewal_model._meta
        pk, effective, invoice, updated_at = (
            quote(meta.get_field(name).column) for name in (meta.pk.name, "effective_date", "stripe_invoice_id", "updated_at")
        )
        update = f"""
            UPDATE {quote(meta.db_table)} AS r
               SET {effective} = COALESCE(r.{effective}, c.effective_date),
                   {invoice} = COALESCE(r.{invoice}, c.stripe_invoice_id),
                   {updated_at} = %s
              FROM (SELECT id, TIMESTAMPTZ 'epoch' + micros * INTERVAL '1 microsecond' AS effective_date,
                           stripe_invoice_id
                      FROM unnest(%s::bigint[], %s::bigint[], %s::text[]) AS u(id, micros, stripe_invoice_id)
                   ) AS c
             WHERE r.{pk} = c.id
               AND ((r.{effective} IS NULL AND c.effective_date IS NOT NULL)
                    OR (r.{invoice} IS NULL AND c.stripe_invoice_id IS NOT NULL))
        """
        now = datetime.now(timezone.utc)
        params = [
            now,
            _pg_array([r.pk for r in changes]),
            # Timestamps as integer microseconds: exact, and much cheaper to send than datetimes.
            _pg_array([None if r.new_effective_date is None else _micros(r.new_effective_date) for r in changes]),
            _pg_array([r.new_invoice_id for r in changes]),
        ]
        with connections[self.using].cursor() as cursor:
            if self.history_model is None:
                cursor.execute(update, params)
                return cursor.rowcount, 0
            history = self.history_model._meta
            tracked = set(_tracked_fields(self.renewal_model, self.history_model))
            columns = ", ".join(quote(f.column) for f in meta.concrete_fields if f.attname in tracked)
            bookkeeping = ", ".join(
                quote(history.get_field(name).column)
                for name in ("history_date", "history_change_reason", "history_type", "history_user")
            )
            cursor.execute(
                f"""
                WITH updated AS ({update} RETURNING r.*)
                INSERT INTO {quote(history.db_table)} ({columns}, {bookkeeping})
                SELECT {columns}, %s, %s, '~', NULL FROM updated
                """,
                [*params, now, HISTORY_CHANGE_REASON],
            )
            return cursor.rowcount, cursor.rowcount


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _pg_array(values) -> str:
    """A PostgreSQL array literal of ints or strings (None is NULL), for one ``%s::type[]``.

    Thousands of elements per batch: building the literal here is many times cheaper than
    psycopg adapting a list element by element on a client-side-binding cursor.
    """
    def element(value):
        if value is None:
            return "NULL"
        if isinstance(value, int):
            return str(value)
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ",".join(map(element, values)) + "}"


def _micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _column(meta, name: str) -> str:
    if name == "pk":
        return meta.pk.column
    return next(f.column for f in meta.concrete_fields if name in (f.name, f.attname))


def _tracked_fields(renewal_model, history_model) -> list[str]:
    """The renewal's fields that its history model copies (by attname: ``subscription_id``, ...)."""
    history_names = {f.attname for f in history_model._meta.concrete_fields}
    return [f.attname for f in renewal_model._meta.concrete_fields if f.attname in history_names]


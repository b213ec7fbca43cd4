"""The renewal backfill (``billing.backfill``): its rules, its counts, and that it agrees with the
live handlers on the same events.

Events are built with ``billing.simulation.objects`` (Stripe's shapes) and stored as the inbox
stores them. ``build_world`` makes one row of every case the backfill must tell apart; it takes
the model classes, so ``test_migrations`` builds the same world with the frozen models of 0002.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing import backfill
from billing.backfill import BackfillReport, backfill_renewal_invoices, derived_effective_date, service_period_start
from billing.models import Renewal, StripeEvent, Subscription
from billing.simulation.lifecycles import SCENARIOS, generate_lifecycles
from billing.simulation.objects import event_object, invoice_line_object, invoice_object
from billing.tests.conftest import DAY, T0
from billing.tests.lifecycle_state import deliver_until_accepted
from provisioning.models import Account, Entitlement

TRIAL_END = T0 + 14 * DAY


def utc(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


# --- Stripe-shaped invoice events, stored as the inbox stores them ----------------------------


def invoice_event(
    event_type: str,
    invoice_id: str,
    sub_id: str,
    start: int,
    *,
    end: int | None = None,
    created: int | None = None,
    billing_reason: str = "subscription_cycle",
    legacy: bool = False,
    extra_lines: tuple = (),
) -> dict:
    """``invoice.created`` (a draft) or ``invoice.paid`` whose subscription line starts at ``start``."""
    created = start if created is None else created
    line = invoice_line_object(
        id=f"il_{invoice_id}",
        invoice=invoice_id,
        amount=2000,
        period_start=start,
        period_end=end or start + 30 * DAY,
        subscription=sub_id,
    )
    paid = event_type == "invoice.paid"
    invoice = invoice_object(
        id=invoice_id,
        customer=f"cus_{sub_id}",
        status="paid" if paid else "draft",
        billing_reason=billing_reason,
        lines=[*extra_lines, line],
        subscription=sub_id,
        number=f"N-{invoice_id}" if paid else None,
        created=created,
        finalized_at=created + 3600 if paid else None,
        paid_at=created + 3600 if paid else None,
    )
    if legacy:  # before API version 2025-03-31.basil: no `parent`, top-level fields
        invoice["parent"] = None
        invoice["subscription"] = sub_id
        for each in invoice["lines"]["data"]:
            each.pop("parent")
            each.update(type="subscription", subscription=sub_id, proration=False)
    return event_object(type=event_type, obj=invoice, created=created + (3600 if paid else 0))


def store(event_model, event, *, object_id=None):
    """The row ``billing.inbox`` keeps for a delivery (``payload`` is the raw event)."""
    obj = event.get("data", {}).get("object") if isinstance(event, dict) else None
    return event_model.objects.create(
        id=event["id"] if isinstance(event, dict) and "id" in event else f"evt_raw_{event_model.objects.count()}",
        type=event.get("type", "invoice.created") if isinstance(event, dict) else "invoice.created",
        api_version=event.get("api_version", "") if isinstance(event, dict) else "",
        created=utc(event["created"]) if isinstance(event, dict) and "created" in event else utc(T0),
        object_id=object_id if object_id is not None else (obj.get("id", "") if isinstance(obj, dict) else ""),
        payload=event,
        status="processed",
    )


def store_invoice(event_model, invoice_id, sub_id, start, **kwargs):
    """Both stored events of a renewal invoice: ``invoice.created`` then ``invoice.paid``."""
    for event_type in ("invoice.created", "invoice.paid"):
        store(event_model, invoice_event(event_type, invoice_id, sub_id, start, **kwargs))


# --- One world with every case ------------------------------------------------------------------


@dataclass
class Expected:
    """What the backfill must report for ``build_world``."""

    renewals: int = 10
    renewals_changed: int = 6
    linked: int = 4
    already_linked: int = 2
    conflicts: int = 1
    unmatched: int = 1
    malformed: int = 1
    unreadable_events: int = 2
    effective_dates_derived: int = 4
    effective_dates_underivable: int = 1
    still_unlinked: int = 6
    history_rows: int = 6

    def check(self, report: BackfillReport, *, dry_run: bool = False):
        for name, value in vars(self).items():
            if dry_run and name == "history_rows":
                value = 0
            assert getattr(report, name) == value, name


def real_models():
    return SimpleNamespace(
        Account=Account, Subscription=Subscription, Renewal=Renewal, StripeEvent=StripeEvent, Entitlement=Entitlement
    )


def build_world(m) -> dict:
    """Renewals (by name) in every situation; ``m`` holds the model classes (real or frozen).

    a: trial; two renewals without date or link, their invoices stored   -> dated and linked
    b: first renewal complete (in_b0), second dated, invoice 90 s off    -> same-day link
    c: renewal linked to in_c_old; in_c_new also matches it              -> conflict
    d: both events of its invoice unreadable                             -> malformed
    e: no events at all; latest renewal, not processed                   -> dated (period end)
    f: two undated renewals, no trial, no entitlement                    -> first not derivable
    g: its invoice is linked to a renewal of subscription h              -> not linked twice
    l: events in the legacy (pre-basil) layout                           -> linked
    Plus two invoice events whose data.object is not an object (unreadable, no subscription).
    """
    account = m.Account.objects.create(name="Backfill Ltd", stripe_customer_id="cus_backfill")

    def sub(name, **fields):
        return m.Subscription.objects.create(stripe_id=f"sub_{name}", account=account, status="active", **fields)

    def renewal(subscription, when=None, invoice=None, **fields):
        return m.Renewal.objects.create(
            subscription=subscription, effective_date=utc(when) if when else None, stripe_invoice_id=invoice, **fields
        )

    r = {}
    a = sub("a", trial_start=utc(T0), trial_end=utc(TRIAL_END), current_period_end=utc(TRIAL_END + 60 * DAY))
    m.Entitlement.objects.create(
        account=account,
        kind="trial",
        seats=1,
        starts_at=utc(T0),
        expires_at=utc(TRIAL_END),
        stripe_subscription_id="sub_a",
    )
    m.Entitlement.objects.create(
        account=account,
        kind="paid",
        seats=1,
        starts_at=utc(TRIAL_END),
        expires_at=utc(TRIAL_END + 30 * DAY),
        stripe_subscription_id="sub_a",
    )
    r["a0"], r["a1"] = renewal(a), renewal(a)
    store_invoice(m.StripeEvent, "in_a_trial", "sub_a", T0, end=TRIAL_END, billing_reason="subscription_create")
    store_invoice(m.StripeEvent, "in_a0", "sub_a", TRIAL_END)
    store_invoice(m.StripeEvent, "in_a1", "sub_a", TRIAL_END + 30 * DAY)

    b = sub("b")
    r["b0"] = renewal(b, T0, "in_b0")
    r["b1"] = renewal(b, T0 + 30 * DAY)
    store_invoice(m.StripeEvent, "in_b0", "sub_b", T0)
    store_invoice(m.StripeEvent, "in_b1", "sub_b", T0 + 30 * DAY + 90)

    c = sub("c")
    r["c0"] = renewal(c, T0, "in_c_old")
    r["c1"] = renewal(c, T0 + 30 * DAY)
    store_invoice(m.StripeEvent, "in_c_new", "sub_c", T0)

    d = sub("d")
    r["d0"] = renewal(d, T0)
    no_lines = invoice_event("invoice.created", "in_d0", "sub_d", T0)
    del no_lines["data"]["object"]["lines"]
    store(m.StripeEvent, no_lines)
    bad_period = invoice_event("invoice.paid", "in_d0", "sub_d", T0)
    bad_period["data"]["object"]["lines"]["data"][0]["period"]["start"] = "soon"
    store(m.StripeEvent, bad_period)

    e = sub("e", current_period_end=utc(T0 + 30 * DAY))
    r["e0"] = renewal(e)

    f = sub("f", current_period_end=utc(T0 + 60 * DAY))
    r["f0"], r["f1"] = renewal(f), renewal(f)

    g, h = sub("g"), sub("h")
    r["g0"] = renewal(g, T0)
    r["h0"] = renewal(h, T0, "in_g0")
    store_invoice(m.StripeEvent, "in_g0", "sub_g", T0)

    legacy = sub("l")
    r["l0"] = renewal(legacy, T0)
    store_invoice(m.StripeEvent, "in_l0", "sub_l", T0, legacy=True)

    store(
        m.StripeEvent, {"id": "evt_not_an_object", "type": "invoice.created", "created": T0, "data": {"object": "in_x"}}
    )
    store(m.StripeEvent, "not an event at all")
    return r


# What each renewal of build_world holds afterwards: (effective date, invoice).
WORLD_AFTER = {
    "a0": (utc(TRIAL_END), "in_a0"),
    "a1": (utc(TRIAL_END + 30 * DAY), "in_a1"),
    "b0": (utc(T0), "in_b0"),
    "b1": (utc(T0 + 30 * DAY), "in_b1"),
    "c0": (utc(T0), "in_c_old"),
    "c1": (utc(T0 + 30 * DAY), None),
    "d0": (utc(T0), None),
    "e0": (utc(T0 + 30 * DAY), None),
    "f0": (None, None),
    "f1": (utc(T0 + 60 * DAY), None),
    "g0": (utc(T0), None),
    "h0": (utc(T0), "in_g0"),
    "l0": (utc(T0), "in_l0"),
}


def world_state(renewal_model, renewals: dict) -> dict:
    rows = {
        pk: (when, invoice)
        for pk, when, invoice in renewal_model.objects.values_list("pk", "effective_date", "stripe_invoice_id")
    }
    return {name: rows[r.pk] for name, r in renewals.items()}


def run(**kwargs) -> BackfillReport:
    options = dict(
        renewal_model=Renewal,
        history_model=Renewal.history.model,
        subscription_model=Subscription,
        event_model=StripeEvent,
        entitlement_model=Entitlement,
    )
    options.update(kwargs)
    return backfill_renewal_invoices(**options)


# --- Rules -----------------------------------------------------------------------------------


def _renewal(**fields):
    values = dict(pk=1, effective_date=None, stripe_invoice_id=None, processed=False)
    values.update(fields)
    return backfill._Renewal(**values)


def _sub(trial_end=None, current_period_end=None):
    return SimpleNamespace(pk=1, stripe_id="sub_1", trial_end=trial_end, current_period_end=current_period_end)


def test_effective_date_comes_from_the_most_direct_evidence():
    t = [utc(T0 + k * 30 * DAY) for k in range(5)]
    # 1. the paid window it moved to starts at it, before anything else
    assert derived_effective_date(0, [_renewal(to_starts=t[1], from_expires=t[2])], _sub(t[3]), [t[4]]) == t[1]
    # 2. the window it moved from ends at it
    assert derived_effective_date(0, [_renewal(from_expires=t[2])], _sub(t[3]), [t[4]]) == t[2]
    # 3. first renewal of a subscription with a trial
    assert derived_effective_date(0, [_renewal()], _sub(trial_end=t[3]), [t[4]]) == t[3]
    # 4. the end of the paid period before it: the window the previous renewal moved to ...
    previous = _renewal(to_starts=t[0], to_expires=t[1])
    assert derived_effective_date(1, [previous, _renewal()], _sub(), [t[4]]) == t[1]
    # ... else the paid window of the same rank (after the trial's renewal, rank shifts by one)
    assert derived_effective_date(1, [_renewal(), _renewal()], _sub(), [t[1], t[2]]) == t[2]
    assert derived_effective_date(1, [_renewal(), _renewal()], _sub(trial_end=t[0]), [t[1], t[2]]) == t[1]
    # ... else, for the latest renewal not processed yet, the current period's end
    assert derived_effective_date(1, [_renewal(), _renewal()], _sub(current_period_end=t[4]), []) == t[4]
    assert derived_effective_date(1, [_renewal(), _renewal(processed=True)], _sub(current_period_end=t[4]), []) is None
    assert derived_effective_date(0, [_renewal(), _renewal()], _sub(current_period_end=t[4]), []) is None


def test_service_period_is_the_subscription_line_of_read_invoice():
    proration = invoice_line_object(
        id="il_p",
        invoice="in_1",
        amount=-500,
        period_start=T0 + 5 * DAY,
        period_end=T0 + 30 * DAY,
        subscription="sub_1",
        proration=True,
        invoice_item="ii_1",
    )
    event = invoice_event("invoice.created", "in_1", "sub_1", T0 + 30 * DAY, extra_lines=(proration,))
    obj = event["data"]["object"]
    assert service_period_start(obj, "sub_1") == utc(T0 + 30 * DAY)
    assert service_period_start(json.dumps(obj), "sub_1") == utc(T0 + 30 * DAY)  # as a batch reads it
    for unreadable in (json.dumps("in_1"), json.dumps(["evt"]), "{not json", None):
        with pytest.raises(backfill._Unreadable):
            service_period_start(unreadable, "sub_1")
    legacy = invoice_event("invoice.created", "in_2", "sub_1", T0, legacy=True)["data"]["object"]
    assert service_period_start(legacy, "sub_1") == utc(T0)
    only_items = copy.deepcopy(obj)
    only_items["lines"]["data"] = [proration]
    assert service_period_start(only_items, "sub_1") is None  # pays for no period: not malformed


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda o: ["in_1"], "not an object"),
        (lambda o: o.pop("lines") and o, "no lines"),
        (lambda o: o["lines"].update(data=None) or o, "no lines"),
        (lambda o: o["lines"]["data"][0].pop("period") and o, "no period"),
        (lambda o: o["lines"]["data"][0]["period"].update(start="soon") or o, "period.start is a string"),
        (lambda o: o["lines"]["data"][0]["period"].update(start=10**20) or o, "Error"),
        (lambda o: o["lines"]["data"][0].update(quantity=[]) or o, "quantity is a list"),
        (lambda o: o.pop("customer") and o, "customer"),
        (lambda o: o["parent"]["subscription_details"].update(subscription="sub_other") or o, "sub_other"),
    ],
)
def test_unreadable_invoice_objects_raise_a_counted_error_never_anything_else(damage, reason):
    obj = damage(invoice_event("invoice.created", "in_1", "sub_1", T0)["data"]["object"])
    with pytest.raises(backfill._Unreadable, match=reason):
        service_period_start(obj, "sub_1")


# --- The whole backfill ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_case_is_decided_and_counted():
    renewals = build_world(real_models())

    report = run(batch_size=3)

    Expected().check(report)
    assert report.total == Expected.renewals
    assert world_state(Renewal, renewals) == WORLD_AFTER
    assert report.conflict_samples == [
        f"renewal {renewals['c0'].pk} of sub_c is linked to in_c_old; in_c_new also matches it (kept the first)"
    ]
    assert len(report.malformed_samples) == 2 and all("(in_d0)" in s for s in report.malformed_samples)


@pytest.mark.django_db
def test_history_records_each_change_once_with_its_reason():
    renewals = build_world(real_models())
    before = Renewal.history.count()

    run()

    rows = Renewal.history.filter(history_change_reason="backfill_renewal_invoices")
    assert Renewal.history.count() - before == rows.count() == Expected.history_rows
    a0 = rows.get(id=renewals["a0"].pk)
    assert (a0.history_type, a0.effective_date, a0.stripe_invoice_id, a0.subscription_id) == (
        "~",
        utc(TRIAL_END),
        "in_a0",
        renewals["a0"].subscription_id,
    )


@pytest.mark.django_db
def test_history_rows_are_those_simple_history_writes_on_a_save():
    """Same columns, same values: a backfilled row equals the one ``save()`` would have written."""
    renewals = build_world(real_models())
    Renewal.objects.filter(pk=renewals["a0"].pk).update(processed_at=utc(TRIAL_END + 3600))  # no column left null
    run()
    ours = (
        Renewal.history.filter(history_change_reason=backfill.HISTORY_CHANGE_REASON).values().get(id=renewals["a0"].pk)
    )

    renewal = Renewal.objects.get(pk=renewals["a0"].pk)
    renewal._change_reason = backfill.HISTORY_CHANGE_REASON
    renewal.save()
    theirs = (
        Renewal.history.exclude(history_id=ours["history_id"]).values().filter(id=renewal.pk).latest("history_date")
    )

    assert ours.keys() == theirs.keys()
    differ = {"history_id", "history_date", "updated_at"}  # the row's own id and the instants of the two writes
    assert {k: v for k, v in ours.items() if k not in differ} == {k: v for k, v in theirs.items() if k not in differ}
    assert (ours["history_type"], ours["history_user_id"]) == ("~", None)
    assert ours["history_date"] == ours["updated_at"]


@pytest.mark.django_db
def test_a_value_written_by_a_live_handler_during_a_batch_is_kept(monkeypatch):
    """The batch reads without locks; its write keeps what a live handler wrote in between."""
    renewals = build_world(real_models())
    write = backfill._Run.write

    def live_handler_first(self, changes):
        Renewal.objects.filter(pk=renewals["a0"].pk).update(stripe_invoice_id="in_live")
        return write(self, changes)

    monkeypatch.setattr(backfill._Run, "write", live_handler_first)
    report = run()

    state = world_state(Renewal, renewals)
    assert state["a0"] == (WORLD_AFTER["a0"][0], "in_live")  # its date written, its link the handler's
    assert {k: v for k, v in state.items() if k != "a0"} == {k: v for k, v in WORLD_AFTER.items() if k != "a0"}
    assert report.history_rows == report.renewals_changed == Expected.renewals_changed


@pytest.mark.django_db
def test_a_batch_that_meets_a_unique_violation_is_decided_again(monkeypatch, caplog):
    from django.db import IntegrityError

    renewals = build_world(real_models())
    write, calls = backfill._Run.write, []

    def collide_once(self, changes):
        calls.append(len(changes))
        result = write(self, changes)
        if len(calls) == 1:
            raise IntegrityError("duplicate key value violates unique constraint")  # rolls the batch back
        return result

    monkeypatch.setattr(backfill._Run, "write", collide_once)
    report = run()

    assert calls[0] == calls[1] and "met a concurrent change" in caplog.text
    assert world_state(Renewal, renewals) == WORLD_AFTER
    Expected().check(report)


@pytest.mark.django_db
def test_without_history_model_no_history_rows_are_written():
    build_world(real_models())
    before = Renewal.history.count()
    report = run(history_model=None)
    assert (report.renewals_changed, report.history_rows) == (6, 0)
    assert Renewal.history.count() == before


@pytest.mark.django_db
def test_existing_values_are_never_overwritten():
    account = Account.objects.create(name="x", stripe_customer_id="cus_x")
    sub = Subscription.objects.create(stripe_id="sub_x", account=account, status="active", trial_end=utc(TRIAL_END))
    # Dated off the trial rule and linked elsewhere than its events say: both stay.
    kept = Renewal.objects.create(subscription=sub, effective_date=utc(TRIAL_END + 3600), stripe_invoice_id=None)
    store_invoice(StripeEvent, "in_x", "sub_x", TRIAL_END + 3600)
    other = Renewal.objects.create(subscription=sub, effective_date=None, stripe_invoice_id="in_manual")
    store_invoice(StripeEvent, "in_y", "sub_x", TRIAL_END + 30 * DAY)

    report = run()

    kept.refresh_from_db()
    other.refresh_from_db()
    assert (kept.effective_date, kept.stripe_invoice_id) == (utc(TRIAL_END + 3600), "in_x")
    # `other` keeps its link; its date cannot be derived (no entitlement, no current period end).
    assert (other.effective_date, other.stripe_invoice_id) == (None, "in_manual")
    assert report.linked == 1 and report.effective_dates_underivable == 1


@pytest.mark.django_db
def test_first_snapshot_that_matches_wins_like_the_live_handlers():
    account = Account.objects.create(name="x", stripe_customer_id="cus_x")
    sub = Subscription.objects.create(stripe_id="sub_x", account=account, status="active")
    renewal = Renewal.objects.create(subscription=sub, effective_date=utc(T0 + 30 * DAY))
    # The draft's line pointed elsewhere (matches nothing); the paid snapshot matches.
    store(StripeEvent, invoice_event("invoice.created", "in_1", "sub_x", T0 + 90 * DAY, created=T0 + 30 * DAY))
    store(StripeEvent, invoice_event("invoice.paid", "in_1", "sub_x", T0 + 30 * DAY))
    # A later invoice for the same period (a replacement): the first link stays, a conflict.
    store_invoice(StripeEvent, "in_2", "sub_x", T0 + 30 * DAY, created=T0 + 31 * DAY)
    # Only an invoice.paid stored, and its created event unreadable: still read.
    broken = invoice_event("invoice.created", "in_3", "sub_x", T0 + 60 * DAY)
    broken["data"]["object"]["lines"] = "gone"
    store(StripeEvent, broken)
    store(StripeEvent, invoice_event("invoice.paid", "in_3", "sub_x", T0 + 60 * DAY))
    later = Renewal.objects.create(subscription=sub, effective_date=utc(T0 + 60 * DAY))

    report = run()

    renewal.refresh_from_db()
    later.refresh_from_db()
    assert (renewal.stripe_invoice_id, later.stripe_invoice_id) == ("in_1", "in_3")
    assert (report.linked, report.conflicts, report.malformed, report.unmatched) == (2, 1, 0, 0)


@pytest.mark.django_db
def test_a_snapshot_after_an_unreadable_one_with_the_same_lines_is_read_on_its_own():
    """The draft names no customer (the live handler fails on it); the paid snapshot, with the same
    lines, is read and links."""
    account = Account.objects.create(name="x", stripe_customer_id="cus_x")
    sub = Subscription.objects.create(stripe_id="sub_x", account=account, status="active")
    renewal = Renewal.objects.create(subscription=sub, effective_date=utc(T0 + 30 * DAY))
    draft = invoice_event("invoice.created", "in_1", "sub_x", T0 + 30 * DAY)
    draft["data"]["object"].pop("customer")
    store(StripeEvent, draft)
    paid = invoice_event("invoice.paid", "in_1", "sub_x", T0 + 30 * DAY)
    store(StripeEvent, paid)

    report = run()

    renewal.refresh_from_db()
    assert renewal.stripe_invoice_id == "in_1"
    assert (report.linked, report.malformed, report.unmatched) == (1, 0, 0)


@pytest.mark.django_db
def test_unreadable_events_are_counted_by_the_rule_the_batches_parse_with():
    """The count (one query) and ``_parse`` (what a batch applies to each snapshot) agree on every
    kind of ``data.object``, integers beyond 64 bits included."""
    objects = ["in_1", ["in_1"], None, 10**25, 1.5, True, {}, {"id": "in_2", "amount": 10**25}]
    for n, obj in enumerate(objects):
        store(StripeEvent, {"id": f"evt_{n}", "type": "invoice.paid", "data": {"object": obj}})
    store(StripeEvent, {"id": "evt_none", "type": "invoice.created", "data": {}})  # no data.object at all

    def unreadable(text):
        try:
            backfill._parse(text)
        except backfill._Unreadable:
            return True
        return False

    expected = sum(unreadable(json.dumps(obj)) for obj in objects) + unreadable(None)
    assert expected == 7 and run().unreadable_events == expected


@pytest.mark.django_db
def test_filters_limit_what_is_changed():
    renewals = build_world(real_models())

    report = run(subscription_ids=["sub_a", "sub_b"])
    assert (report.renewals, report.linked, report.unreadable_events) == (3, 3, 0)
    state = world_state(Renewal, renewals)
    assert state["a1"] == WORLD_AFTER["a1"] and state["b1"] == WORLD_AFTER["b1"]
    assert state["l0"] == (utc(T0), None) and state["e0"] == (None, None)

    # Renewals effective since T0 + 1 day (or, undated, created since): c1 and f*, e0 ...
    report = run(since=utc(T0 + DAY))
    state = world_state(Renewal, renewals)
    assert state["l0"] == (utc(T0), None)  # effective before: left alone
    assert state["e0"] == WORLD_AFTER["e0"] and state["f1"] == WORLD_AFTER["f1"]
    assert report.renewals == 4  # c1, e0, f0, f1


@pytest.mark.django_db
def test_since_leaves_renewals_before_it_and_counts_their_invoices():
    account = Account.objects.create(name="x", stripe_customer_id="cus_x")
    sub = Subscription.objects.create(stripe_id="sub_x", account=account, status="active")
    old = Renewal.objects.create(subscription=sub, effective_date=utc(T0))
    new = Renewal.objects.create(subscription=sub, effective_date=utc(T0 + 30 * DAY))
    store_invoice(StripeEvent, "in_old", "sub_x", T0)
    store_invoice(StripeEvent, "in_new", "sub_x", T0 + 30 * DAY)

    report = run(since=utc(T0 + DAY).date())

    old.refresh_from_db()
    new.refresh_from_db()
    assert (old.stripe_invoice_id, new.stripe_invoice_id) == (None, "in_new")
    assert (report.linked, report.out_of_scope) == (1, 1)


@pytest.mark.django_db
def test_queries_per_batch_do_not_grow_with_rows():
    """No per-row queries: a batch of 4 subscriptions and one of 40 cost the same."""

    def world(n, prefix):
        account = Account.objects.create(name=prefix, stripe_customer_id=f"cus_{prefix}")
        for i in range(n):
            sub = Subscription.objects.create(
                stripe_id=f"sub_{prefix}{i}", account=account, status="active", trial_end=utc(TRIAL_END)
            )
            Renewal.objects.create(subscription=sub)
            Renewal.objects.create(subscription=sub, effective_date=utc(TRIAL_END + 30 * DAY))
            store_invoice(StripeEvent, f"in_{prefix}{i}a", sub.stripe_id, TRIAL_END)
            store_invoice(StripeEvent, f"in_{prefix}{i}b", sub.stripe_id, TRIAL_END + 30 * DAY)
        return [f"sub_{prefix}{i}" for i in range(n)]

    small, large = world(4, "s"), world(40, "l")
    counts = []
    for subs in (small, large):
        with CaptureQueriesContext(connection) as queries:
            report = run(subscription_ids=subs, batch_size=1000)
        assert report.batches == 1 and report.linked == 2 * len(subs)
        counts.append(len(queries))
    assert counts[0] == counts[1]


@pytest.mark.django_db
def test_event_lookup_uses_the_expression_index_of_migration_0003():
    build_world(real_models())
    with CaptureQueriesContext(connection) as queries:
        run(subscription_ids=["sub_a"], dry_run=True)
    lookup = next(q["sql"] for q in queries if "payload #>> '{data,object,parent" in q["sql"])
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + lookup)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert backfill.EVENT_INDEX_NAME in plan


@pytest.mark.django_db
def test_dry_run_changes_nothing_and_reports_what_would():
    renewals = build_world(real_models())
    before, history = world_state(Renewal, renewals), Renewal.history.count()

    report = run(dry_run=True, batch_size=2)

    assert world_state(Renewal, renewals) == before
    assert Renewal.history.count() == history
    Expected().check(report, dry_run=True)


@pytest.mark.django_db
def test_a_run_resumes_after_an_interruption_and_a_second_run_changes_nothing():
    renewals = build_world(real_models())
    seen = []

    def stop_after_first_batch(report):
        seen.append(report.batches)
        if report.batches == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(batch_size=2, progress=stop_after_first_batch)
    assert seen == [0, 1]
    assert world_state(Renewal, renewals)["a0"] == WORLD_AFTER["a0"]  # the first batch is committed
    assert world_state(Renewal, renewals)["l0"] != WORLD_AFTER["l0"]

    resumed = run(batch_size=2)
    assert world_state(Renewal, renewals) == WORLD_AFTER
    assert resumed.renewals < Expected.renewals  # sub_a is done: not selected again

    again = run(batch_size=2)
    assert (again.renewals_changed, again.linked, again.effective_dates_derived, again.history_rows) == (0, 0, 0, 0)
    assert world_state(Renewal, renewals) == WORLD_AFTER


@pytest.mark.django_db
def test_empty_database_costs_a_few_queries():
    with CaptureQueriesContext(connection) as queries:
        report = run()
    assert report.renewals == 0 and report.batches == 0
    assert len(queries) <= 3


# --- Same links as the live handlers ------------------------------------------------------------


@pytest.fixture
def webhook(settings):
    from billing.tests.conftest import SECRET

    settings.STRIPE_WEBHOOK_SECRETS = [SECRET]


def deliver_lifecycles_in_order(client, customers: int, seed: int):
    lifecycles = generate_lifecycles(customers=customers, seed=seed)
    events = sorted((e for lc in lifecycles for e in lc.events), key=lambda e: e["created"])
    deliver_until_accepted(client, events)
    return lifecycles


def live_renewals():
    return {
        pk: (when, invoice)
        for pk, when, invoice in Renewal.objects.values_list("pk", "effective_date", "stripe_invoice_id")
    }


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [3, 11])
def test_backfill_reaches_the_links_of_the_live_handlers(client, webhook, seed):
    lifecycles = deliver_lifecycles_in_order(client, customers=2 * len(SCENARIOS), seed=seed)
    live = live_renewals()
    assert sum(1 for _, invoice in live.values() if invoice) >= len(lifecycles) // 2  # the live path linked

    Renewal.objects.update(stripe_invoice_id=None)
    report = run(batch_size=4)

    assert live_renewals() == live
    assert report.linked == sum(1 for _, invoice in live.values() if invoice)
    assert (report.conflicts, report.malformed, report.unreadable_events) == (0, 0, 0)


@pytest.mark.django_db
def test_backfill_also_derives_the_dates_the_live_handlers_planned(client, webhook):
    deliver_lifecycles_in_order(client, customers=3 * len(SCENARIOS), seed=5)
    live = live_renewals()

    Renewal.objects.update(stripe_invoice_id=None, effective_date=None)
    report = run(batch_size=5)

    assert live_renewals() == live
    assert report.effective_dates_derived == len(live) and report.effective_dates_underivable == 0

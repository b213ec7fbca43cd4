"""The simulator: lifecycles that say what they imply, arranged, signed and delivered as Stripe does."""

import json
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import stripe
from django.core.management import CommandError, call_command

from billing import stripe_payloads as sp
from billing.simulation import objects as o
from billing.simulation.delivery import DeliveryError, arrange, deliver, sign
from billing.simulation.lifecycles import (
    NO_TRIAL,
    ONE_OFF_REFUND,
    PAYMENT_FAILED,
    SCENARIOS,
    SEAT_CHANGE,
    TRIAL_CANCEL,
    TRIAL_REMINDER_BEFORE,
    generate_lifecycles,
)

SECRET = "whsec_simulation_test"
SEEDS = [0, 1, 7, 2026]


def _by_type(lifecycle, type_):
    return [event for event in lifecycle.events if event["type"] == type_]


def _last_invoice_snapshot(lifecycle, invoice_id, type_="invoice.paid"):
    events = [e for e in _by_type(lifecycle, type_) if e["data"]["object"]["id"] == invoice_id]
    return sp.read_invoice(events[-1]["data"]["object"])


# --- Generator ---------------------------------------------------------------------------------


def test_same_seed_gives_the_same_events_and_another_seed_does_not():
    first = generate_lifecycles(customers=6, seed=3)
    again = generate_lifecycles(customers=6, seed=3)
    other = generate_lifecycles(customers=6, seed=4)
    assert [lc.events for lc in first] == [lc.events for lc in again]
    assert [lc.expected for lc in first] == [lc.expected for lc in again]
    ids = {e["id"] for lc in first for e in lc.events}
    assert ids.isdisjoint({e["id"] for lc in other for e in lc.events})


def test_more_customers_do_not_change_the_first_ones():
    six = generate_lifecycles(customers=6, seed=5)
    twelve = generate_lifecycles(customers=12, seed=5)
    assert [lc.events for lc in six] == [lc.events for lc in twelve[:6]]


@pytest.mark.parametrize("seed", SEEDS)
def test_six_customers_cover_every_scenario(seed):
    assert {lc.scenario for lc in generate_lifecycles(customers=6, seed=seed)} == set(SCENARIOS)


@pytest.mark.parametrize("seed", SEEDS)
def test_events_of_a_lifecycle_are_in_order_at_least_a_second_apart(seed):
    for lifecycle in generate_lifecycles(customers=10, seed=seed):
        times = [event["created"] for event in lifecycle.events]
        assert all(later - earlier >= 1 for earlier, later in zip(times, times[1:], strict=False)), lifecycle.scenario
        assert all(event["data"]["object"]["created"] <= event["created"] for event in lifecycle.events)
        assert len({event["id"] for event in lifecycle.events}) == len(lifecycle.events)


def test_start_defaults_to_an_instant_in_2026_fixed_by_the_seed():
    first = generate_lifecycles(customers=1, seed=11)[0].events[0]["created"]
    assert first == generate_lifecycles(customers=1, seed=11)[0].events[0]["created"]
    assert 1767225600 <= first < 1798761600  # 2026
    given = generate_lifecycles(customers=1, seed=11, start=1800000000)[0].events[0]["created"]
    assert 1800000000 <= given < 1800000000 + 2 * 86400


@pytest.mark.parametrize("seed", SEEDS)
def test_lifecycles_placed_to_end_at_an_instant_end_in_the_hour_before_it(seed):
    end = 1_800_000_000
    placed = generate_lifecycles(customers=10, seed=seed, end=end)
    for lifecycle in placed:
        expected = lifecycle.expected
        assert end - 3600 <= lifecycle.events[-1]["created"] <= end, lifecycle.scenario
        assert all(event["created"] <= end for event in lifecycle.events)
        if expected.final_status == "active":  # still running: in its current paid period at ``end``
            assert expected.paid_periods[-1].start <= end < expected.paid_periods[-1].end, lifecycle.scenario
    assert {lc.scenario for lc in placed if lc.expected.final_status == "active"} == {
        NO_TRIAL,
        PAYMENT_FAILED,
        SEAT_CHANGE,
    }
    # Only the dates moved: the same ids, types, amounts and facts as with a given start.
    pinned = generate_lifecycles(customers=10, seed=seed)
    assert [[(e["id"], e["type"]) for e in lc.events] for lc in placed] == [
        [(e["id"], e["type"]) for e in lc.events] for lc in pinned
    ]
    assert [(lc.expected.receipt_invoice_ids, lc.expected.refunded) for lc in placed] == [
        (lc.expected.receipt_invoice_ids, lc.expected.refunded) for lc in pinned
    ]
    assert [lc.events for lc in placed] == [lc.events for lc in generate_lifecycles(customers=10, seed=seed, end=end)]


def test_start_and_end_together_are_refused():
    with pytest.raises(ValueError, match="start or end"):
        generate_lifecycles(customers=1, seed=1, start=1_800_000_000, end=1_800_000_000)


@pytest.mark.parametrize("seed", SEEDS)
def test_paid_periods_are_contiguous_and_match_the_paid_invoices_subscription_line(seed):
    for lifecycle in generate_lifecycles(customers=10, seed=seed):
        expected = lifecycle.expected
        periods = expected.paid_periods
        assert all(a.end == b.start for a, b in zip(periods, periods[1:], strict=False)), lifecycle.scenario
        for period in periods:
            invoice = _last_invoice_snapshot(lifecycle, period.invoice_id)
            line = invoice.subscription_line
            assert invoice.status == "paid" and invoice.total > 0
            assert invoice.subscription_id == expected.subscription_id
            assert (line.period_start.timestamp(), line.period_end.timestamp()) == (period.start, period.end)
            assert line.quantity == period.billed_quantity
        if expected.trial:
            assert periods[0].start == expected.trial[1]  # the trial converts at trial_end
        elif periods:
            assert _last_invoice_snapshot(lifecycle, periods[0].invoice_id).billing_reason == "subscription_create"


@pytest.mark.parametrize("seed", SEEDS)
def test_renewal_invoices_are_created_at_the_start_of_the_period_they_pay(seed):
    for lifecycle in generate_lifecycles(customers=10, seed=seed):
        for period in lifecycle.expected.paid_periods:
            created = _last_invoice_snapshot(lifecycle, period.invoice_id, "invoice.created")
            if created.billing_reason == "subscription_cycle":
                assert created.created.timestamp() == period.start
                assert created.status == "draft" and not created.number and not created.hosted_invoice_url


@pytest.mark.parametrize("seed", SEEDS)
def test_receipts_final_state_and_refunds_follow_from_the_events(seed):
    for lifecycle in generate_lifecycles(customers=10, seed=seed):
        expected = lifecycle.expected
        paid = [sp.read_invoice(e["data"]["object"]) for e in _by_type(lifecycle, "invoice.paid")]
        assert expected.receipt_invoice_ids == {invoice.stripe_id for invoice in paid if invoice.total > 0}
        subscription_events = [e for e in lifecycle.events if e["type"].startswith("customer.subscription.")]
        if expected.subscription_id:
            last = sp.read_subscription(subscription_events[-1]["data"]["object"])
            assert (last.stripe_id, last.status, last.quantity) == (
                expected.subscription_id,
                expected.final_status,
                expected.final_quantity,
            )
        else:
            assert subscription_events == [] and expected.final_status is None
        # A refund reaches its invoice only through invoice_payment (charge -> payment intent -> invoice).
        invoice_of_intent = {
            sp.read_invoice_payment(e["data"]["object"]).payment_intent_id: e["data"]["object"]["invoice"]
            for e in _by_type(lifecycle, "invoice_payment.paid")
        }
        refunded = {}
        for event in _by_type(lifecycle, "charge.refunded"):
            charge = sp.read_charge(event["data"]["object"])
            assert charge.invoice_id == ""  # no invoice on a charge since basil
            refunded[invoice_of_intent[charge.payment_intent_id]] = charge.amount_refunded
        assert refunded == expected.refunded
        refunds = [sp.read_refund(e["data"]["object"]) for e in _by_type(lifecycle, "refund.created")]
        assert sum(r.amount for r in refunds) == sum(expected.refunded.values())


def _lifecycles_of(scenario, seeds=SEEDS, customers=10):
    found = [
        lc for seed in seeds for lc in generate_lifecycles(customers=customers, seed=seed) if lc.scenario == scenario
    ]
    assert found
    return found


def test_trial_lifecycle_reminds_three_days_ahead_then_cancels_at_period_end():
    for lifecycle in _lifecycles_of(TRIAL_CANCEL):
        trial_start, trial_end = lifecycle.expected.trial
        (reminder,) = _by_type(lifecycle, "customer.subscription.trial_will_end")
        assert reminder["created"] == trial_end - TRIAL_REMINDER_BEFORE
        zero = _last_invoice_snapshot(lifecycle, _by_type(lifecycle, "invoice.created")[0]["data"]["object"]["id"])
        assert (zero.billing_reason, zero.total, zero.status) == ("subscription_create", 0, "paid")
        assert 2 <= len(lifecycle.expected.paid_periods) <= 4  # trial conversion + 1 to 3 renewals
        cancel = [
            e
            for e in _by_type(lifecycle, "customer.subscription.updated")
            if "cancel_at_period_end" in e["data"]["previous_attributes"]
        ]
        (deleted,) = _by_type(lifecycle, "customer.subscription.deleted")
        asked, gone = (
            sp.read_subscription(cancel[-1]["data"]["object"]),
            sp.read_subscription(deleted["data"]["object"]),
        )
        last_period_end = lifecycle.expected.paid_periods[-1].end
        assert asked.cancel_at_period_end and asked.status == "active"
        assert asked.cancel_at.timestamp() == last_period_end
        assert gone.status == "canceled" and gone.ended_at.timestamp() == last_period_end == deleted["created"]
        assert lifecycle.expected.final_status == "canceled"


def test_no_trial_lifecycle_pays_its_first_invoice_at_once_then_renews():
    for lifecycle in _lifecycles_of(NO_TRIAL):
        created = sp.read_subscription(_by_type(lifecycle, "customer.subscription.created")[0]["data"]["object"])
        first = lifecycle.expected.paid_periods[0]
        assert created.status == "incomplete" and lifecycle.expected.trial is None
        assert first.start == created.current_period_start.timestamp()
        assert 2 <= len(lifecycle.expected.paid_periods) <= 4
        assert lifecycle.expected.final_status == "active"


def test_failed_renewal_makes_the_subscription_past_due_until_the_retry_pays():
    for lifecycle in _lifecycles_of(PAYMENT_FAILED):
        (failed,) = _by_type(lifecycle, "invoice.payment_failed")
        invoice_id = failed["data"]["object"]["id"]
        paid = [e for e in _by_type(lifecycle, "invoice.paid") if e["data"]["object"]["id"] == invoice_id]
        assert failed["data"]["object"]["status"] == "open" and paid[0]["data"]["object"]["attempt_count"] == 2
        statuses = [
            (e["created"], e["data"]["object"]["status"]) for e in _by_type(lifecycle, "customer.subscription.updated")
        ]
        past_due = [t for t, status in statuses if status == "past_due"]
        assert len(past_due) == 1 and failed["created"] < past_due[0] < paid[0]["created"]
        assert any(status == "active" and t > paid[0]["created"] for t, status in statuses)
        assert invoice_id in {p.invoice_id for p in lifecycle.expected.paid_periods}


def test_seat_change_bills_prorations_and_the_new_quantity_on_the_next_invoice():
    for lifecycle in _lifecycles_of(SEAT_CHANGE):
        changes = [
            e
            for e in _by_type(lifecycle, "customer.subscription.updated")
            if e["request"]["id"] and "items" in e["data"]["previous_attributes"]
        ]
        (change,) = changes
        old = sp.read_subscription({**change["data"]["object"], **change["data"]["previous_attributes"]}).quantity
        new = sp.read_subscription(change["data"]["object"]).quantity
        assert new > old and lifecycle.expected.final_quantity == new
        after = [p for p in lifecycle.expected.paid_periods if p.start > change["created"]]
        invoice = _last_invoice_snapshot(lifecycle, after[0].invoice_id)
        prorations = [line for line in invoice.lines if line.proration]
        assert sorted(line.quantity for line in prorations) == sorted([old, new])
        assert all(
            line.parent_type == "invoice_item_details"
            and line.subscription_id == lifecycle.expected.subscription_id
            and line.period_start.timestamp() == change["created"]
            for line in prorations
        )
        assert invoice.subscription_line.quantity == new == after[0].quantity == after[0].billed_quantity
        # The period the seats changed in ends with the new seats, though it was billed for the old.
        (during,) = [p for p in lifecycle.expected.paid_periods if p.start <= change["created"] < p.end]
        assert (during.billed_quantity, during.quantity) == (old, new)
        assert invoice.total == sum(line.amount for line in invoice.lines)


def test_one_off_invoice_has_no_parent_and_is_partly_refunded():
    for lifecycle in _lifecycles_of(ONE_OFF_REFUND):
        (paid,) = _by_type(lifecycle, "invoice.paid")
        invoice = sp.read_invoice(paid["data"]["object"])
        assert paid["data"]["object"]["parent"] is None and invoice.subscription_id == ""
        assert [line.parent_type for line in invoice.lines] == ["invoice_item_details"]
        assert 0 < lifecycle.expected.refunded[invoice.stripe_id] < invoice.total
        assert lifecycle.expected.subscription_id is None and lifecycle.expected.paid_periods == []


def test_checkout_names_the_given_client_reference_ids_and_is_absent_without_them():
    references = ["101", "102", "103"]
    with_ids = generate_lifecycles(customers=6, seed=8, client_reference_ids=references)
    for index, lifecycle in enumerate(with_ids):
        sessions = [
            sp.read_checkout_session(e["data"]["object"]) for e in _by_type(lifecycle, "checkout.session.completed")
        ]
        if lifecycle.expected.subscription_id is None:
            assert sessions == [] and lifecycle.expected.client_reference_id is None
            continue
        (session,) = sessions
        wanted = references[index] if index < len(references) else ""
        assert (session.mode, session.client_reference_id, session.subscription_id) == (
            "subscription",
            wanted,
            lifecycle.expected.subscription_id,
        )
        assert session.customer.customer_id == lifecycle.customer_id
        assert (lifecycle.expected.client_reference_id or "") == wanted
    without = generate_lifecycles(customers=6, seed=8)
    assert not [e for lc in without for e in _by_type(lc, "checkout.session.completed")]


def test_invoice_number_and_urls_appear_at_finalization():
    lifecycle = generate_lifecycles(customers=1, seed=2)[0]
    by_invoice = defaultdict(dict)
    for event in lifecycle.events:
        if event["type"].startswith("invoice."):
            by_invoice[event["data"]["object"]["id"]][event["type"]] = sp.read_invoice(event["data"]["object"])
    assert by_invoice
    for states in by_invoice.values():
        assert states["invoice.created"].status == "draft" and not states["invoice.created"].number
        finalized = states["invoice.finalized"]
        assert (
            finalized.status == "open" and finalized.number and finalized.hosted_invoice_url and finalized.invoice_pdf
        )
        assert states["invoice.paid"].number == finalized.number and states["invoice.paid"].paid_at


# --- Reading the built objects back ---------------------------------------------------------------


def test_read_subscription_takes_period_and_quantity_from_the_item():
    sub = o.subscription_object(
        id="sub_1",
        customer="cus_1",
        status="trialing",
        quantity=4,
        price="price_team",
        current_period_start=1767225600,
        current_period_end=1768435200,
        trial_start=1767225600,
        trial_end=1768435200,
        created=1767225600,
    )
    snapshot = sp.read_subscription(sub)
    assert "current_period_end" not in sub and "quantity" not in sub and "plan" not in sub
    assert (snapshot.quantity, snapshot.price_id, snapshot.customer.customer_id) == (4, "price_team", "cus_1")
    assert snapshot.current_period_end.timestamp() == 1768435200 == snapshot.trial_end.timestamp()


def test_read_invoice_takes_the_subscription_from_parent_and_the_period_from_the_subscription_line():
    lines = [
        o.invoice_line_object(
            id="il_p",
            invoice="in_1",
            amount=-700,
            quantity=2,
            period_start=1767500000,
            period_end=1769904000,
            subscription="sub_1",
            proration=True,
            invoice_item="ii_1",
        ),
        o.invoice_line_object(
            id="il_s",
            invoice="in_1",
            amount=6000,
            quantity=3,
            period_start=1769904000,
            period_end=1772323200,
            subscription="sub_1",
        ),
    ]
    invoice = o.invoice_object(
        id="in_1",
        customer="cus_1",
        status="paid",
        billing_reason="subscription_cycle",
        lines=lines,
        subscription="sub_1",
        number="X-1",
        created=1769904000,
        finalized_at=1769907600,
        paid_at=1769907700,
        customer_email="a@example.com",
    )
    snapshot = sp.read_invoice(invoice)
    assert "subscription" not in invoice and snapshot.subscription_id == "sub_1"
    assert (snapshot.total, snapshot.amount_paid, snapshot.amount_remaining) == (5300, 5300, 0)
    line = snapshot.subscription_line
    assert (line.stripe_id, line.quantity, line.period_start.timestamp()) == ("il_s", 3, 1769904000)
    assert [item.proration for item in snapshot.lines] == [True, False]
    assert snapshot.paid_at.timestamp() == 1769907700 and snapshot.customer_email == "a@example.com"


def test_read_invoice_payment_and_refund_tie_a_refund_to_its_payment_intent():
    payment = sp.read_invoice_payment(
        o.invoice_payment_object(id="inpay_1", invoice="in_9", payment_intent="pi_9", amount_paid=100, created=1)
    )
    refund = sp.read_refund(o.refund_object(id="re_1", charge="ch_9", payment_intent="pi_9", amount=40, created=2))
    assert (payment.invoice_id, payment.payment_intent_id, payment.status) == ("in_9", "pi_9", "paid")
    assert (refund.payment_intent_id, refund.charge_id, refund.amount) == ("pi_9", "ch_9", 40)


# --- Arranging and signing ---------------------------------------------------------------------------


def _streams(seed=9, customers=5):
    return [lc.events for lc in generate_lifecycles(customers=customers, seed=seed)]


def test_arrange_in_order_merges_lifecycles_by_time_and_keeps_each_ones_order():
    streams = _streams()
    arranged = arrange(streams, rng=random.Random(1), shuffle=False, duplicates=0)
    assert sorted(e["id"] for e in arranged) == sorted(e["id"] for s in streams for e in s)
    assert [e["created"] for e in arranged] == sorted(e["created"] for e in arranged)
    position = {e["id"]: i for i, e in enumerate(arranged)}
    for stream in streams:
        assert [position[e["id"]] for e in stream] == sorted(position[e["id"]] for e in stream)


def test_arrange_shuffles_yet_keeps_every_event():
    streams = _streams()
    in_order = arrange(streams, rng=random.Random(1), shuffle=False, duplicates=0)
    shuffled = arrange(streams, rng=random.Random(1), shuffle=True, duplicates=0)
    assert Counter(e["id"] for e in shuffled) == Counter(e["id"] for e in in_order)
    assert [e["id"] for e in shuffled] != [e["id"] for e in in_order]


@pytest.mark.parametrize("shuffle", [False, True])
def test_arrange_adds_duplicate_deliveries_with_the_given_probability(shuffle):
    streams = _streams(customers=10)
    total = sum(len(s) for s in streams)
    arranged = arrange(streams, rng=random.Random(2), shuffle=shuffle, duplicates=0.3)
    counts = Counter(e["id"] for e in arranged)
    assert set(counts) == {e["id"] for s in streams for e in s} and max(counts.values()) == 2
    assert 0.2 * total < len(arranged) - total < 0.4 * total
    everything = arrange(streams, rng=random.Random(2), shuffle=shuffle, duplicates=1.0)
    assert set(Counter(e["id"] for e in everything).values()) == {2}


def test_arrange_puts_a_duplicate_after_its_original_when_in_order():
    arranged = arrange(_streams(), rng=random.Random(3), shuffle=False, duplicates=0.5)
    firsts = list(dict.fromkeys(e["id"] for e in arranged))
    merged = [e["id"] for e in arrange(_streams(), rng=random.Random(3), shuffle=False, duplicates=0)]
    assert firsts == merged


def test_sign_makes_a_header_that_stripe_python_verifies():
    body = json.dumps(generate_lifecycles(customers=1, seed=1)[0].events[0]).encode()
    header = sign(body, SECRET)
    assert stripe.WebhookSignature.verify_header(body, header, SECRET, tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body, header, "whsec_other", tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body + b" ", header, SECRET, tolerance=300)
    old = sign(body, SECRET, timestamp=1000)
    assert old.startswith("t=1000,v1=")
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.WebhookSignature.verify_header(body, old, SECRET, tolerance=300)


# --- Delivering ------------------------------------------------------------------------------------------


@pytest.fixture
def webhook_server():
    """A local endpoint: ``answer(event_id, times_seen_before)`` picks the status; bad signatures get 400."""
    servers = []

    def serve(answer):
        received, lock = [], threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client hopes for

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    stripe.WebhookSignature.verify_header(body, self.headers["Stripe-Signature"], SECRET, tolerance=300)
                    event_id = json.loads(body)["id"]
                    with lock:
                        seen = sum(1 for r in received if r == event_id)
                        received.append(event_id)
                    status = answer(event_id, seen)
                except stripe.SignatureVerificationError:
                    status = 400
                assert self.headers["Content-Type"] == "application/json"
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/billing/stripe/webhook/", received

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_deliver_retries_each_500_after_the_rest_of_the_round_until_it_gets_200(webhook_server):
    url, received = webhook_server(lambda event_id, seen: 500 if seen == 0 else 200)
    events = [e for lc in generate_lifecycles(customers=2, seed=4) for e in lc.events]
    results = []
    report = deliver(
        url, events, secret=SECRET, max_rounds=3, on_result=lambda e, s, r: results.append((e["id"], s, r))
    )
    ids = [e["id"] for e in events]
    assert received == ids + ids  # every first delivery, then every retry, in the same order
    assert (report.sent, report.succeeded, report.retried, report.rounds) == (2 * len(ids), len(ids), len(ids), 2)
    assert report.non_2xx == Counter({500: len(ids)}) and report.gave_up == [] and report.ok
    assert results == [(i, 500, 1) for i in ids] + [(i, 200, 2) for i in ids]


def test_deliver_gives_up_after_max_rounds_and_names_the_events(webhook_server):
    events = generate_lifecycles(customers=1, seed=4)[0].events[:5]
    stubborn = events[1]["id"]
    url, received = webhook_server(lambda event_id, seen: 503 if event_id == stubborn else 204)
    report = deliver(url, events, secret=SECRET, max_rounds=4)
    assert report.gave_up == [stubborn] and not report.ok
    assert received.count(stubborn) == 4 and report.non_2xx == Counter({503: 4})
    assert (report.succeeded, report.retried, report.rounds) == (4, 3, 4)


def test_deliver_raises_when_nothing_listens():
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_port
    probe.server_close()  # the port is now (very likely) closed
    with pytest.raises(DeliveryError, match="no answer"):
        deliver(
            f"http://127.0.0.1:{port}/", generate_lifecycles(customers=1, seed=1)[0].events, secret=SECRET, timeout=2
        )


# --- The command ---------------------------------------------------------------------------------------------


def test_command_dry_run_lists_every_delivery_and_writes_them_as_json_lines(tmp_path, capsys):
    output = tmp_path / "events.jsonl"
    call_command("simulate_stripe_events", customers=3, seed=6, duplicates=0.5, dry_run=True, output=str(output))
    written = [json.loads(line) for line in output.read_text().splitlines()]
    printed = capsys.readouterr().out
    unique = {e["id"] for lc in generate_lifecycles(customers=3, seed=6) for e in lc.events}
    assert {e["id"] for e in written} == unique and len(written) > len(unique)
    assert all(f"{e['created']} {e['id']} {e['type']}" in printed for e in written)


def test_command_without_start_ends_each_lifecycle_in_the_hour_before_now(tmp_path, capsys):
    output = tmp_path / "events.jsonl"
    before = time.time()
    call_command("simulate_stripe_events", customers=5, seed=1, dry_run=True, output=str(output))
    after = time.time()
    written = [json.loads(line) for line in output.read_text().splitlines()]
    # Ids do not depend on the dates: they tell whose lifecycle each event belongs to.
    customer_of = {e["id"]: lc.customer_id for lc in generate_lifecycles(customers=5, seed=1) for e in lc.events}
    last_of = defaultdict(int)
    for event in written:
        customer = customer_of[event["id"]]
        last_of[customer] = max(last_of[customer], event["created"])
    assert len(last_of) == 5
    assert all(before - 3600 - 1 <= last <= after for last in last_of.values()), (before, last_of)
    latest = datetime.fromtimestamp(max(last_of.values()), tz=UTC)
    assert f"to {latest:%Y-%m-%d %H:%M} UTC" in capsys.readouterr().out


@pytest.mark.parametrize("start", ["2026-01-15", "2026-01-15T00:00:00+00:00", "1768435200"])
def test_command_start_pins_the_dates_given_as_an_iso_date_or_unix_seconds(tmp_path, start):
    output = tmp_path / "events.jsonl"
    call_command("simulate_stripe_events", "--start", start, customers=3, seed=6, dry_run=True, output=str(output))
    written = [json.loads(line) for line in output.read_text().splitlines()]
    pinned = generate_lifecycles(customers=3, seed=6, start=1768435200)  # 2026-01-15 00:00 UTC
    assert sorted(written, key=lambda e: e["id"]) == sorted(
        (e for lc in pinned for e in lc.events), key=lambda e: e["id"]
    )


def test_command_refuses_a_start_that_is_no_date():
    with pytest.raises(CommandError, match="expected Unix seconds or an ISO date"):
        call_command("simulate_stripe_events", "--start", "yesterday", dry_run=True)


def test_command_posts_every_event_signed_and_retries_failures(webhook_server, capsys):
    url, received = webhook_server(
        lambda event_id, seen: 500 if seen == 0 and event_id.endswith(("a", "b", "c")) else 200
    )
    call_command(
        "simulate_stripe_events",
        url=url,
        secret=SECRET,
        customers=3,
        seed=6,
        shuffle=True,
        client_reference_ids=["1", "2", "3"],
    )
    unique = {
        e["id"]
        for lc in generate_lifecycles(customers=3, seed=6, client_reference_ids=["1", "2", "3"])
        for e in lc.events
    }
    retried = {i for i in unique if i.endswith(("a", "b", "c"))}
    assert retried  # the seed gives some, so the retry path ran
    assert Counter(received) == Counter({i: 2 if i in retried else 1 for i in unique})
    assert f"All {len(unique)} deliveries answered 2xx" in capsys.readouterr().out


def test_command_says_clearly_when_the_server_is_unreachable():
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_port
    probe.server_close()
    with pytest.raises(CommandError, match=f"Could not reach the webhook: no answer from http://127.0.0.1:{port}/"):
        call_command("simulate_stripe_events", url=f"http://127.0.0.1:{port}/", secret=SECRET, customers=1, timeout=2)


def test_command_fails_when_deliveries_never_succeed(webhook_server):
    url, _ = webhook_server(lambda event_id, seen: 500)
    with pytest.raises(CommandError, match="never got a 2xx in 2 rounds"):
        call_command("simulate_stripe_events", url=url, secret=SECRET, customers=1, max_rounds=2)

"""Customer lifecycles: the events Stripe sends over months of a subscription, and what they imply.

Each lifecycle is one customer's story in one of five scenarios (``SCENARIOS``), told as the
events Stripe would post, in the order and with the ``created`` times it would give them,
together with ``Expected``: the facts the app must end up with whatever the delivery order.

Event sets follow Stripe's own descriptions:

* subscription lifecycle and renewals: https://docs.stripe.com/billing/subscriptions/webhooks
* an automatically collected invoice stays a draft for about an hour after ``invoice.created``:
  https://docs.stripe.com/billing/subscriptions/webhooks#successful-payments
* trials (a $0 ``subscription_create`` invoice, ``trial_will_end`` three days before the end):
  https://docs.stripe.com/billing/subscriptions/trials
* monthly periods follow the calendar from the billing cycle anchor (a 31st bills on the last
  day of shorter months): https://docs.stripe.com/billing/subscriptions/billing-cycle
* prorations of a mid-period change are pending invoice items billed on the next invoice:
  https://docs.stripe.com/billing/subscriptions/prorations
* failed renewals make the subscription ``past_due`` until a retry succeeds:
  https://docs.stripe.com/billing/revenue-recovery/smart-retries
"""

from __future__ import annotations

import copy
import functools
import random
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from .clock import DAY, add_months, default_start, told_to_end_at
from .objects import (
    charge_object,
    checkout_session_object,
    customer_object,
    event_object,
    invoice_line_object,
    invoice_object,
    invoice_payment_object,
    new_id,
    refund_object,
    setup_intent_object,
    subscription_object,
)

TRIAL_CANCEL = "trial_then_cancel_at_period_end"
NO_TRIAL = "no_trial_renewals"
PAYMENT_FAILED = "renewal_payment_fails_then_paid"
SEAT_CHANGE = "seat_change_with_proration"
ONE_OFF_REFUND = "one_off_invoice_partly_refunded"
SCENARIOS = (TRIAL_CANCEL, NO_TRIAL, PAYMENT_FAILED, SEAT_CHANGE, ONE_OFF_REFUND)

TRIAL_DAYS = 14
TRIAL_REMINDER_BEFORE = 3 * DAY  # Stripe sends trial_will_end three days before trial_end.
DRAFT_HOURS = 3600  # automatically collected drafts are finalized about an hour later
PRICE = "price_standard"
UNIT_AMOUNT = 2000
CURRENCY = "usd"

_FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Donald", "Frances", "Guido")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Knuth", "Allen")


@dataclass(frozen=True)
class PaidPeriod:
    """A service period paid by one invoice (its subscription line's period).

    ``quantity`` is the seats of the period once it is over: the billed quantity, or the new
    one if the seats changed during the period (a seat change changes the seats of the current
    entitlement, DESIGN.md). ``billed_quantity`` is the quantity on the invoice's line.
    """

    invoice_id: str
    start: int
    end: int
    quantity: int
    billed_quantity: int | None = None


@dataclass
class Expected:
    """What a lifecycle implies, whatever order its events arrive in."""

    subscription_id: str | None = None
    trial: tuple[int, int] | None = None
    paid_periods: list[PaidPeriod] = field(default_factory=list)
    receipt_invoice_ids: set[str] = field(default_factory=set)
    final_status: str | None = None
    final_quantity: int | None = None
    refunded: dict[str, int] = field(default_factory=dict)
    client_reference_id: str | None = None


@dataclass
class Lifecycle:
    customer_id: str
    scenario: str
    events: list[dict]
    expected: Expected
    customer_email: str = ""
    customer_name: str = ""


def generate_lifecycles(
    *,
    customers: int,
    seed: int,
    start: int | None = None,
    end: int | None = None,
    client_reference_ids: list[str] | None = None,
) -> list[Lifecycle]:
    """``customers`` lifecycles, the same for the same arguments.

    Scenarios are dealt in shuffled rounds of all five, so any ``customers >= 5`` has each at
    least once. Customer ``i`` owns its own random stream: adding customers does not change the
    first ones. With ``client_reference_ids``, subscription lifecycles end their sign-up with
    ``checkout.session.completed`` naming ``client_reference_ids[i]`` (None past the list's
    end); without it they have no checkout at all, like subscriptions made through the API.

    Dates: with ``start``, each lifecycle begins within two days after it; with ``end``, each
    one's last event falls in the hour before ``end``, so the subscriptions still running are in
    their current period then (the command passes now); with neither, ``default_start(seed)``.
    Only the dates depend on ``start`` and ``end``: ids, amounts and the order of events do not.
    """
    if start is not None and end is not None:
        raise ValueError("give start or end, not both")
    if start is None and end is None:
        start = default_start(seed)
    dealer = random.Random(f"scenarios:{seed}")
    kinds: list[str] = []
    while len(kinds) < customers:
        round_ = list(SCENARIOS)
        dealer.shuffle(round_)
        kinds.extend(round_)
    lifecycles = []
    for index, kind in enumerate(kinds[:customers]):
        checkout = client_reference_ids is not None
        reference = client_reference_ids[index] if checkout and index < len(client_reference_ids) else None
        tell = functools.partial(_tell, kind, seed=seed, index=index, checkout=checkout, reference=reference)
        if start is not None:
            story = tell(start)
        else:
            story = told_to_end_at(tell, end - random.Random(f"end:{seed}:{index}").randrange(3600))
        lifecycles.append(Lifecycle(story.customer_id, kind, story.events, story.expected, story.email, story.name))
    return lifecycles


def _tell(kind: str, begin: int, *, seed: int, index: int, checkout: bool, reference: str | None) -> _Story:
    """Customer ``index``'s story from about ``begin``, from its own random stream."""
    rng = random.Random(f"customer:{seed}:{index}")
    story = _Story(rng, index=index, begin=begin + rng.randrange(2 * DAY), checkout=checkout, reference=reference)
    _SCRIPTS[kind](story)
    return story


class _Story:
    """One customer's events as they happen: a clock, the live objects, and the expectations."""

    def __init__(self, rng: random.Random, *, index: int, begin: int, checkout: bool, reference: str | None):
        self.rng = rng
        self.last = begin - 1
        self.events: list[dict] = []
        self.expected = Expected()
        self.checkout = checkout
        self.reference = reference
        self.customer_id = new_id("cus", rng, 14)
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        self.name = f"{first} {last}"
        self.email = f"{first}.{last}{index}@example.com".lower()
        self.invoice_prefix = "".join(rng.choices("0123456789ABCDEF", k=8))
        self.invoice_count = 0
        self.payment_method = new_id("pm", rng)
        self.sub: dict | None = None  # arguments of subscription_object, as it is now
        self.pending_lines: list[dict] = []  # prorations waiting for the next invoice

    # --- clock and events -------------------------------------------------------------------

    def tick(self, at: int | None = None) -> int:
        """The next event's time: ``at`` (or one second on), always at least 1 s after the last."""
        self.last = max(self.last + 1, at if at is not None else self.last + 1)
        return self.last

    def emit(self, type: str, obj: dict, created: int, *, previous: dict | None = None, api_call: bool = False):
        """Record an event; ``api_call`` events carry the request that caused them."""
        request_id = idempotency_key = None
        if api_call:
            request_id = new_id("req", self.rng, 14)
            idempotency_key = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.events.append(
            event_object(
                type=type,
                obj=copy.deepcopy(obj),  # each event its own snapshot: no object shared between events
                created=created,
                id=new_id("evt", self.rng),
                previous_attributes=previous,
                request_id=request_id,
                idempotency_key=idempotency_key,
            )
        )

    # --- customer and subscription ------------------------------------------------------------

    def create_customer(self):
        t = self.tick()
        obj = customer_object(
            id=self.customer_id, created=t, email=self.email, name=self.name, invoice_prefix=self.invoice_prefix
        )
        self.emit("customer.created", obj, t, api_call=True)

    def save_card(self):
        t = self.tick(self.last + self.rng.randint(20, 90))
        obj = setup_intent_object(
            id=new_id("seti", self.rng), customer=self.customer_id, payment_method=self.payment_method, created=t
        )
        self.emit("setup_intent.succeeded", obj, t)

    def subscription(self) -> dict:
        return subscription_object(**self.sub)

    def create_subscription(self, *, quantity: int, trial: bool) -> int:
        t = self.tick(self.last + self.rng.randint(5, 30))
        self.sub = dict(
            id=new_id("sub", self.rng),
            customer=self.customer_id,
            quantity=quantity,
            price=PRICE,
            unit_amount=UNIT_AMOUNT,
            currency=CURRENCY,
            created=t,
            default_payment_method=self.payment_method,
        )
        if trial:
            trial_end = t + TRIAL_DAYS * DAY
            self.sub.update(
                status="trialing",
                trial_start=t,
                trial_end=trial_end,
                current_period_start=t,
                current_period_end=trial_end,
            )
            self.expected.trial = (t, trial_end)
        else:
            # Not active until its first invoice is paid (https://docs.stripe.com/billing/subscriptions/overview).
            self.sub.update(status="incomplete", current_period_start=t, current_period_end=add_months(t, 1))
        self.expected.subscription_id = self.sub["id"]
        self.emit("customer.subscription.created", self.subscription(), t, api_call=True)
        return t

    def update_subscription(self, at: int | None = None, *, api_call: bool = False, **changes) -> int:
        """Apply ``changes`` and send ``customer.subscription.updated`` with the old values."""
        before = self.subscription()
        self.sub.update(changes)
        after = self.subscription()
        previous = {key: before[key] for key in after if before[key] != after[key]}
        t = self.tick(at)
        self.emit("customer.subscription.updated", after, t, previous=previous, api_call=api_call)
        return t

    def complete_checkout(self, amount_total: int):
        if not self.checkout:
            return
        t = self.tick(self.last + self.rng.randint(1, 5))
        obj = checkout_session_object(
            id=new_id("cs_test", self.rng, 58),
            customer=self.customer_id,
            subscription=self.sub["id"],
            client_reference_id=self.reference,
            created=self.sub["created"] - self.rng.randint(60, 600),
            customer_email=self.email,
            customer_name=self.name,
            amount_total=amount_total,
            payment_status="paid" if amount_total else "no_payment_required",
        )
        self.expected.client_reference_id = self.reference
        self.emit("checkout.session.completed", obj, t)

    # --- invoices --------------------------------------------------------------------------------

    def subscription_line(self, invoice_id: str, start: int, end: int, *, trial: bool = False) -> dict:
        quantity = self.sub["quantity"]
        return invoice_line_object(
            id=new_id("il", self.rng),
            invoice=invoice_id,
            amount=0 if trial else UNIT_AMOUNT * quantity,
            currency=CURRENCY,
            quantity=quantity,
            period_start=start,
            period_end=end,
            subscription=self.sub["id"],
            price=PRICE,
            description=f"{'Trial period for' if trial else f'{quantity} ×'} Standard",
        )

    def create_invoice(self, *, at: int, billing_reason: str, lines, invoice_period=None, api_call=False) -> dict:
        """``invoice.created``: a draft. ``lines`` is called with the new invoice's id."""
        invoice_id = new_id("in", self.rng)
        t = self.tick(at)
        invoice = dict(
            id=invoice_id,
            customer=self.customer_id,
            status="draft",
            billing_reason=billing_reason,
            lines=lines(invoice_id),
            currency=CURRENCY,
            subscription=self.sub["id"] if self.sub else None,
            created=t,
            customer_email=self.email,
            customer_name=self.name,
        )
        if invoice_period:
            invoice.update(period_start=invoice_period[0], period_end=invoice_period[1])
        if self.sub:
            self.sub["latest_invoice"] = invoice_id
        self.emit("invoice.created", invoice_object(**invoice), t, api_call=api_call)
        return invoice

    def settle_invoice(self, invoice: dict, *, finalize_after: int, fail_first: bool = False, api_call=False):
        """Finalize, (fail once,) pay. Returns (payment_intent id, charge id, charge time), or None for $0."""
        self.invoice_count += 1
        t = self.tick(invoice["created"] + finalize_after)
        invoice.update(status="open", number=f"{self.invoice_prefix}-{self.invoice_count:04d}", finalized_at=t)
        self.emit("invoice.finalized", invoice_object(**invoice), t, api_call=api_call)
        total = sum(line["amount"] for line in invoice["lines"])
        if total <= 0:
            t = self.tick()
            invoice.update(status="paid", paid_at=t)
            self.emit("invoice.paid", invoice_object(**invoice), t)
            self.emit("invoice.payment_succeeded", invoice_object(**invoice), self.tick())
            return None
        retry_at = None
        if fail_first:
            t = self.tick(self.last + self.rng.randint(2, 30))
            invoice.update(attempt_count=1)
            self.emit("invoice.payment_failed", invoice_object(**invoice), t)
            self.update_subscription(status="past_due")
            retry_at = t + self.rng.randint(1, 3) * DAY + self.rng.randrange(3600)
        payment_intent, charge = new_id("pi", self.rng), new_id("ch", self.rng)
        t = charged_at = self.tick(retry_at if retry_at else self.last + self.rng.randint(2, 30))
        self.emit(
            "charge.succeeded",
            charge_object(
                id=charge,
                customer=self.customer_id,
                payment_intent=payment_intent,
                amount=total,
                currency=CURRENCY,
                created=t,
                payment_method=self.payment_method,
            ),
            t,
        )
        t = self.tick()
        self.emit(
            "invoice_payment.paid",
            invoice_payment_object(
                id=new_id("inpay", self.rng),
                invoice=invoice["id"],
                payment_intent=payment_intent,
                amount_paid=total,
                currency=CURRENCY,
                created=t,
            ),
            t,
        )
        t = self.tick()
        invoice.update(status="paid", paid_at=t, attempt_count=invoice.get("attempt_count", 0) + 1)
        self.emit("invoice.paid", invoice_object(**invoice), t)
        self.emit("invoice.payment_succeeded", invoice_object(**invoice), self.tick())
        self.expected.receipt_invoice_ids.add(invoice["id"])
        if fail_first:
            self.update_subscription(status="active")
        return payment_intent, charge, charged_at

    # --- periods -------------------------------------------------------------------------------------

    def renew(self, anchor: int, k: int, *, fail_first: bool = False):
        """Roll into period ``k`` after ``anchor``: invoice (with pending prorations), new period, payment."""
        start, end = add_months(anchor, k), add_months(anchor, k + 1)
        previous_start = self.sub["current_period_start"]
        pending, self.pending_lines = self.pending_lines, []

        def lines(invoice_id):
            return [dict(line, invoice=invoice_id) for line in pending] + [
                self.subscription_line(invoice_id, start, end)
            ]

        invoice = self.create_invoice(
            at=start, billing_reason="subscription_cycle", lines=lines, invoice_period=(previous_start, start)
        )
        self.update_subscription(status="active", current_period_start=start, current_period_end=end)
        self.settle_invoice(invoice, finalize_after=DRAFT_HOURS, fail_first=fail_first)
        quantity = self.sub["quantity"]
        self.expected.paid_periods.append(PaidPeriod(invoice["id"], start, end, quantity, quantity))

    def change_seats(self, quantity: int):
        """A seat change mid-period: prorations now (billed next cycle), new quantity on the item."""
        start, end = self.sub["current_period_start"], self.sub["current_period_end"]
        t = max(self.last + 1, start + self.rng.randint(5, 20) * DAY + self.rng.randrange(DAY))
        old = self.sub["quantity"]
        remaining = (end - t) / (end - start)
        for seats, sign, words in ((old, -1, "Unused time on"), (quantity, 1, "Remaining time on")):
            self.pending_lines.append(
                invoice_line_object(
                    id=new_id("il", self.rng),
                    invoice="",
                    amount=sign * round(UNIT_AMOUNT * seats * remaining),
                    currency=CURRENCY,
                    quantity=seats,
                    period_start=t,
                    period_end=end,
                    subscription=self.sub["id"],
                    price=PRICE,
                    proration=True,
                    invoice_item=new_id("ii", self.rng),
                    description=f"{words} {seats} × Standard after {datetime.fromtimestamp(t, tz=UTC):%d %b %Y}",
                )
            )
        self.update_subscription(t, api_call=True, quantity=quantity)
        paid = self.expected.paid_periods
        if paid and paid[-1].start <= t < paid[-1].end:
            paid[-1] = replace(paid[-1], quantity=quantity)

    def finish(self):
        self.expected.final_status = self.sub["status"]
        self.expected.final_quantity = self.sub["quantity"]


# --- Scenarios ------------------------------------------------------------------------------------


def _sign_up(story: _Story, *, trial: bool, quantity: int) -> int:
    """Customer, card, subscription, its first invoice, checkout. Returns the billing cycle anchor."""
    story.create_customer()
    if trial:
        story.save_card()
    created = story.create_subscription(quantity=quantity, trial=trial)
    sub = story.sub
    first_end = sub["current_period_end"]
    invoice = story.create_invoice(
        at=created,
        billing_reason="subscription_create",
        lines=lambda invoice_id: [story.subscription_line(invoice_id, created, first_end, trial=trial)],
    )
    story.settle_invoice(invoice, finalize_after=1)
    if not trial:
        story.expected.paid_periods.append(PaidPeriod(invoice["id"], created, first_end, quantity, quantity))
        story.update_subscription(status="active")
    story.complete_checkout(sum(line["amount"] for line in invoice["lines"]))
    if trial:
        reminder = story.tick(sub["trial_end"] - TRIAL_REMINDER_BEFORE)
        story.emit("customer.subscription.trial_will_end", story.subscription(), reminder)
        return sub["trial_end"]
    return created


def _trial_then_cancel(story: _Story):
    anchor = _sign_up(story, trial=True, quantity=story.rng.randint(1, 5))
    renewals = story.rng.randint(1, 3)
    for k in range(renewals + 1):  # k == 0: the trial converts at trial_end
        story.renew(anchor, k)
    end = story.sub["current_period_end"]
    asked = max(story.last + 1, story.sub["current_period_start"] + story.rng.randint(3, 20) * DAY)
    story.update_subscription(asked, api_call=True, cancel_at_period_end=True, cancel_at=end, canceled_at=asked)
    story.sub.update(status="canceled", ended_at=end)
    story.emit("customer.subscription.deleted", story.subscription(), story.tick(end))
    story.finish()


def _no_trial(story: _Story):
    anchor = _sign_up(story, trial=False, quantity=story.rng.randint(1, 5))
    for k in range(1, story.rng.randint(1, 3) + 1):
        story.renew(anchor, k)
    story.finish()


def _payment_failed(story: _Story):
    trial = story.rng.random() < 0.5
    anchor = _sign_up(story, trial=trial, quantity=story.rng.randint(1, 5))
    first, last = (0 if trial else 1), story.rng.randint(1, 3)
    failing = story.rng.randint(first, last)
    for k in range(first, last + 1):
        story.renew(anchor, k, fail_first=k == failing)
    story.finish()


def _seat_change(story: _Story):
    trial = story.rng.random() < 0.5
    anchor = _sign_up(story, trial=trial, quantity=story.rng.randint(1, 4))
    first, last = (0 if trial else 1), story.rng.randint(1, 3)
    # The change happens in a paid period (0 .. last - 1) so that a next cycle bills its prorations.
    changed_in = story.rng.randint(0, last - 1)
    for k in range(first, last + 1):
        if k - 1 == changed_in:
            story.change_seats(story.sub["quantity"] + story.rng.randint(1, 3))
        story.renew(anchor, k)
    story.finish()


def _one_off_refund(story: _Story):
    story.create_customer()
    amount = story.rng.randint(5, 50) * 1000

    def lines(invoice_id):
        return [
            invoice_line_object(
                id=new_id("il", story.rng),
                invoice=invoice_id,
                amount=amount,
                currency=CURRENCY,
                period_start=story.last,
                period_end=story.last,
                description="Onboarding workshop",
            )
        ]

    invoice = story.create_invoice(
        at=story.last + story.rng.randint(60, 3600), billing_reason="manual", lines=lines, api_call=True
    )
    payment_intent, charge, charged_at = story.settle_invoice(
        invoice, finalize_after=story.rng.randint(60, 900), api_call=True
    )
    refund = story.rng.randint(1, amount // 100 - 1) * 100
    t = story.tick(story.last + story.rng.randint(1, 10) * DAY)
    story.emit(
        "charge.refunded",
        charge_object(
            id=charge,
            customer=story.customer_id,
            payment_intent=payment_intent,
            amount=amount,
            amount_refunded=refund,
            currency=CURRENCY,
            created=charged_at,
            payment_method=story.payment_method,
        ),
        t,
        previous={"amount_refunded": 0},
    )
    refund_obj = refund_object(
        id=new_id("re", story.rng),
        charge=charge,
        payment_intent=payment_intent,
        amount=refund,
        currency=CURRENCY,
        created=t,
    )
    story.emit("refund.created", refund_obj, story.tick(), api_call=True)
    story.expected.refunded[invoice["id"]] = refund


_SCRIPTS = {
    TRIAL_CANCEL: _trial_then_cancel,
    NO_TRIAL: _no_trial,
    PAYMENT_FAILED: _payment_failed,
    SEAT_CHANGE: _seat_change,
    ONE_OFF_REFUND: _one_off_refund,
}

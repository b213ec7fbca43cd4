"""Order-independent: a subscription's story ends in the same rows whatever order Stripe delivers it in.

Stripe delivers at least once and in any order (https://docs.stripe.com/webhooks#event-ordering).
The property tests deliver a trial-to-active-to-canceled story in a hypothesis-chosen order,
with duplicates, retrying every non-2xx afterwards as Stripe does, and compare the resulting
rows with those of in-order delivery. The unit tests below pin the ordering rule itself: an
older snapshot never overwrites a newer one; on a tie the later delivery wins, except that a
canceled subscription stays canceled; and ``checkout.session.completed`` links or merges
accounts so that a customer always has exactly one.

Deliveries are real signed POSTs to the webhook (helpers shared with ``billing/tests``).
"""

from __future__ import annotations

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from billing.models import Invoice, OwedEmail, Renewal, StripeEvent, Subscription
from billing.simulation.objects import checkout_session_object, event_object, invoice_line_object, invoice_object
from billing.tests.conftest import (
    DAY,
    SECRET,
    T0,
    TOLERANCE,
    as_datetime,
    deliver,
    subscription_event,
    trial_subscription,
)
from provisioning.models import Account, Entitlement
from provisioning.tests.factories import AccountFactory

pytestmark = pytest.mark.django_db

SUB, CUSTOMER = "sub_story", "cus_story"
TRIAL_END = T0 + 14 * DAY
PERIOD_END = TRIAL_END + 30 * DAY
MAX_RETRY_ROUNDS = 5


@pytest.fixture
def post(client, settings):
    settings.STRIPE_WEBHOOK_SECRETS = [SECRET]
    settings.STRIPE_WEBHOOK_TOLERANCE = TOLERANCE

    def post(payload):
        return deliver(client, payload)

    return post


# --- The story ---------------------------------------------------------------------------------


def subscription_story() -> list[dict]:
    """The subscription events of a trial that becomes paid, gains seats and is canceled, in order."""
    trialing = trial_subscription(SUB, CUSTOMER, start=T0, days=14)
    active = {**trialing, "status": "active", "current_period_start": TRIAL_END, "current_period_end": PERIOD_END}
    more_seats = {**active, "quantity": 3}
    canceling = {
        **more_seats,
        "cancel_at_period_end": True,
        "cancel_at": PERIOD_END,
        "canceled_at": TRIAL_END + 10 * DAY,
    }
    ended = {**canceling, "status": "canceled", "ended_at": PERIOD_END}
    return [
        subscription_event("customer.subscription.created", trialing, created=T0, event_id="evt_s1_created"),
        subscription_event(
            "customer.subscription.trial_will_end", trialing, created=TRIAL_END - 3 * DAY, event_id="evt_s2_trial_ends"
        ),
        subscription_event("customer.subscription.updated", active, created=TRIAL_END, event_id="evt_s3_active"),
        subscription_event(
            "customer.subscription.updated", more_seats, created=TRIAL_END + 5 * DAY, event_id="evt_s4_seats"
        ),
        subscription_event(
            "customer.subscription.updated", canceling, created=TRIAL_END + 10 * DAY, event_id="evt_s5_cancel"
        ),
        subscription_event("customer.subscription.deleted", ended, created=PERIOD_END, event_id="evt_s6_deleted"),
    ]


def invoice_event(
    type: str,
    *,
    invoice_id: str,
    status: str,
    created: int,
    start: int,
    end: int,
    quantity: int,
    amount: int,
    billing_reason: str,
    number: str | None = None,
    paid_at: int | None = None,
) -> dict:
    line = invoice_line_object(
        id=f"il_{invoice_id}",
        invoice=invoice_id,
        amount=amount,
        quantity=quantity,
        period_start=start,
        period_end=end,
        subscription=SUB,
    )
    invoice = invoice_object(
        id=invoice_id,
        customer=CUSTOMER,
        status=status,
        billing_reason=billing_reason,
        lines=[line],
        subscription=SUB,
        number=number,
        created=start,
        finalized_at=None if status == "draft" else start + 60,
        paid_at=paid_at,
        customer_email="founder@story.example",
        attempt_count=1 if status == "paid" else 0,
    )
    return event_object(type=type, obj=invoice, created=created, id=f"evt_{type.split('.')[1]}_{invoice_id}")


def full_story(account_pk: int) -> list[dict]:
    """The same story with its invoices (the trial's $0 one and the first paid renewal) and the
    checkout that names the SaaS's own account ``account_pk``, in the order Stripe sends them."""
    subs = subscription_story()
    trial = dict(
        invoice_id="in_story_trial", start=T0, end=TRIAL_END, quantity=1, amount=0, billing_reason="subscription_create"
    )
    renewal = dict(
        invoice_id="in_story_renewal",
        start=TRIAL_END,
        end=PERIOD_END,
        quantity=1,
        amount=2000,
        billing_reason="subscription_cycle",
    )
    checkout = checkout_session_object(
        id="cs_test_story",
        customer=CUSTOMER,
        subscription=SUB,
        client_reference_id=str(account_pk),
        created=T0 - 300,
        customer_email="founder@story.example",
        amount_total=0,
        payment_status="no_payment_required",
    )
    return [
        subs[0],
        invoice_event("invoice.created", status="draft", created=T0 + 1, **trial),
        invoice_event("invoice.finalized", status="open", number="STORY-0001", created=T0 + 2, **trial),
        invoice_event("invoice.paid", status="paid", number="STORY-0001", paid_at=T0 + 3, created=T0 + 3, **trial),
        event_object(type="checkout.session.completed", obj=checkout, created=T0 + 4, id="evt_checkout_story"),
        subs[1],
        invoice_event("invoice.created", status="draft", created=TRIAL_END, **renewal),
        {**subs[2], "created": TRIAL_END + 1},
        invoice_event("invoice.finalized", status="open", number="STORY-0002", created=TRIAL_END + 3600, **renewal),
        invoice_event(
            "invoice.paid",
            status="paid",
            number="STORY-0002",
            paid_at=TRIAL_END + 3700,
            created=TRIAL_END + 3700,
            **renewal,
        ),
        *subs[3:],
    ]


# --- Delivering and comparing ------------------------------------------------------------------


def deliver_like_stripe(post, events: list[dict]) -> None:
    """Deliver ``events`` in the given order; every non-2xx is retried later, as Stripe does."""
    pending = events
    for _ in range(MAX_RETRY_ROUNDS):
        statuses = [(event, post(event).status_code) for event in pending]
        assert all(status in (200, 500) for _, status in statuses), [s for _, s in statuses]
        pending = [event for event, status in statuses if status != 200]
        if not pending:
            return
    errors = StripeEvent.objects.filter(pk__in=[e["id"] for e in pending]).values_list("id", "last_error")
    raise AssertionError(f"still failing after {MAX_RETRY_ROUNDS} rounds of retries: {list(errors)}")


def snapshot() -> dict:
    """The rows the story produced, without primary keys or bookkeeping timestamps."""
    return {
        "accounts": sorted(
            Account.objects.values_list("name", "stripe_customer_id", "billing_email", "default_payment_method_id")
        ),
        "subscriptions": sorted(
            Subscription.objects.values_list(
                "stripe_id",
                "account__stripe_customer_id",
                "status",
                "quantity",
                "price_id",
                "current_period_start",
                "current_period_end",
                "trial_start",
                "trial_end",
                "cancel_at_period_end",
                "cancel_at",
                "canceled_at",
                "ended_at",
                "stripe_created",
                "last_event_created",
                "last_event_id",
            )
        ),
        "entitlements": sorted(
            Entitlement.objects.values_list(
                "account__stripe_customer_id",
                "kind",
                "seats",
                "starts_at",
                "expires_at",
                "stripe_subscription_id",
                "stripe_invoice_id",
            )
        ),
        "renewals": sorted(
            (
                r.subscription.stripe_id,
                r.effective_date,
                r.stripe_invoice_id,
                r.processed_at is not None,
                (r.from_entitlement.kind, r.from_entitlement.starts_at) if r.from_entitlement else None,
                (r.to_entitlement.kind, r.to_entitlement.starts_at) if r.to_entitlement else None,
            )
            for r in Renewal.objects.select_related("subscription", "from_entitlement", "to_entitlement")
        ),
        "invoices": sorted(
            Invoice.objects.values_list(
                "stripe_id",
                "account__stripe_customer_id",
                "subscription__stripe_id",
                "number",
                "status",
                "total",
                "amount_paid",
                "period_start",
                "period_end",
                "line_quantity",
                "paid_at",
            )
        ),
        "owed_emails": sorted(OwedEmail.objects.values_list("key", "kind", "account__stripe_customer_id")),
        "events": sorted(StripeEvent.objects.values_list("id", "status")),
    }


def outcome_of(post, deliveries) -> dict:
    """Deliver what ``deliveries()`` returns into a clean database, snapshot, roll it all back.

    ``deliveries`` is called inside the transaction, so it may create rows first (the SaaS's
    own account that a checkout names).
    """
    with transaction.atomic():
        deliver_like_stripe(post, deliveries())
        state = snapshot()
        transaction.set_rollback(True)
    return state


_in_order_outcomes: dict[str, dict] = {}


def in_order_outcome(story: str, compute) -> dict:
    """The in-order snapshot of ``story``, computed by its first example and reused (it is the same)."""
    if story not in _in_order_outcomes:
        _in_order_outcomes[story] = compute()
    return _in_order_outcomes[story]


def with_duplicates(events: list[dict], order: list[int], duplicates: list[tuple[int, int]]) -> list[dict]:
    """``events`` in ``order``, with ``events[i]`` delivered again at position ``p`` for each (i, p)."""
    deliveries = [events[i] for i in order]
    for index, position in duplicates:
        deliveries.insert(position % (len(deliveries) + 1), events[index])
    return deliveries


# --- In-order delivery, spelled out ------------------------------------------------------------


def test_in_order_subscription_story_ends_in_the_expected_rows(post):
    """The reference the property compares with, checked against what the design says."""
    deliver_like_stripe(post, subscription_story())

    subscription = Subscription.objects.get()
    assert (subscription.status, subscription.quantity, subscription.cancel_at_period_end) == ("canceled", 3, True)
    assert (subscription.ended_at, subscription.last_event_id) == (as_datetime(PERIOD_END), "evt_s6_deleted")
    assert list(Account.objects.values_list("stripe_customer_id", flat=True)) == [CUSTOMER]
    assert list(Entitlement.objects.values_list("kind", "seats", "starts_at", "expires_at")) == [
        ("trial", 1, as_datetime(T0), as_datetime(TRIAL_END))
    ]
    assert list(Renewal.objects.values_list("effective_date", "stripe_invoice_id", "processed_at")) == [
        (as_datetime(TRIAL_END), None, None)
    ]
    assert list(OwedEmail.objects.values_list("kind", flat=True)) == [OwedEmail.Kind.TRIAL_WILL_END]
    assert set(StripeEvent.objects.values_list("status", flat=True)) == {"processed"}


def test_in_order_full_story_ends_in_the_expected_rows(post):
    account = AccountFactory(name="Story Ltd", stripe_customer_id=None)

    deliver_like_stripe(post, full_story(account.pk))

    assert list(Account.objects.values_list("pk", "name", "stripe_customer_id")) == [
        (account.pk, "Story Ltd", CUSTOMER)
    ]
    assert list(
        Entitlement.objects.order_by("starts_at").values_list("account", "kind", "seats", "starts_at", "expires_at")
    ) == [
        (account.pk, "trial", 1, as_datetime(T0), as_datetime(TRIAL_END)),
        (account.pk, "paid", 3, as_datetime(TRIAL_END), as_datetime(PERIOD_END)),  # seats follow the seat change
    ]
    renewal = Renewal.objects.get()  # the one planned at period end went with the cancellation
    assert (renewal.effective_date, renewal.stripe_invoice_id) == (as_datetime(TRIAL_END), "in_story_renewal")
    assert renewal.processed_at is not None
    assert (renewal.from_entitlement.kind, renewal.to_entitlement.kind) == ("trial", "paid")
    assert sorted(OwedEmail.objects.values_list("key", flat=True)) == [
        "receipt:in_story_renewal",
        f"trial_will_end:{SUB}:{TRIAL_END}",
    ]
    assert set(StripeEvent.objects.values_list("status", flat=True)) == {"processed"}


# --- Any order, with duplicates ---------------------------------------------------------------

SUBSCRIPTION_EVENTS = len(subscription_story())
FULL_STORY_EVENTS = len(full_story(0))


@pytest.mark.slow
@hypothesis_settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    order=st.permutations(range(SUBSCRIPTION_EVENTS)),
    duplicates=st.lists(st.tuples(st.integers(0, SUBSCRIPTION_EVENTS - 1), st.integers(0, 100)), max_size=4),
)
def test_subscription_events_in_any_order_end_like_in_order_delivery(post, order, duplicates):
    events = subscription_story()

    expected = in_order_outcome("subscription story", lambda: outcome_of(post, lambda: events))
    actual = outcome_of(post, lambda: with_duplicates(events, order, duplicates))

    assert actual == expected


@pytest.mark.slow
@hypothesis_settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    order=st.permutations(range(FULL_STORY_EVENTS)),
    duplicates=st.lists(st.tuples(st.integers(0, FULL_STORY_EVENTS - 1), st.integers(0, 100)), max_size=4),
)
def test_full_story_in_any_order_ends_like_in_order_delivery(post, order, duplicates):
    """With invoices (one arriving before its subscription fails and is retried) and the
    checkout that merges or links the account: still the in-order rows, one account."""

    def story_for_a_new_account():
        return full_story(AccountFactory(name="Story Ltd", stripe_customer_id=None).pk)

    expected = in_order_outcome("full story", lambda: outcome_of(post, story_for_a_new_account))
    actual = outcome_of(post, lambda: with_duplicates(story_for_a_new_account(), order, duplicates))
    assert actual == expected
    assert len(actual["accounts"]) == 1


# --- The ordering rule --------------------------------------------------------------------------


def updated(quantity: int, created: int, event_id: str, **changes) -> dict:
    sub = {**trial_subscription(SUB, CUSTOMER), "status": "active", "quantity": quantity, **changes}
    return subscription_event("customer.subscription.updated", sub, created=created, event_id=event_id)


def test_older_snapshot_never_overwrites_a_newer_one(post):
    newer = updated(5, T0 + 2 * DAY, "evt_newer")
    older = updated(2, T0 + 1 * DAY, "evt_older")
    post(newer)
    history_rows = Subscription.history.count()

    response = post(older)

    assert response.status_code == 200
    subscription = Subscription.objects.get()
    assert (subscription.quantity, subscription.last_event_id) == (5, "evt_newer")
    assert Subscription.history.count() == history_rows  # not even touched
    # Handled, and changed nothing: that is "processed", not a failure to retry.
    assert StripeEvent.objects.get(pk="evt_older").status == StripeEvent.Status.PROCESSED


def test_a_trial_granted_again_by_each_snapshot_that_moves_it_is_written_once(post):
    """``sync_subscription`` grants the trial's window again whenever a snapshot moves the trial
    or the end; a window that has its row keeps it as it is: no second row, no history row."""
    post(subscription_event("customer.subscription.created", trial_subscription(SUB, CUSTOMER), created=T0))
    trial = Entitlement.objects.get(kind=Entitlement.Kind.TRIAL)
    assert list(Entitlement.history.filter(id=trial.pk).values_list("history_type", flat=True)) == ["+"]

    # Each of these changes ``ended_at`` (cancel, then a later end), so each grants the trial again.
    for n, ended in enumerate((T0 + 20 * DAY, T0 + 25 * DAY), start=1):
        assert (
            post(updated(1, T0 + n * DAY, f"evt_trial_again_{n}", status="canceled", ended_at=ended)).status_code == 200
        )

    assert Subscription.objects.get().ended_at == as_datetime(T0 + 25 * DAY)
    assert list(Entitlement.objects.values_list("pk", "kind")) == [(trial.pk, Entitlement.Kind.TRIAL)]
    assert list(Entitlement.history.filter(id=trial.pk).values_list("history_type", flat=True)) == ["+"]


def test_deleted_subscription_is_not_revived_by_an_older_update(post):
    story = subscription_story()
    post(story[5])  # deleted (canceled), newest

    post(story[2])  # active, older

    subscription = Subscription.objects.get()
    assert (subscription.status, subscription.ended_at) == ("canceled", as_datetime(PERIOD_END))


@pytest.mark.parametrize("later_quantity", [2, 5])
def test_on_a_tie_the_later_delivery_wins(post, later_quantity):
    earlier_quantity = 7 - later_quantity
    post(updated(earlier_quantity, T0 + DAY, f"evt_tie_q{earlier_quantity}"))

    post(updated(later_quantity, T0 + DAY, f"evt_tie_q{later_quantity}"))

    subscription = Subscription.objects.get()
    assert (subscription.quantity, subscription.last_event_id) == (later_quantity, f"evt_tie_q{later_quantity}")


def test_on_a_tie_a_canceled_subscription_stays_canceled(post):
    tie = T0 + DAY
    canceled = subscription_event(
        "customer.subscription.deleted",
        {**trial_subscription(SUB, CUSTOMER), "status": "canceled", "canceled_at": tie, "ended_at": tie},
        created=tie,
        event_id="evt_tie_canceled",
    )
    post(canceled)

    post(updated(1, tie, "evt_tie_active"))

    subscription = Subscription.objects.get()
    assert (subscription.status, subscription.last_event_id) == ("canceled", "evt_tie_canceled")


def test_on_a_tie_a_later_cancellation_still_wins(post):
    tie = T0 + DAY
    post(updated(1, tie, "evt_tie_active"))

    post(
        subscription_event(
            "customer.subscription.deleted",
            {**trial_subscription(SUB, CUSTOMER), "status": "canceled", "canceled_at": tie, "ended_at": tie},
            created=tie,
            event_id="evt_tie_canceled",
        )
    )

    assert Subscription.objects.get().status == "canceled"


# --- Which account: checkout links or merges ---------------------------------------------------


def checkout_completed(account_pk: int) -> dict:
    session = checkout_session_object(
        id="cs_test_link",
        customer=CUSTOMER,
        subscription=SUB,
        client_reference_id=str(account_pk),
        created=T0 - 120,
        customer_email="founder@story.example",
        amount_total=0,
        payment_status="no_payment_required",
    )
    return event_object(type="checkout.session.completed", obj=session, created=T0 + 5, id="evt_checkout_link")


def test_checkout_after_the_subscription_merges_the_placeholder_account_into_the_named_one(post):
    named = AccountFactory(name="Named By The SaaS", stripe_customer_id=None)
    story = full_story(named.pk)
    for event in story[:4]:  # subscription and its trial invoice: a placeholder account is made
        assert post(event).status_code == 200
    placeholder = Account.objects.get(stripe_customer_id=CUSTOMER)
    assert placeholder.pk != named.pk

    response = post(checkout_completed(named.pk))

    assert response.status_code == 200
    assert list(Account.objects.values_list("pk", "stripe_customer_id")) == [(named.pk, CUSTOMER)]
    assert not Account.objects.filter(pk=placeholder.pk).exists()
    assert Subscription.objects.get().account_id == named.pk
    assert set(Invoice.objects.values_list("account", flat=True)) == {named.pk}
    assert set(Entitlement.objects.values_list("account", flat=True)) == {named.pk}
    assert Renewal.objects.get().subscription.account_id == named.pk
    # History records the move and the deletion, with the reason.
    deletion = Account.history.get(id=placeholder.pk, history_type="-")
    assert "merged" in deletion.history_change_reason
    assert "merged" in Subscription.history.latest("history_date").history_change_reason
    assert "merged" in Entitlement.history.latest("history_date").history_change_reason


def test_checkout_before_the_subscription_links_the_named_account_directly(post):
    named = AccountFactory(name="Named By The SaaS", stripe_customer_id=None)

    assert post(checkout_completed(named.pk)).status_code == 200
    named.refresh_from_db()
    assert named.stripe_customer_id == CUSTOMER
    for event in full_story(named.pk)[:4]:
        assert post(event).status_code == 200

    assert list(Account.objects.values_list("pk", flat=True)) == [named.pk]
    assert Subscription.objects.get().account_id == named.pk
    assert set(Entitlement.objects.values_list("account", flat=True)) == {named.pk}
    assert not Account.history.filter(history_type="-").exists()  # nothing to merge


def test_checkout_before_and_after_end_in_the_same_rows(post):
    def checkout_first():
        named = AccountFactory(name="Named By The SaaS", stripe_customer_id=None)
        return [checkout_completed(named.pk), *full_story(named.pk)[:4]]

    def checkout_last():
        named = AccountFactory(name="Named By The SaaS", stripe_customer_id=None)
        return [*full_story(named.pk)[:4], checkout_completed(named.pk)]

    assert outcome_of(post, checkout_first) == outcome_of(post, checkout_last)

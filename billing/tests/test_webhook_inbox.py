"""The inbox: every verified event stored once, applied once, all or nothing, and retryable.

Deliveries are real signed POSTs. Where a handler must fail, a test-only handler is put in the
registry for the duration of one test (``swap_handler``); it runs the real services first, so
the rollback it proves is the rollback of real writes.
"""

import re

import pytest

from billing.models import Invoice, OwedEmail, Renewal, StripeEvent, Subscription
from billing.services import invoices, subscriptions
from billing.webhook import inbox, registry
from provisioning.models import Account, Entitlement
from provisioning.tests.factories import UserFactory

from .conftest import (
    DAY,
    T0,
    active_subscription,
    first_invoice_paid_event,
    row_counts,
    subscription_event,
    trial_subscription,
)

pytestmark = pytest.mark.django_db

REAL_SUBSCRIPTION_HANDLER = "billing.webhook.handlers:on_subscription_changed"
REAL_TRIAL_WILL_END_HANDLER = "billing.webhook.handlers:on_trial_will_end"
FAILURE = "handler broke after its first write"

# What the failing handlers saw in the database just before raising (proves they did write).
rows_before_failure: list[dict] = []


def mirror_then_fail(event):
    """Test-only handler: the real subscription mirroring (subscription, account, entitlement,
    renewal), then an error, as if a later step of the handler had a bug."""
    subscriptions.mirror_subscription(event)
    rows_before_failure.append(_domain_rows())
    raise RuntimeError(FAILURE)


def owe_reminder_then_fail(event):
    """Test-only handler: the real trial_will_end handler (which owes an e-mail), then an error."""
    registry.resolve(REAL_TRIAL_WILL_END_HANDLER)(event)
    rows_before_failure.append(_domain_rows())
    raise RuntimeError(FAILURE)


def _domain_rows():
    return {
        "accounts": Account.objects.count(),
        "subscriptions": Subscription.objects.count(),
        "entitlements": Entitlement.objects.count(),
        "renewals": Renewal.objects.count(),
        "owed_emails": OwedEmail.objects.count(),
    }


NO_DOMAIN_ROWS = {"accounts": 0, "subscriptions": 0, "entitlements": 0, "renewals": 0, "owed_emails": 0}


@pytest.fixture
def swap_handler():
    """``swap_handler(event_type, dotted_path)``; the real registry is restored afterwards."""
    saved = registry.registered_types()
    rows_before_failure.clear()

    def swap(event_type, path):
        registry.unregister(event_type)
        registry.register(path, event_type)

    yield swap
    for event_type in registry.registered_types():
        registry.unregister(event_type)
    for event_type, path in saved.items():
        registry.register(path, event_type)
    assert registry.registered_types() == saved


def trial_created(event_id="evt_inbox_created"):
    return subscription_event(
        "customer.subscription.created", trial_subscription("sub_inbox", "cus_inbox"), created=T0, event_id=event_id
    )


def stored(event_id) -> StripeEvent:
    return StripeEvent.objects.get(pk=event_id)


# --- Storing ---------------------------------------------------------------------------------


def test_unknown_event_type_is_answered_200_and_stored_ignored(post_event):
    payload = {
        "id": "evt_unknown_type",
        "object": "event",
        "type": "customer.discount.created",
        "created": T0,
        "api_version": "2025-10-29.clover",
        "livemode": True,
        "data": {"object": {"id": "di_1", "object": "discount"}},
    }
    assert payload["type"] not in registry.registered_types()

    response = post_event(payload)

    assert response.status_code == 200
    assert response.json() == {"id": "evt_unknown_type", "status": "ignored"}
    event = stored("evt_unknown_type")
    assert event.status == StripeEvent.Status.IGNORED
    assert event.attempts == 0  # no handler ran
    assert event.payload == payload
    assert (event.type, event.api_version, event.livemode, event.object_id) == (
        "customer.discount.created",
        "2025-10-29.clover",
        True,
        "di_1",
    )
    assert int(event.created.timestamp()) == T0


def test_redelivered_unknown_event_stays_one_ignored_row(post_event):
    payload = {"id": "evt_unknown_twice", "type": "test.unhandled", "created": T0, "data": {"object": {}}}

    first, second = post_event(payload), post_event(payload)

    assert (first.status_code, second.status_code) == (200, 200)
    assert list(StripeEvent.objects.values_list("id", "status", "attempts")) == [("evt_unknown_twice", "ignored", 0)]


def test_handled_event_is_stored_processed_with_its_effects(post_event):
    response = post_event(trial_created())

    assert response.status_code == 200
    assert response.json() == {"id": "evt_inbox_created", "status": "processed"}
    event = stored("evt_inbox_created")
    assert (event.status, event.attempts, event.last_error) == ("processed", 1, "")
    assert event.processed_at is not None
    assert _domain_rows() == {"accounts": 1, "subscriptions": 1, "entitlements": 1, "renewals": 1, "owed_emails": 0}


def test_a_webhook_writes_history_as_nobody_even_from_a_signed_in_session(client, post_event):
    """Stripe is nobody's session: a delivery that happens to carry a staff member's session
    cookie must not credit that person with the webhook's changes in the history."""
    staff = UserFactory(staff=True)
    client.force_login(staff)

    assert post_event(trial_created()).status_code == 200

    histories = [Subscription.history.all(), Entitlement.history.all(), Renewal.history.all(), Account.history.all()]
    assert all(h.exists() for h in histories)
    assert [list(h.exclude(history_user=None)) for h in histories] == [[], [], [], []]


# --- Exactly once ----------------------------------------------------------------------------


def test_duplicate_of_a_processed_event_is_200_duplicate_and_changes_nothing(post_event):
    post_event(trial_created())
    counts_after_first = row_counts()  # history tables included: no new history rows either

    response = post_event(trial_created())

    assert response.status_code == 200
    assert response.json() == {"id": "evt_inbox_created", "status": "duplicate"}
    assert stored("evt_inbox_created").attempts == 1
    assert row_counts() == counts_after_first


def test_duplicate_of_an_event_that_owes_an_email_owes_it_once(post_event, django_capture_on_commit_callbacks):
    payload = subscription_event(
        "customer.subscription.trial_will_end",
        trial_subscription("sub_reminded", "cus_reminded"),
        created=T0 + 11 * DAY,
        event_id="evt_trial_will_end",
    )

    with django_capture_on_commit_callbacks() as first_callbacks:
        first = post_event(payload)
    with django_capture_on_commit_callbacks() as second_callbacks:
        second = post_event(payload)

    assert (first.json()["status"], second.json()["status"]) == ("processed", "duplicate")
    assert list(OwedEmail.objects.values_list("kind", flat=True)) == [OwedEmail.Kind.TRIAL_WILL_END]
    assert len(first_callbacks) == 1  # the sending task, asked for after commit
    assert second_callbacks == []


# --- All or nothing --------------------------------------------------------------------------


def test_failing_handler_leaves_no_partial_change_and_the_event_failed(post_event, swap_handler):
    swap_handler("customer.subscription.created", "billing.tests.test_webhook_inbox:mirror_then_fail")
    counts_before = row_counts()

    response = post_event(trial_created())

    assert response.status_code == 500  # Stripe retries
    assert response.json() == {"id": "evt_inbox_created", "status": "failed"}
    # The handler did write the subscription, account, entitlement and renewal ...
    assert rows_before_failure == [
        {"accounts": 1, "subscriptions": 1, "entitlements": 1, "renewals": 1, "owed_emails": 0}
    ]
    # ... and none of it survived; only the inbox row (and nothing else) was added.
    assert _domain_rows() == NO_DOMAIN_ROWS
    assert row_counts() == {**counts_before, "billing.StripeEvent": 1}
    event = stored("evt_inbox_created")
    assert (event.status, event.attempts) == (StripeEvent.Status.FAILED, 1)
    assert f"RuntimeError: {FAILURE}" in event.last_error
    assert event.processed_at is None


def test_failed_event_is_applied_by_stripes_retry_once_the_handler_is_fixed(post_event, swap_handler):
    swap_handler("customer.subscription.created", "billing.tests.test_webhook_inbox:mirror_then_fail")
    assert post_event(trial_created()).status_code == 500

    swap_handler("customer.subscription.created", REAL_SUBSCRIPTION_HANDLER)
    response = post_event(trial_created())

    assert response.status_code == 200
    assert response.json()["status"] == "processed"
    event = stored("evt_inbox_created")
    assert (event.status, event.attempts, event.last_error) == (StripeEvent.Status.PROCESSED, 2, "")
    assert _domain_rows() == {"accounts": 1, "subscriptions": 1, "entitlements": 1, "renewals": 1, "owed_emails": 0}
    assert Subscription.objects.get().stripe_id == "sub_inbox"


def test_each_failed_attempt_is_counted(post_event, swap_handler):
    swap_handler("customer.subscription.created", "billing.tests.test_webhook_inbox:mirror_then_fail")

    statuses = [post_event(trial_created()).status_code for _ in range(3)]

    assert statuses == [500, 500, 500]
    assert (stored("evt_inbox_created").status, stored("evt_inbox_created").attempts) == ("failed", 3)
    assert _domain_rows() == NO_DOMAIN_ROWS


def test_operator_reprocess_applies_a_failed_event(post_event, swap_handler):
    swap_handler("customer.subscription.created", "billing.tests.test_webhook_inbox:mirror_then_fail")
    post_event(trial_created())
    swap_handler("customer.subscription.created", REAL_SUBSCRIPTION_HANDLER)

    outcome = inbox.process_event("evt_inbox_created")

    assert (outcome.status, outcome.http_status) == ("processed", 200)
    event = stored("evt_inbox_created")
    assert (event.status, event.attempts, event.last_error) == ("processed", 2, "")
    assert Subscription.objects.filter(stripe_id="sub_inbox").exists()


def test_operator_reprocess_leaves_a_processed_event_alone(post_event):
    post_event(trial_created())
    counts = row_counts()

    outcome = inbox.process_event("evt_inbox_created")

    assert outcome.status == "duplicate"
    assert stored("evt_inbox_created").attempts == 1
    assert row_counts() == counts


def test_failed_handler_owes_no_email_and_asks_for_no_task(
    post_event, swap_handler, django_capture_on_commit_callbacks
):
    swap_handler("customer.subscription.trial_will_end", "billing.tests.test_webhook_inbox:owe_reminder_then_fail")
    payload = subscription_event(
        "customer.subscription.trial_will_end",
        trial_subscription("sub_reminded", "cus_reminded"),
        created=T0 + 11 * DAY,
        event_id="evt_trial_will_end_fails",
    )

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_event(payload)

    assert response.status_code == 500
    assert rows_before_failure[0]["owed_emails"] == 1  # owed inside the handler ...
    assert OwedEmail.objects.count() == 0  # ... rolled back with it
    assert callbacks == []  # and the after-commit task went with the savepoint


# --- A prerequisite that has not arrived yet ---------------------------------------------------


def paid_first_invoice():
    return first_invoice_paid_event(
        "in_before_its_subscription",
        sub_id="sub_late",
        customer="cus_late",
        start=T0,
        end=T0 + 30 * DAY,
        created=T0 + 60,
    )


def test_invoice_paid_before_its_subscription_fails_until_the_subscription_arrives(post_event):
    paid = paid_first_invoice()

    response = post_event(paid)

    assert response.status_code == 500
    event = stored(paid["id"])
    assert (event.status, event.attempts) == (StripeEvent.Status.FAILED, 1)
    assert "not known yet" in event.last_error
    assert "PrerequisiteMissing" in event.last_error
    assert Invoice.objects.count() == 0 and Account.objects.count() == 0  # nothing half-applied

    created = subscription_event(
        "customer.subscription.created", active_subscription("sub_late", "cus_late", start=T0), created=T0
    )
    assert post_event(created).status_code == 200

    retry = post_event(paid)

    assert retry.status_code == 200
    assert retry.json()["status"] == "processed"
    event.refresh_from_db()
    assert (event.status, event.attempts, event.last_error) == (StripeEvent.Status.PROCESSED, 2, "")
    invoice = Invoice.objects.get()
    assert (invoice.stripe_id, invoice.status, invoice.subscription.stripe_id) == (
        "in_before_its_subscription",
        "paid",
        "sub_late",
    )
    paid_window = Entitlement.objects.get(kind=Entitlement.Kind.PAID)
    assert (int(paid_window.starts_at.timestamp()), int(paid_window.expires_at.timestamp())) == (T0, T0 + 30 * DAY)
    assert list(OwedEmail.objects.values_list("key", flat=True)) == ["receipt:in_before_its_subscription"]
    assert Account.objects.count() == 1


# --- The order of locks (docs/decisions/0002) --------------------------------------------------


def _statements_of(post_event, payload) -> list[str]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        assert post_event(payload).status_code == 200
    statements = [" ".join(query["sql"].replace('"', "").split()) for query in captured.captured_queries]
    return [s for s in statements if "SAVEPOINT" not in s]  # the test's own transaction


def _index(statements: list[str], *fragments: str) -> int:
    """The position of the first statement that contains every fragment."""
    return next(i for i, s in enumerate(statements) if all(f in s for f in fragments))


EVENT_INSERT = "INSERT INTO billing_stripeevent"
EVENT_LOCK = ("FROM billing_stripeevent", "FOR UPDATE")
ACCOUNT_LOCK = ("FROM provisioning_account", "stripe_customer_id = 'cus_inbox'", "FOR UPDATE")
INVOICE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('billing.invoice:in_inbox', 0))"


def _reads_of(statements: list[str], table: str) -> list[int]:
    return [i for i, s in enumerate(statements) if s.startswith("SELECT") and re.search(rf"(FROM|JOIN) {table}\b", s)]


def test_a_subscription_update_locks_the_account_after_storing_the_event_and_before_reading(post_event):
    """The event's row first (its INSERT), then the account's lock, then the reads it protects.
    Here the trial's seats differ from the new quantity, so the window's seats are written."""
    post_event(trial_created())
    update = subscription_event(
        "customer.subscription.updated",
        trial_subscription("sub_inbox", "cus_inbox", quantity=4),
        created=T0 + 60,
        event_id="evt_inbox_updated",
    )

    statements = _statements_of(post_event, update)

    insert, account_lock = _index(statements, EVENT_INSERT), _index(statements, *ACCOUNT_LOCK)
    assert insert < account_lock < min(_reads_of(statements, "billing_subscription"))
    assert [s for s in statements if s.startswith("UPDATE provisioning_entitlement")]
    subscription = Subscription.objects.get()
    assert (subscription.quantity, subscription.last_event_id) == (4, "evt_inbox_updated")
    assert Entitlement.objects.get().seats == 4  # the trial's window follows the seat change


def test_a_seat_change_with_a_window_of_its_seats_already_writes_no_entitlement(post_event):
    post_event(trial_created())
    Entitlement.objects.update(seats=4)  # as if an earlier delivery had set the window's seats
    update = subscription_event(
        "customer.subscription.updated",
        trial_subscription("sub_inbox", "cus_inbox", quantity=4),
        created=T0 + 60,
        event_id="evt_inbox_updated",
    )

    statements = _statements_of(post_event, update)

    assert not [s for s in statements if "provisioning_entitlement" in s and not s.startswith("SELECT")]
    assert (Subscription.objects.get().quantity, Entitlement.objects.get().seats) == (4, 4)


def test_a_first_event_of_a_new_customer_creates_its_account_under_the_lock(post_event):
    statements = _statements_of(post_event, trial_created())

    assert _index(statements, EVENT_INSERT) < _index(statements, *ACCOUNT_LOCK)
    assert Account.objects.get().stripe_customer_id == "cus_inbox"
    assert stored("evt_inbox_created").status == "processed"


def test_a_type_without_a_handler_is_stored_by_one_insert_and_locks_nothing(post_event):
    payload = subscription_event(
        "customer.subscription.created",
        trial_subscription("sub_inbox", "cus_inbox"),
        created=T0,
        event_id="evt_inbox_created",
    )
    payload["type"] = "customer.created"  # no handler: stored as ignored, nothing locked
    payload["data"]["object"] = {"id": "cus_inbox", "object": "customer"}

    statements = _statements_of(post_event, payload)

    assert len(statements) == 1 and statements[0].startswith(EVENT_INSERT), statements
    assert stored("evt_inbox_created").status == "ignored"
    assert Account.objects.count() == 0


def test_a_retried_failed_event_locks_the_account_after_the_event_row(post_event, swap_handler):
    """The row exists (failed), so the INSERT skips: the row is locked, then the account."""
    post_event(trial_created())
    update = subscription_event(
        "customer.subscription.updated",
        trial_subscription("sub_inbox", "cus_inbox", quantity=4),
        created=T0 + 60,
        event_id="evt_inbox_updated",
    )
    swap_handler("customer.subscription.updated", "billing.tests.test_webhook_inbox:mirror_then_fail")
    assert post_event(update).status_code == 500
    swap_handler("customer.subscription.updated", REAL_SUBSCRIPTION_HANDLER)

    statements = _statements_of(post_event, update)

    assert _index(statements, EVENT_INSERT) < _index(statements, *EVENT_LOCK) < _index(statements, *ACCOUNT_LOCK)
    assert (stored("evt_inbox_updated").status, Subscription.objects.get().quantity) == ("processed", 4)


def invoice_then_fail(event):
    """Test-only handler: mirror the invoice, then an error."""
    invoices.mirror_invoice(event)
    raise RuntimeError(FAILURE)


def _paid_invoice_of_a_known_subscription(post_event):
    from .conftest import first_invoice_paid_event

    post_event(
        subscription_event(
            "customer.subscription.created",
            active_subscription("sub_inbox", "cus_inbox"),
            created=T0,
            event_id="evt_inbox_created",
        )
    )
    return first_invoice_paid_event(
        "in_inbox", sub_id="sub_inbox", customer="cus_inbox", start=T0, end=T0 + 30 * DAY, created=T0 + 5
    )


def test_an_invoice_event_takes_the_invoice_lock_then_the_account_lock_before_any_read(post_event):
    """``invoice.paid``: event row, invoice key, account, then the rows (docs/decisions/0002)."""
    paid = _paid_invoice_of_a_known_subscription(post_event)

    statements = _statements_of(post_event, paid)

    account_lock = _index(statements, *ACCOUNT_LOCK)
    assert _index(statements, EVENT_INSERT) < _index(statements, INVOICE_LOCK) < account_lock
    for table in ("billing_invoice", "billing_subscription", "billing_renewal", "billing_payment"):
        assert min(_reads_of(statements, table)) > account_lock, table
    invoice = Invoice.objects.get()
    assert (invoice.status, invoice.subscription.stripe_id) == ("paid", "sub_inbox")
    assert Entitlement.objects.get(kind="paid").seats == 1


def test_a_retried_invoice_event_takes_the_invoice_lock_before_the_account_lock(post_event, swap_handler):
    paid = _paid_invoice_of_a_known_subscription(post_event)
    swap_handler("invoice.paid", "billing.tests.test_webhook_inbox:invoice_then_fail")
    assert post_event(paid).status_code == 500
    swap_handler("invoice.paid", "billing.webhook.handlers:on_invoice_paid")

    statements = _statements_of(post_event, paid)

    event_lock, invoice_lock = _index(statements, *EVENT_LOCK), _index(statements, INVOICE_LOCK)
    assert event_lock < invoice_lock < _index(statements, *ACCOUNT_LOCK)
    assert (stored(paid["id"]).status, Invoice.objects.get().status) == ("processed", "paid")

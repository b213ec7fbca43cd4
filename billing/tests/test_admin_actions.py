"""Support actions in the admin, as a plain staff user of the "Billing support" group does them:
re-process a failed event, resend a receipt, re-sync from Stripe, send an owed e-mail now.

Each is a button on the row's page and an action on its list, both behind a confirmation page,
and each ends with a message saying what happened, shown exactly as written (never "Evt_...").
Re-sync calls Stripe's API with stripe-python through a local server in Stripe's shape.
"""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.utils import quote
from django.contrib.messages import get_messages
from django.urls import reverse

from billing.models import Invoice, OwedEmail, StripeEvent, Subscription
from billing.simulation.objects import invoice_line_object, invoice_object, subscription_object
from billing.tests.conftest import DAY, deliver, first_invoice_paid_event
from billing.tests.factories import InvoiceFactory, OwedEmailFactory
from billing.tests.support_story import START, change_page, changelist
from provisioning.tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def action_page(obj, name):
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_{name}", args=[quote(obj.pk)])


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def confirm(client, obj, name) -> list[str]:
    """Open the row's page, click the action's button, confirm it: the messages shown after."""
    page = client.get(change_page(obj))
    dom_id = name.replace("_", "-")
    assert f'id="{dom_id}-button"'.encode() in page.content
    confirmation = client.get(action_page(obj, name))
    assert confirmation.status_code == 200
    assert f'id="confirm-{dom_id}"'.encode() in confirmation.content
    done = client.post(action_page(obj, name), {"post": "yes"}, follow=True)
    assert done.redirect_chain[-1][0] == change_page(obj)
    shown = re.findall(r'<ul class="messagelist">(.*?)</ul>', done.content.decode(), re.S)
    assert shown, "the message is shown on the row's page"
    return [m.strip() for m in re.findall(r"<li[^>]*>(.*?)</li>", shown[0], re.S)]


# --- Re-process ---------------------------------------------------------------------------


def test_support_re_processes_a_failed_event_from_its_page(story, support):
    event = StripeEvent.objects.get(pk=story.failed_event)
    assert event.status == StripeEvent.Status.FAILED and not Invoice.objects.filter(stripe_id="in_late1").exists()

    shown = confirm(support, event, "reprocess")

    event.refresh_from_db()
    assert event.status == StripeEvent.Status.PROCESSED and event.attempts == 2
    assert Invoice.objects.get(stripe_id="in_late1").status == Invoice.Status.PAID
    assert shown == [f"Event {event.pk} (invoice.paid) was re-processed: it is now processed."]
    assert f"Evt_{event.pk[4:]}" not in str(shown)  # Stripe ids shown exactly


def test_confirming_shows_what_will_happen_and_changes_nothing_until_confirmed(story, support):
    event = StripeEvent.objects.get(pk=story.failed_event)
    page = support.get(action_page(event, "reprocess"))
    assert b"1 attempt(s) so far; last error: PrerequisiteMissing: invoice in_late1 pays for" in page.content
    assert b"No, take me back" in page.content
    assert StripeEvent.objects.get(pk=event.pk).status == StripeEvent.Status.FAILED


def test_re_processing_from_the_list_asks_first_then_applies_each_event_once(story, support):
    failed = StripeEvent.objects.get(pk=story.failed_event)
    processed = story.event("invoice_paid")
    selection = {"action": "reprocess", "_selected_action": [failed.pk, processed.pk]}

    asked = support.post(changelist(StripeEvent), selection)
    assert asked.status_code == 200 and b'id="confirm-reprocess"' in asked.content
    assert b"already processed: it will be left alone" in asked.content
    assert StripeEvent.objects.get(pk=failed.pk).status == StripeEvent.Status.FAILED

    done = support.post(changelist(StripeEvent), {**selection, "post": "yes"})
    assert done.status_code == 302
    assert StripeEvent.objects.get(pk=failed.pk).status == StripeEvent.Status.PROCESSED
    assert messages_of(done) == [  # oldest first, as Stripe's retries would come
        f"Event {processed.pk} was already processed: nothing was applied again.",
        f"Event {failed.pk} (invoice.paid) was re-processed: it is now processed.",
    ]


def test_an_event_that_fails_again_says_why(client, webhook_settings, support):
    paid = first_invoice_paid_event(
        "in_orphan", sub_id="sub_orphan", customer="cus_orphan", start=START, end=START + 30 * DAY, created=START
    )
    assert deliver(client, paid).status_code == 500
    event = StripeEvent.objects.get(pk=paid["id"])
    shown = confirm(support, event, "reprocess")
    assert len(shown) == 1 and shown[0].startswith(f"Event {event.pk} failed again: PrerequisiteMissing")
    event.refresh_from_db()
    assert event.status == StripeEvent.Status.FAILED and event.attempts == 2


# --- Resend a receipt -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # commits for real: the copy is sent after the resend's commit
def test_support_resends_a_receipt_and_it_is_recorded_with_who_asked(story, support, support_member, mailoutbox):
    invoice = Invoice.objects.get(stripe_id="in_story1")
    assert OwedEmail.objects.get(key="receipt:in_story1").status == OwedEmail.Status.SENT  # the one its payment owed
    before = len(mailoutbox)

    shown = confirm(support, invoice, "resend_receipt")

    copy = OwedEmail.objects.get(key="receipt:in_story1:resend:1")
    assert copy.requested_by == support_member and copy.status == OwedEmail.Status.SENT
    assert shown == [f"The receipt of invoice STORY-0001 was sent again (owed e-mail {copy.pk})."]
    assert len(mailoutbox) == before + 1
    assert mailoutbox[-1].subject == "Receipt for invoice STORY-0001" and mailoutbox[-1].to == ["payer@example.com"]

    confirm(support, invoice, "resend_receipt")
    assert OwedEmail.objects.get(key="receipt:in_story1:resend:2").requested_by == support_member
    assert len(mailoutbox) == before + 2
    page = support.get(change_page(invoice)).content.decode()
    assert "receipt:in_story1:resend:2" in page and support_member.username in page


def test_a_receipt_still_waiting_is_not_resent_and_an_unpaid_invoice_has_none(support, mailoutbox):
    waiting = OwedEmailFactory(invoice=InvoiceFactory(number="WAIT-1", total=1000))
    shown = confirm(support, waiting.invoice, "resend_receipt")
    assert shown == [
        f"A receipt of invoice WAIT-1 is still waiting to be sent (owed e-mail {waiting.pk}): use Send now on it instead."
    ]
    open_invoice = InvoiceFactory(number="OPEN-1", status=Invoice.Status.OPEN)
    assert confirm(support, open_invoice, "resend_receipt") == [
        "Invoice OPEN-1 is not a paid invoice: it has no receipt."
    ]
    assert OwedEmail.objects.filter(key__contains=":resend:").count() == 0 and mailoutbox == []


def test_send_now_says_truthfully_what_it_sent(story, support, mailoutbox):
    sent = OwedEmail.objects.get(key="receipt:in_story1")
    pending = OwedEmailFactory(invoice=InvoiceFactory(number="PEND-1", customer_email="pend@example.com"))
    before = len(mailoutbox)

    response = support.post(
        changelist(OwedEmail), {"action": "send_now", "_selected_action": [sent.pk, pending.pk], "post": "yes"}
    )
    assert sorted(messages_of(response)) == sorted(
        [
            "E-mail receipt:in_story1 was already sent: nothing was sent "
            "(use Resend receipt on its invoice to send a receipt again).",
            f"E-mail {pending.key} was sent.",
        ]
    )
    assert len(mailoutbox) == before + 1 and mailoutbox[-1].to == ["pend@example.com"]
    assert OwedEmail.objects.get(pk=pending.pk).status == OwedEmail.Status.SENT


# --- Re-sync from Stripe -----------------------------------------------------------------------


def stripe_subscription(**changes) -> dict:
    fields = dict(
        id="sub_story",
        customer="cus_story",
        status="active",
        quantity=2,
        created=START,
        current_period_start=START,
        current_period_end=START + 30 * DAY,
    )
    return subscription_object(**{**fields, **changes})


def test_support_re_syncs_a_subscription_from_stripe(story, support, fake_stripe):
    fake_stripe.subscriptions["sub_story"] = stripe_subscription(quantity=5, cancel_at_period_end=True)
    sub = Subscription.objects.get(stripe_id="sub_story")

    shown = confirm(support, sub, "resync")

    assert [path for path, _ in fake_stripe.requests] == ["/v1/subscriptions/sub_story"]
    sub.refresh_from_db()
    assert (sub.quantity, sub.cancel_at_period_end) == (5, True)
    assert sub.last_event_id.startswith("req_")
    assert shown == [
        "Subscription sub_story was re-synced from Stripe: cancel_at_period_end False → True; quantity 2 → 5."
    ]
    history = sub.history.first()
    assert history.history_change_reason == "re-synced from Stripe" and history.history_user.is_staff


def test_support_re_syncs_an_invoice_and_its_status_never_moves_backwards(story, support, fake_stripe):
    invoice = Invoice.objects.get(stripe_id="in_story1")
    line = invoice_line_object(
        id="il_in_story1", invoice="in_story1", amount=4000, quantity=2, period_start=START,
        period_end=START + 30 * DAY, subscription="sub_story",
    )  # fmt: skip
    fake_stripe.invoices["in_story1"] = invoice_object(
        id="in_story1", customer="cus_story", status="open", billing_reason="subscription_create", lines=[line],
        subscription="sub_story", number="STORY-0001", created=START, finalized_at=START + 1,
    )  # fmt: skip

    shown = confirm(support, invoice, "resync")

    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID  # Stripe's "open" is older news than "paid"
    assert shown == ["Invoice in_story1 was fetched, but a newer event was applied meanwhile: nothing was written."]


def test_re_sync_failures_are_said_plainly(story, support, fake_stripe, settings):
    sub = Subscription.objects.get(stripe_id="sub_story")
    assert confirm(support, sub, "resync") == [
        "Subscription sub_story was not re-synced: Stripe has no subscription sub_story."
    ]
    settings.STRIPE_API_KEY = ""
    assert confirm(support, sub, "resync") == [
        "Subscription sub_story was not re-synced: STRIPE_API_KEY is not set: the Stripe API cannot be called."
    ]


def test_staff_outside_the_group_cannot_re_sync_or_resend(story, client, fake_stripe):
    client.force_login(UserFactory(staff=True))
    sub = Subscription.objects.get(stripe_id="sub_story")
    invoice = Invoice.objects.get(stripe_id="in_story1")
    assert client.post(action_page(sub, "resync"), {"post": "yes"}).status_code == 403
    assert client.post(action_page(invoice, "resend_receipt"), {"post": "yes"}).status_code == 403
    assert fake_stripe.requests == []
    assert not OwedEmail.objects.filter(key__contains=":resend:").exists()

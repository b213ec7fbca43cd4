"""What the owed e-mails say and whom they go to (``billing.emails``).

Rows are made with the factories (``billing.tests.factories``): these tests are about the
messages, not about webhooks (``test_tasks`` covers how they are owed and sent). The helpers here,
which state the fields a message depends on, are shared with it.
"""

from datetime import UTC, datetime

import pytest
from django.conf import settings
from django.utils import timezone as django_timezone

from billing.emails import NoRecipient, build_message, recipients
from billing.models import Invoice, OwedEmail, Subscription
from billing.tests.factories import InvoiceFactory, OwedEmailFactory, SubscriptionFactory
from provisioning.models import Account, Membership
from provisioning.tests.factories import AccountFactory, MembershipFactory

pytestmark = pytest.mark.django_db

PERIOD_START = datetime(2026, 3, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 4, 1, tzinfo=UTC)
PAID_AT = datetime(2026, 3, 1, 0, 5, tzinfo=UTC)


def make_account(key: str = "acme", **fields) -> Account:
    return AccountFactory(name=fields.pop("name", f"Account {key}"), stripe_customer_id=f"cus_{key}", **fields)


def make_invoice(account: Account, key: str = "0001", **fields) -> Invoice:
    values = {
        "number": f"ACME-{key}",
        "status": Invoice.Status.PAID,
        "currency": "usd",
        "total": 1234,
        "amount_due": 1234,
        "amount_paid": 1234,
        "customer_email": "payer@example.com",
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_test/test_{key}?s=ap",
        "invoice_pdf": f"https://pay.stripe.com/invoice/acct_test/test_{key}/pdf?s=ap",
        "period_start": PERIOD_START,
        "period_end": PERIOD_END,
        "paid_at": PAID_AT,
        **fields,
    }
    return InvoiceFactory(stripe_id=f"in_{key}", account=account, **values)


def make_trialing_subscription(account: Account, key: str = "trial", **fields) -> Subscription:
    values = {
        "status": Subscription.Status.TRIALING,
        "quantity": 3,
        "trial_end": datetime(2026, 3, 5, tzinfo=UTC),
    }
    return SubscriptionFactory(stripe_id=f"sub_{key}", account=account, **{**values, **fields})


def owed(kind: str, *, account: Account, invoice: Invoice | None = None, subscription: Subscription | None = None):
    """An owed e-mail row as ``owe_email`` records it, without its task."""
    return OwedEmailFactory(kind=kind, account=account, invoice=invoice, subscription=subscription)


def html_of(message) -> str:
    assert [mimetype for _, mimetype in message.alternatives] == ["text/html"]
    return message.alternatives[0][0]


def test_receipt_says_what_was_paid_for_and_links_the_invoice():
    invoice = make_invoice(make_account())
    message = build_message(owed(OwedEmail.Kind.RECEIPT, account=invoice.account, invoice=invoice))

    assert message.subject == "Receipt for invoice ACME-0001"
    assert message.to == ["payer@example.com"]
    assert message.from_email == settings.DEFAULT_FROM_EMAIL
    html = html_of(message)
    for body in (message.body, html):
        assert "ACME-0001" in body
        assert "12.34 USD" in body
        assert "March 1, 2026 – April 1, 2026" in body
    assert "https://invoice.stripe.com/i/acct_test/test_0001?s=ap" in message.body
    assert 'href="https://invoice.stripe.com/i/acct_test/test_0001?s=ap"' in html
    assert "Amount paid" not in message.body  # same as the total: not repeated


def test_receipt_in_a_zero_decimal_currency_is_not_divided():
    invoice = make_invoice(make_account(), currency="jpy", total=1200, amount_due=1200, amount_paid=1200)
    message = build_message(owed(OwedEmail.Kind.RECEIPT, account=invoice.account, invoice=invoice))

    assert "1,200 JPY" in message.body
    assert "1,200 JPY" in html_of(message)
    assert "12.00" not in message.body


def test_receipt_shows_the_amount_charged_when_it_differs_from_the_total():
    # Part of the total came from the customer's credit balance.
    invoice = make_invoice(make_account(), total=5000, amount_due=3000, amount_paid=3000)
    message = build_message(owed(OwedEmail.Kind.RECEIPT, account=invoice.account, invoice=invoice))

    assert "Total: 50.00 USD" in message.body
    assert "Amount paid: 30.00 USD" in message.body


def test_payment_failed_asks_to_update_the_payment_method_on_the_hosted_page():
    invoice = make_invoice(make_account(), key="0002", status=Invoice.Status.OPEN, amount_paid=0, paid_at=None)
    message = build_message(owed(OwedEmail.Kind.PAYMENT_FAILED, account=invoice.account, invoice=invoice))

    assert message.subject == "Payment failed for invoice ACME-0002"
    html = html_of(message)
    assert "Amount due: 12.34 USD" in message.body
    assert "12.34 USD" in html
    assert "update your payment method" in message.body
    assert "https://invoice.stripe.com/i/acct_test/test_0002?s=ap" in message.body
    assert 'href="https://invoice.stripe.com/i/acct_test/test_0002?s=ap"' in html
    assert "update your payment method" in html


def test_trial_reminder_gives_the_utc_date_whatever_the_active_timezone():
    account = make_account(billing_email="billing@acme.example")
    # 02:00 UTC on March 6 is still March 5 in Los Angeles: the e-mail says March 6.
    sub = make_trialing_subscription(account, trial_end=datetime(2026, 3, 6, 2, 0, tzinfo=UTC))
    with django_timezone.override("America/Los_Angeles"):
        message = build_message(owed(OwedEmail.Kind.TRIAL_WILL_END, account=account, subscription=sub))

    assert message.subject == "Your trial ends on March 6, 2026"
    assert message.to == ["billing@acme.example"]
    assert "Your trial ends on March 6, 2026" in message.body
    assert "3 seats" in message.body
    assert "add a payment method" in message.body
    assert "March 6, 2026" in html_of(message)


def test_trial_reminder_says_the_card_on_file_will_be_charged():
    account = make_account(billing_email="billing@acme.example", default_payment_method_id="pm_123")
    sub = make_trialing_subscription(account, quantity=1)
    message = build_message(owed(OwedEmail.Kind.TRIAL_WILL_END, account=account, subscription=sub))

    assert message.subject == "Your trial ends on March 5, 2026"
    assert "1 seat." in message.body
    assert "will be charged" in message.body
    assert "add a payment method" not in message.body


def test_html_is_escaped_and_text_is_not():
    invoice = make_invoice(make_account(name="Smith & <Jones>"))
    message = build_message(owed(OwedEmail.Kind.RECEIPT, account=invoice.account, invoice=invoice))

    assert "Hello Smith & <Jones>," in message.body
    html = html_of(message)
    assert "Smith &amp; &lt;Jones&gt;" in html
    assert "<Jones>" not in html


def test_recipient_is_the_invoice_email_then_the_billing_email_then_owners_and_admins():
    account = make_account(billing_email="billing@acme.example")
    for name, role, active in [
        ("zoe", Membership.Role.OWNER, True),
        ("adam", Membership.Role.ADMIN, True),
        ("mia", Membership.Role.MEMBER, True),
        ("old", Membership.Role.OWNER, False),
    ]:
        MembershipFactory(account=account, role=role, user__email=f"{name}@acme.example", user__is_active=active)
    MembershipFactory(account=account, role=Membership.Role.OWNER, user__email="")
    invoice = make_invoice(account)
    row = owed(OwedEmail.Kind.RECEIPT, account=account, invoice=invoice)

    assert recipients(row) == ["payer@example.com"]
    invoice.customer_email = ""
    assert recipients(row) == ["billing@acme.example"]
    account.billing_email = ""
    assert recipients(row) == ["adam@acme.example", "zoe@acme.example"]


def test_nobody_to_send_to_is_an_error_of_its_own():
    account = make_account()
    invoice = make_invoice(account, customer_email="")

    with pytest.raises(NoRecipient):
        build_message(owed(OwedEmail.Kind.RECEIPT, account=account, invoice=invoice))

"""A support agent's day in a real browser: Debian's Chromium driven by Selenium against ``live_server``.

A plain staff user of the "Billing support" group (not a superuser) logs in on the admin's login
page, finds the customer by a ``sub_`` id, opens the account (the hub), sees the paid renewal
invoice and the renewal it paid, re-processes a failed event from its page and sees it processed,
and resends a receipt. The rows are written by the webhook from signed, Stripe-shaped deliveries:
Acme's trial became a paid period (its renewal linked to the invoice that paid it), and the
``invoice.paid`` of a second subscription came before the subscription itself, so it failed with
a prerequisite missing until support re-processes it.

Chromium and chromedriver are Debian's (``make browser`` installs them); Selenium is given both
paths, so Selenium Manager never looks for a browser on the network. The account page is saved to
``docs/screenshots/support-account.png`` on every run (README.rst shows it).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.admin.utils import quote
from django.core import mail
from django.urls import reverse
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from billing.admin.display import when
from billing.models import Invoice, OwedEmail, Renewal, StripeEvent
from billing.simulation.objects import event_object, invoice_line_object, invoice_object
from billing.tests.conftest import (
    DAY,
    active_subscription,
    as_datetime,
    deliver,
    first_invoice_paid_event,
    subscription_event,
    trial_subscription,
)
from billing.tests.support_story import support_user
from provisioning.tests.factories import AccountFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)
SCREENSHOTS = Path(settings.BASE_DIR) / "docs" / "screenshots"
WAIT = 10  # seconds for a page to show what the test waits for

PASSWORD = "support-pw-7Hq2"
CUSTOMER = "cus_RbAcmeAnalytics01"
SUB = "sub_1RbAcmeTeamPlan0001"
ADDON_SUB = "sub_1RbAcmeReportsAdd01"
RENEWAL_INVOICE = "in_1RbAcmeRenewal00001"
ADDON_INVOICE = "in_1RbAcmeReports00001"

NOW = int(time.time())
TRIAL_START = NOW - 20 * DAY
TRIAL_END = TRIAL_START + 14 * DAY  # six days ago: the first paid period is current
PERIOD_END = TRIAL_END + 30 * DAY
ADDON_START = NOW - 2 * DAY


def renewal_invoice(status: str, *, paid_at: int | None = None) -> dict:
    """The invoice that ends Acme's trial: 3 seats for the first paid month (``subscription_cycle``)."""
    line = invoice_line_object(
        id=f"il_{RENEWAL_INVOICE}",
        invoice=RENEWAL_INVOICE,
        amount=3 * 2000,
        quantity=3,
        period_start=TRIAL_END,
        period_end=PERIOD_END,
        subscription=SUB,
    )
    finalized = status != "draft"
    return invoice_object(
        id=RENEWAL_INVOICE,
        customer=CUSTOMER,
        status=status,
        billing_reason="subscription_cycle",
        lines=[line],
        subscription=SUB,
        number="ACME-0001" if finalized else None,
        created=TRIAL_END,
        finalized_at=TRIAL_END + 3600 if finalized else None,
        paid_at=paid_at,
        customer_email="billing@acme.example",
        attempt_count=1 if paid_at else 0,
    )


def deliver_acme(client) -> str:
    """Post Acme's events, signed, in the order Stripe sent them; the id of the one that failed."""
    team_plan = trial_subscription(SUB, CUSTOMER, start=TRIAL_START, days=14, quantity=3)
    trial_ended = {**team_plan, "status": "active", "current_period_start": TRIAL_END, "current_period_end": PERIOD_END}
    addon_paid = first_invoice_paid_event(
        ADDON_INVOICE,
        sub_id=ADDON_SUB,
        customer=CUSTOMER,
        start=ADDON_START,
        end=ADDON_START + 30 * DAY,
        created=ADDON_START + 60,
    )
    addon_paid["data"]["object"].update(number="ACME-0002", customer_email="billing@acme.example")
    paid_at = TRIAL_END + 3605
    story = [
        (subscription_event("customer.subscription.created", team_plan, created=TRIAL_START), 200),
        (event_object(type="invoice.created", obj=renewal_invoice("draft"), created=TRIAL_END), 200),
        (subscription_event("customer.subscription.updated", trial_ended, created=TRIAL_END), 200),
        (event_object(type="invoice.paid", obj=renewal_invoice("paid", paid_at=paid_at), created=paid_at), 200),
        # The add-on's first invoice is delivered before its subscription: a prerequisite is missing.
        (addon_paid, 500),
        (
            subscription_event(
                "customer.subscription.created",
                active_subscription(ADDON_SUB, CUSTOMER, start=ADDON_START),
                created=ADDON_START,
            ),
            200,
        ),
    ]
    for payload, expected in story:
        response = deliver(client, payload)
        assert response.status_code == expected, (payload["type"], response.content[:500])
    return addon_paid["id"]


@pytest.fixture
def browser():
    """Headless Chromium, 1400 x 1000, from Debian's packages (``make browser``)."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert Path(binary).is_file(), f"{binary} is missing: `make browser` installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_window_size(*WINDOW)
    yield driver
    driver.quit()


def wait_for(driver, condition):
    return WebDriverWait(driver, WAIT).until(condition)


def table_rows(driver, table_id: str) -> list[list[str]]:
    """The text of each cell of each body row of the table ``table_id``."""
    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def readonly_field(driver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f".field-{name} .readonly").text


def click_and_wait(driver, element, condition):
    """Click ``element`` and wait for the next page: ``element`` gone, then ``condition`` met."""
    element.click()
    wait_for(driver, EC.staleness_of(element))
    return wait_for(driver, condition)


def messages_shown(driver) -> list[str]:
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li")]


def save_screenshot(driver, name: str, *, down_to: str) -> None:
    """Save the page, 1400 px wide, from its top to the bottom of the element ``down_to`` (a PNG
    overwritten on every run). Chromium's DevTools capture the part below the window too."""
    bottom = driver.execute_script(
        "const box = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return Math.ceil(box.bottom + window.scrollY) + 16;",
        down_to,
    )
    clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": bottom, "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000, "the screenshot shows a page"


def test_a_support_agent_finds_the_customer_fixes_a_failed_event_and_resends_a_receipt(
    client, webhook_settings, live_server, browser
):
    AccountFactory(name="Acme Analytics", stripe_customer_id=CUSTOMER, billing_email="billing@acme.example")
    AccountFactory(name="Globex Corporation", stripe_customer_id="cus_RbGlobexCorp0001")
    failed_event = deliver_acme(client)
    agent = support_user(username="sam.support", password=PASSWORD)
    assert not agent.is_superuser
    renewal_receipt = "Receipt for invoice ACME-0001"
    assert [m.subject for m in mail.outbox] == [renewal_receipt]  # sent after the invoice.paid committed

    # Logs in on the admin's own login page.
    browser.get(live_server.url + reverse("admin:login"))
    browser.find_element(By.ID, "id_username").send_keys(agent.username)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    click_and_wait(
        browser, browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]"), EC.title_contains("Site admin")
    )
    assert "permission to view or edit anything" not in browser.page_source

    # Searches the accounts for the subscription id the customer quoted, and opens the one found.
    click_and_wait(
        browser, browser.find_element(By.LINK_TEXT, "Accounts"), EC.presence_of_element_located((By.ID, "searchbar"))
    )
    searchbar = browser.find_element(By.ID, "searchbar")
    searchbar.send_keys(SUB, Keys.ENTER)
    wait_for(browser, EC.staleness_of(searchbar))
    found = wait_for(browser, EC.presence_of_all_elements_located((By.CSS_SELECTOR, "#result_list tbody tr th a")))
    assert [link.text for link in found] == ["Acme Analytics"]
    click_and_wait(browser, found[0], EC.presence_of_element_located((By.ID, "account-invoices")))
    account_page = browser.current_url

    # The hub: the paid renewal invoice, and the renewal it paid (processed), then the next one.
    paid_at = when(Invoice.objects.get(stripe_id=RENEWAL_INVOICE).paid_at)
    assert table_rows(browser, "account-invoices") == [["ACME-0001", RENEWAL_INVOICE, "Paid", "60.00 USD", paid_at]]
    renewal = Renewal.objects.get(stripe_invoice_id=RENEWAL_INVOICE)
    assert renewal.effective_date == as_datetime(TRIAL_END)
    assert table_rows(browser, "account-renewals") == [
        [when(as_datetime(PERIOD_END)), SUB, "-", "-"],
        [when(as_datetime(TRIAL_END)), SUB, RENEWAL_INVOICE, when(renewal.processed_at)],
    ]
    invoice_link = browser.find_element(By.CSS_SELECTOR, "#account-renewals").find_element(
        By.LINK_TEXT, RENEWAL_INVOICE
    )
    assert invoice_link.get_attribute("href").endswith(
        reverse("admin:billing_invoice_change", args=[Invoice.objects.get(stripe_id=RENEWAL_INVOICE).pk])
    )
    events = {row[0]: row[1:] for row in table_rows(browser, "account-events")}
    assert events[failed_event] == ["invoice.paid", "Failed", when(as_datetime(ADDON_START + 60))]

    # Opens the failed event from the account's recent events and re-processes it from its page.
    event_link = browser.find_element(By.ID, "account-events").find_element(By.LINK_TEXT, failed_event)
    click_and_wait(browser, event_link, EC.presence_of_element_located((By.ID, "reprocess-button")))
    assert readonly_field(browser, "status") == "Failed"
    assert "PrerequisiteMissing" in readonly_field(browser, "last_error")
    click_and_wait(
        browser,
        browser.find_element(By.ID, "reprocess-button"),
        EC.presence_of_element_located((By.ID, "confirm-reprocess")),
    )
    assert "1 attempt(s) so far; last error: PrerequisiteMissing" in browser.find_element(By.ID, "reprocess-rows").text
    assert StripeEvent.objects.get(pk=failed_event).status == StripeEvent.Status.FAILED  # nothing until confirmed
    click_and_wait(
        browser,
        browser.find_element(By.ID, "confirm-reprocess"),
        EC.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist")),
    )
    assert browser.current_url == live_server.url + reverse(
        "admin:billing_stripeevent_change", args=[quote(failed_event)]
    )
    assert messages_shown(browser) == [f"Event {failed_event} (invoice.paid) was re-processed: it is now processed."]
    assert (readonly_field(browser, "status"), readonly_field(browser, "attempts")) == ("Processed", "2")
    assert StripeEvent.objects.get(pk=failed_event).status == StripeEvent.Status.PROCESSED

    # Back on the hub: both invoices paid, every event processed. This is the README's screenshot.
    browser.get(account_page)
    wait_for(browser, EC.presence_of_element_located((By.ID, "account-invoices")))
    assert [row[:3] for row in table_rows(browser, "account-invoices")] == [
        ["ACME-0002", ADDON_INVOICE, "Paid"],
        ["ACME-0001", RENEWAL_INVOICE, "Paid"],
    ]
    assert {row[2] for row in table_rows(browser, "account-events")} == {"Processed"}
    save_screenshot(browser, "support-account.png", down_to="account-events")

    # Opens the renewal invoice and resends its receipt.
    invoice_link = browser.find_element(By.ID, "account-invoices").find_element(By.LINK_TEXT, "ACME-0001")
    click_and_wait(browser, invoice_link, EC.presence_of_element_located((By.ID, "resend-receipt-button")))
    click_and_wait(
        browser,
        browser.find_element(By.ID, "resend-receipt-button"),
        EC.presence_of_element_located((By.ID, "confirm-resend-receipt")),
    )
    click_and_wait(
        browser,
        browser.find_element(By.ID, "confirm-resend-receipt"),
        EC.presence_of_element_located((By.CSS_SELECTOR, "ul.messagelist")),
    )
    copy = OwedEmail.objects.get(key=f"receipt:{RENEWAL_INVOICE}:resend:1")
    assert messages_shown(browser) == [f"The receipt of invoice ACME-0001 was sent again (owed e-mail {copy.pk})."]
    assert copy.requested_by == agent and copy.status == OwedEmail.Status.SENT
    assert f"receipt:{RENEWAL_INVOICE}:resend:1" in browser.find_element(By.ID, "invoice-receipts").text
    # Through Django's mail backend (locmem in tests): the receipts the payments owed, then the copy.
    assert [m.subject for m in mail.outbox] == [renewal_receipt, "Receipt for invoice ACME-0002", renewal_receipt]
    assert mail.outbox[-1].to == ["billing@acme.example"]

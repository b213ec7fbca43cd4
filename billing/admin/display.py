"""How the billing admin shows things: links (to rows, to Stripe's dashboard), money, tables.

Stripe ids are shown exactly as Stripe wrote them (they are case-sensitive), never capitalised.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from ..money import format_amount

STRIPE_DASHBOARD = "https://dashboard.stripe.com/"


def stripe_dashboard_link(path: str, stripe_id: str, livemode: bool):
    """A link opening ``stripe_id`` in Stripe's dashboard (e.g. ``path="invoices"``).

    Test-mode objects live under ``/test/``: https://docs.stripe.com/test-mode
    """
    if not stripe_id:
        return None
    url = f"{STRIPE_DASHBOARD}{'' if livemode else 'test/'}{path}/{stripe_id}"
    return format_html('<a href="{}" target="_blank" rel="noopener noreferrer">{}</a>', url, stripe_id)


def admin_url(obj) -> str:
    """``obj``'s admin page; its key quoted as the admin quotes it (``evt_1A...`` is not ``evt_\x1a...``)."""
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj.pk)])


def admin_link(obj, text=None):
    """A link to ``obj``'s admin page, so support can walk from row to related row."""
    if obj is None:
        return None
    return format_html('<a href="{}">{}</a>', admin_url(obj), text if text is not None else obj)


def changelist_url(model, **params) -> str:
    """The admin list of ``model``, with query ``params`` (e.g. ``q="cus_..."``)."""
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def nowrap(text):
    """``text`` kept on one line in a narrow column (the admin's own ``nowrap`` class)."""
    return format_html('<span class="nowrap">{}</span>', text)


def money_display(field: str, description: str | None = None):
    """An admin column showing the amount ``field`` with the row's currency ("12.34 USD"), on one line."""

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def display(self, obj):
        return nowrap(format_amount(getattr(obj, field), obj.currency))

    return display


def account_display():
    """An admin column linking to the row's account by its name, ordered by that name."""

    @admin.display(description="account", ordering="account__name")
    def display(self, obj):
        return admin_link(obj.account, obj.account.name)

    return display


def last_line(text: str, default: str = "") -> str:
    """The last line of an error as stored (a traceback ends with its exception), or ``default``."""
    text = text.strip()
    return text.splitlines()[-1] if text else default


def when(value) -> str:
    """A time as support reads it in a list or a table: local, to the minute; "-" for none."""
    return f"{timezone.localtime(value):%Y-%m-%d %H:%M}" if value else "-"


def when_display(field: str, description: str | None = None):
    """An admin column showing the time ``field`` compactly (``when``), ordered by it."""

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def display(self, obj):
        return when(getattr(obj, field))

    return display


def table(table_id: str, headers: tuple[str, ...], rows: list[tuple], *, total: int | None = None, all_url=""):
    """A read-only HTML table (``id=table_id``) of ``rows``; None when there are none.

    With ``total`` larger than the rows shown, a link to the list of all of them follows.
    """
    if not rows:
        return None
    head = format_html_join("", "<th>{}</th>", ((header,) for header in headers))
    cells = "".join("<td>{}</td>" for _ in headers)
    body = format_html_join("", f"<tr>{cells}</tr>", (tuple("-" if v in (None, "") else v for v in r) for r in rows))
    html = format_html('<table id="{}"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>', table_id, head, body)
    if total is not None and total > len(rows) and all_url:
        html = format_html('{}<p><a href="{}">All {} →</a></p>', html, all_url, total)
    return html

"""The admin support staff work in (DESIGN.md, "Who uses it").

Support finds a customer by e-mail or by any Stripe id, reads the subscription, invoices,
renewals, disputes and the raw events behind them with their history, and fixes things through
actions (re-process an event, send an owed e-mail), never by typing over what Stripe said.
Mirrored rows are read-only (``base.StripeMirrorAdmin``); one module per area:

* ``base``: read-only mirrors, dashboard and admin links, money with its currency;
* ``accounts``: accounts (the hub) and their entitlements, provisioning's models shown with
  billing's mirror (so provisioning's own admin needs nothing from billing);
* ``subscriptions``: subscriptions and their renewals;
* ``invoices``: invoices and their lines, and the disputes of their payments;
* ``payments`` / ``disputes``: payments, refunds and disputes;
* ``inbox`` / ``outbox``: the events Stripe sent, the e-mails the app owes.

Stripe ids are searched exactly (``=``, case-insensitive): a pasted id finds its row, and "in_"
does not find every invoice. Names, e-mails and invoice numbers match in part.

Every changelist selects or annotates what its columns show: a list costs the same number of
queries for 3 rows as for 30 (see tests/test_admin.py).
"""

from . import accounts, disputes, inbox, invoices, outbox, payments, subscriptions  # noqa: F401  (registers)
from .base import (  # noqa: F401  (the building blocks, for admin modules of other apps built on billing)
    ReadOnlyInline,
    StripeMirrorAdmin,
    WebhookOwnedAdminMixin,
    admin_link,
    money_display,
    stripe_dashboard_link,
)

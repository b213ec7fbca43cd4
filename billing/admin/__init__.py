"""The admin support staff work in (DESIGN.md, "Who uses it"; README, "Support staff").

Support finds a customer by e-mail or by any Stripe id, reads the account's page (the hub: its
subscriptions, entitlements, invoices, renewals, disputes and recent events), the invoice's page
(its payments, refunds, disputes and receipts) and the raw events behind them with their
history, and fixes things through support actions, never by typing over what Stripe said:
re-process an event, re-sync a subscription or an invoice from Stripe, resend a receipt, send an
owed e-mail now. Each action has a permission of its own, held by the "Billing support" group.

One module per area:

* ``base``: read-only mirrors, put together from
  ``display`` (links that follow the object's livemode, money with its currency, tables),
  ``lists`` (what a list accepts from its address: never a 500),
  ``search`` (any pasted Stripe id, matched exactly) and
  ``actions`` (support actions: a button and a list action, behind a confirmation page);
* ``accounts``: accounts (the hub) and their entitlements, provisioning's models shown with
  billing's mirror (so provisioning's own admin needs nothing from billing);
* ``subscriptions``: subscriptions and their renewals; re-sync;
* ``invoices``: invoices, their lines, payments, refunds, disputes and receipts; re-sync, resend;
* ``payments`` / ``disputes``: payments, refunds and disputes;
* ``inbox`` / ``outbox``: the events Stripe sent (re-process), the e-mails the app owes (send now);
* ``site``: the admins of other apps (users, groups, tokens, members), given the same list checks.

Every changelist selects or annotates what its columns show: a list costs the same number of
queries for 3 rows as for 30 (see tests/test_admin.py).
"""

from . import accounts, disputes, inbox, invoices, outbox, payments, site, subscriptions  # noqa: F401  (registers)

site.check_every_list()  # last: after every app's admin, and billing's own, is registered

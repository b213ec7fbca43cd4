"""Billing services: the changes a Stripe event makes, one module per domain area.

Handlers (``billing.webhook.handlers``) call these inside the inbox's transaction; the admin,
the commands and the tasks call the same functions. Every service takes its locks at its top,
through the helpers of ``billing.services.locks``, in the one order that module states; then it
reads and writes through the ORM. Each is written so that its end state depends on *what* has
been delivered, not on the order it came in:

* ``accounts``: which account a Stripe customer is (created when first seen, merged at checkout);
* ``subscriptions``: the subscription mirror, and the entitlements and renewals derived from it;
* ``renewals``: planned renewals, linked to the invoices that pay for them, processed once;
* ``invoices``: the invoice mirror, a paid invoice settled once, the e-mails invoices owe;
* ``payments``: which PaymentIntent paid which invoice, and what was refunded of it.
* ``disputes``: the dispute mirror, shown to support on its invoice and account.
"""

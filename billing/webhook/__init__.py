"""The way of one Stripe event, one module per step, in the order it travels:

1. ``views``: ``POST /billing/stripe/webhook/``; method, size, signature, JSON, envelope.
2. ``inbox``: store the event once, apply it once in one transaction, record the outcome.
3. ``registry``: which handler an event type has.
4. ``handlers``: one short function per event type, calling ``billing.services``.
"""

"""Offline Stripe: objects in Stripe's current shape, realistic lifecycles, signed delivery.

``objects`` builds single objects and event envelopes, ``lifecycles`` strings them into what
Stripe sends over a customer's life (``clock`` places it in time: the command makes it end now),
``delivery`` signs and posts them as Stripe's webhook sender does. The
``simulate_stripe_events`` management command puts them together; tests use the same
functions, so one body of code says what a Stripe payload looks like.
"""

from .objects import API_VERSION

__all__ = ["API_VERSION"]

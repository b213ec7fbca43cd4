"""Errors a service raises to fail an event on purpose (the inbox records and answers them)."""


class PrerequisiteMissing(Exception):
    """The event needs a row that a later delivery will bring (e.g. its subscription).

    Raised by a service to fail the event *on purpose*: nothing is applied, the answer is
    non-2xx, and Stripe's retry (or an operator's re-process) applies it once the
    prerequisite has arrived. See docs/decisions/0003-retry-policy.rst.
    """

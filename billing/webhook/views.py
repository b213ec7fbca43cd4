"""``POST /billing/stripe/webhook/``: check what Stripe sent, then hand it to the inbox.

Order of checks, cheapest and most hostile first: method, size, signature (over the raw
bytes, before anything is parsed), JSON, envelope. Every rejection is a 4xx that stores
nothing; only a validly signed event whose handler fails is answered 500.
https://docs.stripe.com/webhooks#verify-events
"""

import json
import logging

import stripe
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import DatabaseError, DataError
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from ..stripe_payloads import envelope_problem
from . import inbox

logger = logging.getLogger(__name__)


def _reject(status: int, reason: str) -> JsonResponse:
    logger.warning("stripe webhook rejected (%s): %s", status, reason)
    return JsonResponse({"error": reason}, status=status)


def signature_is_valid(payload: str, header: str) -> bool:
    """True if ``header`` signs ``payload`` with any configured secret within the tolerance.

    Several secrets are accepted at once so that an endpoint secret can be rolled without
    losing events: https://docs.stripe.com/webhooks#roll-endpoint-secrets
    """
    for secret in settings.STRIPE_WEBHOOK_SECRETS:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, settings.STRIPE_WEBHOOK_TOLERANCE)
            return True
        except stripe.SignatureVerificationError:
            continue
    return False


@csrf_exempt
@require_POST
def stripe_webhook(request):
    limit = settings.STRIPE_WEBHOOK_MAX_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _reject(400, "invalid Content-Length")
    if declared > limit:
        return _reject(413, f"body larger than {limit} bytes")
    body = request.read(limit + 1)
    if len(body) > limit:
        return _reject(413, f"body larger than {limit} bytes")

    header = request.headers.get("Stripe-Signature")
    if not header:
        return _reject(400, "missing Stripe-Signature header")
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        return _reject(400, "body is not UTF-8")
    if not settings.STRIPE_WEBHOOK_SECRETS:
        logger.error("STRIPE_WEBHOOK_SECRETS is empty: cannot verify any event")
        return _reject(400, "no webhook secret configured")
    if not signature_is_valid(payload, header):
        return _reject(400, "invalid signature")

    try:
        event = json.loads(payload)
    except ValueError:
        return _reject(400, "malformed JSON")
    problem = envelope_problem(event)
    if problem:
        return _reject(400, problem)

    # Stripe is nobody's session: the history rows the handler writes have no user, known
    # without loading a session for the lazy ``request.user`` (a lookup per request otherwise).
    request.user = AnonymousUser()
    try:
        outcome = inbox.receive(event, payload)
    except DataError:
        # A value PostgreSQL cannot hold (\u0000 in a string, NaN): the same body would fail
        # on every retry, so it is bad input, not an outage. Nothing was stored.
        return _reject(400, "the event contains values that cannot be stored")
    except DatabaseError:
        # The database itself failed (not a handler): nothing was stored; Stripe will retry.
        logger.exception("stripe event %s could not be stored", event["id"])
        return JsonResponse({"id": event["id"], "status": "error"}, status=503)
    return JsonResponse({"id": outcome.event_id, "status": outcome.status}, status=outcome.http_status)

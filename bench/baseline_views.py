"""The two baselines the pipeline is measured against (served beside it, same middleware).

* ``bare``: Django answering 200 and nothing else: the ceiling of this server set-up.
* ``minimal``: the least any correct webhook must do: verify the signature with stripe-python,
  parse the JSON for the event id, and in ONE transaction INSERT the event and UPDATE its
  status (raw SQL, no ORM), then answer 200. The table is ``bench_minimal_event``, created by
  the harness (``bench.server.MINIMAL_TABLE_SQL``), not by a migration.
"""

import json

import stripe
from django.conf import settings
from django.db import connection, transaction
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

INSERT = (
    "INSERT INTO bench_minimal_event (id, type, payload, status, received_at) "
    "VALUES (%s, %s, %s, 'received', now()) ON CONFLICT (id) DO NOTHING"
)
UPDATE = "UPDATE bench_minimal_event SET status = 'processed', processed_at = now() WHERE id = %s"


@csrf_exempt
def bare(request):
    return HttpResponse(b"ok", content_type="text/plain")


@csrf_exempt
def minimal(request):
    if request.method != "POST":
        return HttpResponse(status=405)
    body = request.body
    header = request.headers.get("Stripe-Signature")
    for secret in settings.STRIPE_WEBHOOK_SECRETS:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, settings.STRIPE_WEBHOOK_TOLERANCE)
            break
        except stripe.SignatureVerificationError:
            continue
    else:
        return HttpResponse(b"bad signature", status=400, content_type="text/plain")
    try:
        event = json.loads(body)
        event_id, event_type = event["id"], event["type"]
    except (ValueError, KeyError, TypeError):
        return HttpResponse(b"bad event", status=400, content_type="text/plain")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(INSERT, [event_id, event_type, body.decode()])
        cursor.execute(UPDATE, [event_id])
    return HttpResponse(b"ok", content_type="text/plain")

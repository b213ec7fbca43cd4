"""A local HTTP server that answers like Stripe's API, for stripe-python to call for real.

Only the endpoints the app uses: ``GET /v1/events`` (list, newest first, ``created[gte]``,
``types[]``, ``starting_after``, ``limit``), ``GET /v1/invoice_payments``
(``payment[payment_intent]``), and ``GET /v1/subscriptions/<id>`` / ``GET /v1/invoices/<id>``
(the objects a test put in ``subscriptions`` / ``invoices``, keyed by id; an unknown id gets
Stripe's 404 ``resource_missing``). Requests are recorded so tests can assert what was asked.
Every answer carries ``Request-Id`` and ``Date`` headers, as Stripe's do.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeStripe:
    def __init__(self, api_key: str = "sk_test_local"):
        self.api_key = api_key
        self.events: list[dict] = []
        self.invoice_payments: list[dict] = []
        self.subscriptions: dict[str, dict] = {}  # id -> subscription object (billing.simulation.objects)
        self.invoices: dict[str, dict] = {}  # id -> invoice object
        self.requests: list[tuple[str, dict]] = []
        self.fail_next: int = 0  # answer this many requests with 500 first
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_local{len(fake.requests):06d}")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                query = parse_qs(url.query)
                fake.requests.append((url.path, query))
                if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._send(401, {"error": {"type": "invalid_request_error", "message": "Invalid API Key"}})
                if fake.fail_next:
                    fake.fail_next -= 1
                    return self._send(500, {"error": {"type": "api_error", "message": "boom"}})
                if url.path == "/v1/events":
                    return self._send(200, fake._list_events(query, url.path))
                if url.path == "/v1/invoice_payments":
                    pi = (query.get("payment[payment_intent]") or [""])[0]
                    data = [p for p in fake.invoice_payments if p["payment"].get("payment_intent") == pi]
                    return self._send(200, {"object": "list", "data": data, "has_more": False, "url": url.path})
                for prefix, objects in (("/v1/subscriptions/", fake.subscriptions), ("/v1/invoices/", fake.invoices)):
                    if url.path.startswith(prefix):
                        found = objects.get(url.path.removeprefix(prefix))
                        if found is None:
                            return self._send(404, fake._missing(url.path.removeprefix(prefix), prefix))
                        return self._send(200, found)
                return self._send(
                    404, {"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}}
                )

        return Handler

    @staticmethod
    def _missing(stripe_id: str, prefix: str) -> dict:
        kind = prefix.strip("/").split("/")[-1].removesuffix("s")
        return {
            "error": {
                "code": "resource_missing",
                "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                "message": f"No such {kind}: '{stripe_id}'",
                "param": "id",
                "type": "invalid_request_error",
            }
        }

    def _list_events(self, query: dict, path: str) -> dict:
        events = sorted(self.events, key=lambda e: (e["created"], e["id"]), reverse=True)
        if "created[gte]" in query:
            events = [e for e in events if e["created"] >= int(query["created[gte]"][0])]
        types = query.get("types[]") or [v for k, vs in query.items() if k.startswith("types[") for v in vs]
        if types:
            events = [e for e in events if e["type"] in types]
        if "starting_after" in query:
            ids = [e["id"] for e in events]
            events = events[ids.index(query["starting_after"][0]) + 1 :]
        limit = int((query.get("limit") or ["10"])[0])
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit, "url": path}

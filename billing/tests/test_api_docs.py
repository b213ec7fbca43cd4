"""The API's description: an OpenAPI schema that validates, and Swagger UI that works offline.

Swagger UI's files come from drf-spectacular-sidecar through the app's static files, so the
docs page names no host but the app's own, and each file it names is served (by the live
server's static handler, as ``runserver`` serves it in ``make run``).
"""

import re
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from django.core.management import call_command
from django.test import Client
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from billing.tests.factories import InvoiceFactory, SubscriptionFactory
from provisioning.tests.factories import AccountFactory, EntitlementFactory, MembershipFactory

# Any URL with a scheme or a network location: http://, https://, //host, ws://, data: is fine.
EXTERNAL = re.compile(r"\b(?:https?|wss?|ftp):|(?<![:\w])//[\w.-]+", re.IGNORECASE)
REFERENCED = re.compile(r'\b(?:src|href)="([^"]*)"')


def test_the_docs_page_names_no_other_host():
    response = Client().get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assert EXTERNAL.findall(page) == []
    references = REFERENCED.findall(page)
    assert any(url.endswith("swagger-ui-bundle.js") for url in references)
    assert all(url.startswith("/static/drf_spectacular_sidecar/") for url in references), references
    assert 'url: "/api/schema/"' in page  # the schema, from this app too
    assert '"validatorUrl": null' in page  # and no badge fetched from swagger.io


def test_the_checker_would_see_a_cdn():
    cdn = '<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>'
    assert EXTERNAL.findall(cdn) == ["https:"]
    assert EXTERNAL.findall('<link href="//unpkg.com/x.css">') == ["//unpkg.com"]


@pytest.mark.django_db(transaction=True)
def test_every_file_of_the_docs_page_is_served_by_the_app(live_server):
    page = urllib.request.urlopen(live_server.url + "/api/docs/", timeout=10).read().decode()
    expected_types = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for url in REFERENCED.findall(page):
        with urllib.request.urlopen(live_server.url + url, timeout=10) as response:
            body = response.read()
            assert response.status == 200
            assert expected_types[Path(url).suffix] in response.headers["Content-Type"]
            assert len(body) > 500, url
    bundle = next(url for url in REFERENCED.findall(page) if url.endswith("swagger-ui-bundle.js"))
    assert b"SwaggerUIBundle" in urllib.request.urlopen(live_server.url + bundle, timeout=10).read()


# --- The schema -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_schema_generates_without_warnings_and_validates(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    assert "/api/billing/invoices/:" in text and "/api/auth/token/:" in text


@pytest.fixture
def served_schema():
    response = Client().get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    validate_schema(schema)  # the OpenAPI 3 meta-schema, with jsonschema
    return schema


def as_json_schema(node, components):
    """OpenAPI 3.0's schema dialect as plain JSON Schema: ``nullable``, and ``$ref`` resolved."""
    if isinstance(node, list):
        return [as_json_schema(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return as_json_schema(components[node["$ref"].rsplit("/", 1)[1]], components)
    converted = {key: as_json_schema(value, components) for key, value in node.items() if key != "nullable"}
    if "oneOf" in converted:
        # A blank URLField is ``oneOf: [uri, maxLength 0]``; jsonschema does not check the ``uri``
        # format without an optional package, so "" would match both branches.
        converted["anyOf"] = converted.pop("oneOf")
    if node.get("nullable"):
        converted = {"anyOf": [converted, {"type": "null"}]}
    return converted


def response_schema(schema, path):
    content = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    return as_json_schema(content, schema["components"]["schemas"])


@pytest.mark.django_db
def test_the_api_answers_as_its_schema_says(served_schema):
    account = AccountFactory()
    subscription = SubscriptionFactory(account=account, stripe_id="sub_schema")
    EntitlementFactory(account=account, stripe_subscription_id="sub_schema")
    InvoiceFactory(subscription=subscription, stripe_subscription_id="sub_schema")
    InvoiceFactory(account=account, stripe_subscription_id="")  # one-off: subscription null
    client = APIClient()
    client.force_authenticate(MembershipFactory(account=account, role="owner").user)

    invoices = client.get("/api/billing/invoices/").json()
    current = client.get("/api/billing/subscription/").json()

    jsonschema.validate(invoices, response_schema(served_schema, "/api/billing/invoices/"))
    jsonschema.validate(current, response_schema(served_schema, "/api/billing/subscription/"))
    assert sorted(row["subscription"] or "" for row in invoices["results"]) == ["", "sub_schema"]
    with pytest.raises(jsonschema.ValidationError):  # the check is strict enough to fail
        jsonschema.validate(
            {**invoices, "results": [{**invoices["results"][0], "total": "20.00"}]},
            response_schema(served_schema, "/api/billing/invoices/"),
        )


def test_the_schema_says_how_to_authenticate(served_schema):
    schemes = served_schema["components"]["securitySchemes"]
    assert schemes["tokenAuth"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": 'Token-based authentication with required prefix "Token"',
    }
    assert "cookieAuth" in schemes
    assert "security" not in served_schema["paths"]["/api/auth/token/"]["post"]  # needs no credentials

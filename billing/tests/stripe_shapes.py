"""Check built payloads against Stripe's own example objects (``data/stripe_fixtures3.json``).

A payload that carries a key Stripe's object does not have proves nothing about the app: the
app may read a field Stripe never sends. So every key of a built object must exist at the same
place in the fixture of its resource, and where the fixture's value is not null, the built
value must have the same JSON type (an id may stand for an object: expandable fields,
https://docs.stripe.com/api/expanding_objects).

Nested Stripe objects are checked against their own resource when the fixture has no example
of them at that place (null, a bare id, or another resource, as in an event's ``data.object``).
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES: dict[str, dict] = json.loads(
    (Path(__file__).parent / "data" / "stripe_fixtures3.json").read_text(encoding="utf-8")
)["resources"]

# Optional keys that fixtures3 leaves out (it shows required properties only) but Stripe sends;
# each is declared on the stripe-python class named beside it (a test checks that).
OPTIONAL_KEYS: dict[tuple[str, str], str] = {
    ("event", "data.previous_attributes"): "stripe.Event.Data",
    ("invoice_payment", "payment.payment_intent"): "stripe.InvoicePayment.Payment",
}


def key_problems(obj: dict, resource_name: str) -> list[str]:
    """Every key of ``obj`` that is not in the fixture of ``resource_name``, or has another type there."""
    problems: list[str] = []
    _check_object(obj, FIXTURES[resource_name], resource_name, resource_name, "", problems)
    if resource_name == "event" and isinstance((obj.get("data") or {}).get("previous_attributes"), dict):
        # Old values of the changed fields: keys of the same resource as data.object.
        nested = obj["data"]["object"].get("object")
        if isinstance(nested, str) and nested in FIXTURES:
            _check_object(
                obj["data"]["previous_attributes"],
                FIXTURES[nested],
                nested,
                "event.data.previous_attributes",
                "",
                problems,
            )
    return problems


def assert_keys_exist(obj: dict, resource_name: str) -> None:
    problems = key_problems(obj, resource_name)
    assert not problems, f"{obj.get('object')} {obj.get('id')}:\n  " + "\n  ".join(problems)


def _check_object(built: dict, example: dict, resource: str, shown: str, path: str, problems: list[str]):
    for key, value in built.items():
        where = f"{path}.{key}" if path else key
        if key not in example:
            if (resource, where) not in OPTIONAL_KEYS:
                problems.append(f"{shown}.{key}: no such key in fixture {resource!r} ({where})")
            continue
        _check_value(value, example[key], resource, f"{shown}.{key}", where, problems)


def _check_value(value, example, resource: str, shown: str, path: str, problems: list[str]):
    if value is None:
        return
    if isinstance(value, dict):
        nested = value.get("object") if isinstance(value.get("object"), str) else None  # event.data has a dict there
        same_resource_example = isinstance(example, dict) and example.get("object") == nested
        if nested in FIXTURES and not same_resource_example:
            _check_object(value, FIXTURES[nested], nested, shown, "", problems)
        elif isinstance(example, dict):
            _check_object(value, example, resource, shown, path, problems)
        elif example is not None:
            problems.append(f"{shown}: an object here, {type(example).__name__} in the fixture")
        elif value:  # an empty object (metadata) has no key to check
            problems.append(f"{shown}: an object with keys here, null in the fixture and not a known resource")
    elif isinstance(value, list):
        if example is not None and not isinstance(example, list):
            problems.append(f"{shown}: a list here, {type(example).__name__} in the fixture")
            return
        item_example = example[0] if example else None
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                _check_value(item, item_example, resource, f"{shown}[{index}]", f"{path}[]", problems)
    elif example is not None and _json_type(value) != _json_type(example):
        if not (isinstance(value, str) and isinstance(example, dict) and "id" in example):  # unexpanded id
            problems.append(f"{shown}: {_json_type(value)} here, {_json_type(example)} in the fixture")


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", dict: "object", list: "array"}.get(type(value), type(value).__name__)

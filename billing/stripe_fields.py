"""Typed access to the fields of a Stripe JSON object, for the payload readers of ``billing.stripe_payloads``.

Each function reads one field as the JSON type the app needs, and refuses any other (a value of
another type, out of range, or too long for its column) with a ``PayloadError`` that names the
object and the field. So a verified event of the wrong shape fails in its reader, before its
handler writes anything, with an error an operator can act on, instead of a ``TypeError`` or a
database error half-way through (``billing/tests/test_webhook_fuzz.py`` fuzzes every handled
event type to hold them to it).

``path`` is a key or a dotted path of keys ("status_transitions.paid_at"). An absent field and
null read as "not given". These run for every field of every event, and of every stored invoice
the renewal backfill reads: the usual case is checked first, and a plain key is looked up
without splitting it.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any


class PayloadError(ValueError):
    """The payload lacks something this app needs, or holds a value of the wrong type or range.

    The event fails with this message (``billing.webhook.inbox``). It names the object and the
    field ("invoice in_123: status_transitions.paid_at is a string, not a unix timestamp"),
    never the value: payloads stay out of the logs.
    """


# What the mirror can hold.
MAX_ID_LENGTH = 200  # Stripe's ids are under 70 characters; keys built from one (an owed e-mail's
# "payment_failed:<invoice id>:<attempt>", a payment's "charge:<id>") must fit 255-character columns.
MAX_MONEY = 2**63 - 1  # amounts: BigIntegerField
MAX_COUNT = 2**31 - 1  # quantities and counts: PositiveIntegerField
ANY_LENGTH = sys.maxsize  # a text kept whole (a name, a description)
MAX_EMAIL_LENGTH = 254  # RFC 5321: a longer address cannot receive mail, so it is read as absent
LAST_TIMESTAMP = 32503679999  # 2999-12-31T23:59:59Z: any real period, with room for date arithmetic
EPOCH = datetime.fromtimestamp(0, UTC)  # a timestamp of 0 (a dispute's ``due_by``: no deadline)


def _kind(value: Any) -> str:
    """The JSON type of ``value``, as an error message says it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    for kind, said in ((str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return said
    return type(value).__name__


def name_of(obj: dict) -> str:
    """How an error names ``obj``: its type and id ("invoice in_123"), when they are plain strings."""
    kind, oid = obj.get("object"), obj.get("id")
    kind = kind if isinstance(kind, str) and len(kind) <= 40 and kind.isprintable() else "object"
    oid = oid if isinstance(oid, str) and 0 < len(oid) <= MAX_ID_LENGTH and oid.isprintable() else "?"
    return f"{kind} {oid}"


def _wrong(obj: dict, path: str, value: Any, expected: str) -> PayloadError:
    return PayloadError(f"{name_of(obj)}: {path} is {_kind(value)}, not {expected}")


@lru_cache(maxsize=1024)  # bounded: a path may hold a payload's own word (its line's parent type)
def _keys(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _field(obj: dict, path: str) -> Any:
    """The value at a dotted ``path`` (None if absent). Callers look a plain key up themselves:
    this runs for every field of every event, and of every stored invoice the backfill reads."""
    node: Any = obj
    keys = _keys(path)
    for depth, key in enumerate(keys):
        if not isinstance(node, dict):
            if node is None:
                return None
            raise _wrong(obj, ".".join(keys[:depth]), node, "an object")
        node = node.get(key)
    return node


def text(obj: dict, path: str, *, required: bool = False, max_length: int = MAX_ID_LENGTH) -> str:
    """A string field ("" if absent); ``max_length``: the longest the mirror keeps (``ANY_LENGTH``)."""
    value = _field(obj, path) if "." in path else obj.get(path)
    if type(value) is str and 0 < len(value) <= max_length:
        return value  # the usual case first: every field of every event, every invoice the backfill reads
    if value is None or value == "":
        if required:
            raise PayloadError(f"{name_of(obj)} has no {path}")
        return ""
    if type(value) is not str:
        raise _wrong(obj, path, value, "a string")
    raise PayloadError(f"{name_of(obj)}: {path} is longer than {max_length} characters")


def require(obj: dict, key: str, *, max_length: int = MAX_ID_LENGTH) -> str:
    """A string field that must be there (an id, a status)."""
    return text(obj, key, required=True, max_length=max_length)


def email(obj: dict, path: str) -> str:
    """An e-mail address ("" if absent, or too long to be one)."""
    value = text(obj, path, max_length=ANY_LENGTH)
    return value if len(value) <= MAX_EMAIL_LENGTH else ""


def integer(obj: dict, path: str, *, default: Any = 0, minimum: int = -MAX_MONEY - 1, maximum: int = MAX_MONEY):
    """An integer field (``default`` if absent): amounts by default; counts pass ``0..MAX_COUNT``.

    A boolean, a float (even 12.0) or a numeric string is not an integer: Stripe sends none of them.
    """
    value = _field(obj, path) if "." in path else obj.get(path)
    if type(value) is int and minimum <= value <= maximum:
        return value
    if value is None:
        return default
    if type(value) is not int:
        raise _wrong(obj, path, value, "an integer")
    raise PayloadError(f"{name_of(obj)}: {path} is out of range ({minimum} to {maximum})")


def count(obj: dict, path: str, *, default: Any = None):
    """A quantity or a count: an integer from 0 to ``MAX_COUNT`` (``default`` if absent)."""
    return integer(obj, path, default=default, minimum=0, maximum=MAX_COUNT)


def timestamp(obj: dict, path: str) -> datetime | None:
    """A unix timestamp field as an aware UTC datetime (None if absent)."""
    value = _field(obj, path) if "." in path else obj.get(path)
    if type(value) is int and 0 <= value <= LAST_TIMESTAMP:
        return datetime.fromtimestamp(value, UTC)
    if value is None:
        return None
    if type(value) is not int:
        raise _wrong(obj, path, value, "a unix timestamp")
    raise PayloadError(f"{name_of(obj)}: {path} is not a unix timestamp from 1970 to 2999")


def flag(obj: dict, path: str) -> bool:
    """A boolean field (False if absent)."""
    value = _field(obj, path) if "." in path else obj.get(path)
    if value is None:
        return False
    if type(value) is not bool:
        raise _wrong(obj, path, value, "true or false")
    return value


def list_data(obj: dict, path: str) -> list[dict]:
    """The objects of the list object at ``path`` (``{"object": "list", "data": [...]}``)."""
    data = _field(obj, f"{path}.data")
    if data is None:
        return []
    if not isinstance(data, list):
        raise _wrong(obj, f"{path}.data", data, "a list")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise _wrong(obj, f"{path}.data[{index}]", item, "an object")
    return data


def reference(obj: dict, path: str, *, required: bool = False) -> str:
    """The id of an expandable field, whether Stripe sent the id or the expanded object ("" if absent).

    https://docs.stripe.com/api/expanding_objects
    """
    value = _field(obj, path) if "." in path else obj.get(path)
    if isinstance(value, dict):
        value, path = value.get("id"), f"{path}.id"
    if value is None or value == "":
        if required:
            raise PayloadError(f"{name_of(obj)} has no {path}")
        return ""
    if type(value) is not str:
        raise _wrong(obj, path, value, "an id")
    if len(value) > MAX_ID_LENGTH:
        raise PayloadError(f"{name_of(obj)}: {path} is longer than {MAX_ID_LENGTH} characters")
    return value

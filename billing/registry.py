"""Handlers, registered by Stripe event type.

    @handles("invoice.paid")
    def on_invoice_paid(event: Event) -> None: ...

A handler translates a Stripe object into calls of billing and provisioning services. It runs
inside the transaction that also marks the event processed (see ``billing.inbox``): it must not
commit, talk HTTP or send mail; work that must happen after the commit goes through
``transaction.on_commit`` (``billing.outbox`` does that for e-mails).

Handlers are referenced by dotted path as well as by object, so that the system check
``billing.E001`` can prove at start-up that every registered handler still imports and is
callable: a broken handler fails ``manage.py check`` instead of a live webhook.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from .stripe_payloads import Event

Handler = Callable[[Event], None]
AccountOf = Callable[[Event], "str | None"]
FirstRead = Callable[[Event], "tuple[str, list] | None"]
KeyOf = Callable[[Event], "str | None"]

# event type -> dotted path "module:function" of its handler
_registry: dict[str, str] = {}
# dotted path -> resolved callable (filled on first use)
_resolved: dict[str, Handler] = {}
# dotted path -> the Stripe customer whose account lock the handler takes first (see ``handles``)
_account_of: dict[str, AccountOf] = {}
# dotted path -> the handler's first read, sent with that lock (see ``handles``)
_first_read: dict[str, FirstRead] = {}
# dotted path -> the key of the advisory lock the handler takes before the account's (see ``handles``)
_key_of: dict[str, KeyOf] = {}


class RegistryError(RuntimeError):
    pass


def handles(
    *event_types: str, locks_account_of: AccountOf | None = None, reads_first: FirstRead | None = None,
    locks_key_of: KeyOf | None = None,
) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``event_types``.

    ``locks_account_of(event)`` names the Stripe customer whose account lock the handler takes
    before anything else (or None). The inbox then takes that lock in the statement that stores
    the event, and the handler's own request for it costs nothing (``billing.inbox``).

    ``reads_first(event)`` (with ``locks_account_of``) is the handler's first read, as
    ``(select, params)``: the inbox sends it in that same statement and hands the row over
    (``billing.inbox.take_first_read``). The select may use ``locked``, the locked account row.
    It sees the database as the statement began, before any wait for the lock, so it must
    lock (``FOR UPDATE``) every row it reads (a row lock returns the row's newest version), and
    the handler must look again for a row it did not find (it may have been created meanwhile).

    ``locks_key_of(event)`` (with ``locks_account_of``) names a transaction-level advisory lock
    that the handler and writers without the account's lock both take, before any row lock:
    the inbox takes it as the event's row is created, before the account's lock
    (``billing.inbox.holds_key_lock``). The invoice handlers and the payment writer use it.
    """
    if reads_first is not None and locks_account_of is None:
        raise RegistryError(f"{event_types}: reads_first needs locks_account_of (it is sent after that lock)")
    if locks_key_of is not None and locks_account_of is None:
        raise RegistryError(f"{event_types}: locks_key_of needs locks_account_of (it is sent with the INSERT)")

    def decorator(func: Handler) -> Handler:
        path = f"{func.__module__}:{func.__qualname__}"
        register(path, *event_types)
        _resolved[path] = func
        if locks_account_of is not None:
            _account_of[path] = locks_account_of
        if reads_first is not None:
            _first_read[path] = reads_first
        if locks_key_of is not None:
            _key_of[path] = locks_key_of
        return func

    return decorator


def register(path: str, *event_types: str) -> None:
    """Register a handler by dotted path ("package.module:function")."""
    for event_type in event_types:  # check every type first: a refused call registers nothing
        existing = _registry.get(event_type)
        if existing and existing != path:
            raise RegistryError(f"{event_type} already has a handler: {existing}")
    for event_type in event_types:
        _registry[event_type] = path


def unregister(*event_types: str) -> None:
    for event_type in event_types:
        _registry.pop(event_type, None)


def registered_types() -> dict[str, str]:
    return dict(_registry)


def path_for(event_type: str) -> str | None:
    """The dotted path of ``event_type``'s handler, or None."""
    return _registry.get(event_type)


def account_locked_by(path: str, event: Event) -> str | None:
    """The Stripe customer whose account the handler at ``path`` locks first for ``event``."""
    account_of = _account_of.get(path)
    return account_of(event) if account_of is not None else None


def first_read_of(path: str, event: Event) -> tuple[str, list] | None:
    """The first read of the handler at ``path`` for ``event`` (``handles(reads_first=...)``)."""
    first_read = _first_read.get(path)
    return first_read(event) if first_read is not None else None


def key_locked_by(path: str, event: Event) -> str | None:
    """The advisory lock the handler at ``path`` takes first for ``event`` (``handles(locks_key_of=...)``)."""
    key_of = _key_of.get(path)
    return key_of(event) if key_of is not None else None


def resolve(path: str) -> Handler:
    """Import the handler named by ``path``; RegistryError if it is missing or not callable."""
    if path in _resolved:
        return _resolved[path]
    module_name, _, attr = path.partition(":")
    try:
        target = import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"handler {path} cannot be imported: {exc}") from exc
    if not callable(target):
        raise RegistryError(f"handler {path} is not callable")
    _resolved[path] = target
    return target


def handler_for(event_type: str) -> Handler | None:
    path = _registry.get(event_type)
    return resolve(path) if path else None

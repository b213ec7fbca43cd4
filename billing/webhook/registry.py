"""Handlers, registered by Stripe event type.

    @handles("invoice.paid")
    def on_invoice_paid(event: Event) -> None: ...

A handler translates a Stripe object into calls of billing and provisioning services. It runs
inside the transaction that also marks the event processed (see ``billing.webhook.inbox``): it must not
commit, talk HTTP or send mail; work that must happen after the commit goes through
``transaction.on_commit`` (``billing.outbox`` does that for e-mails).

Handlers are referenced by dotted path as well as by object, so that the system check
``billing.E001`` can prove at start-up that every registered handler still imports and is
callable: a broken handler fails ``manage.py check`` instead of a live webhook.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from ..stripe_payloads import Event

Handler = Callable[[Event], None]

# event type -> dotted path "module:function" of its handler
_registry: dict[str, str] = {}
# dotted path -> resolved callable (filled on first use)
_resolved: dict[str, Handler] = {}


class RegistryError(RuntimeError):
    pass


def handles(*event_types: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``event_types``."""

    def decorator(func: Handler) -> Handler:
        path = f"{func.__module__}:{func.__qualname__}"
        register(path, *event_types)
        _resolved[path] = func
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

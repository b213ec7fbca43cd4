"""The handler registry: a handler that cannot run fails ``manage.py check``, not a live webhook."""

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from billing.webhook import handlers, registry
from billing.webhook.registry import RegistryError, handles

# Not handled by the app: safe to register for the length of one test.
TEST_TYPE = "test.registry.event"


@pytest.fixture(autouse=True)
def restore_registry():
    """Every test leaves the registry exactly as the app built it."""
    saved = registry.registered_types()
    yield
    for event_type in registry.registered_types():
        registry.unregister(event_type)
    for event_type, path in saved.items():
        registry.register(path, event_type)


def test_check_passes_with_the_real_registry():
    call_command("check")  # raises SystemCheckError on any error


def test_real_registry_covers_the_lifecycle_event_types():
    types = registry.registered_types()

    for event_type in (
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.trial_will_end",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_failed",
    ):
        assert event_type in types
    assert registry.handler_for("invoice.paid") is handlers.on_invoice_paid


def test_handler_that_cannot_be_imported_fails_the_check():
    registry.register("billing.no_such_module:handler", "test.broken")

    with pytest.raises(SystemCheckError) as failure:
        call_command("check")

    message = str(failure.value)
    assert "billing.E001" in message
    assert "test.broken" in message
    assert "billing.no_such_module:handler" in message


def test_handler_attribute_that_does_not_exist_fails_the_check():
    registry.register("billing.webhook.handlers:on_no_such_event", "test.broken.attribute")

    with pytest.raises(SystemCheckError, match="billing.E001"):
        call_command("check")


def test_handler_that_is_not_callable_fails_the_check():
    registry.register("billing.webhook.handlers:__doc__", "test.not.callable")  # a module's docstring: a str

    with pytest.raises(SystemCheckError) as failure:
        call_command("check")

    assert "billing.E001" in str(failure.value)
    assert "not callable" in str(failure.value)


def test_check_passes_again_once_the_broken_handler_is_unregistered():
    registry.register("billing.no_such_module:handler", "test.broken")
    registry.unregister("test.broken")

    call_command("check")


def test_handles_refuses_a_second_handler_for_the_same_type():
    @handles(TEST_TYPE)
    def first(event):
        return None

    with pytest.raises(RegistryError, match="already has a handler"):

        @handles(TEST_TYPE)
        def second(event):
            return None

    assert registry.handler_for(TEST_TYPE) is first


def test_handles_refuses_a_second_handler_for_a_type_the_app_handles():
    with pytest.raises(RegistryError):

        @handles("invoice.paid")
        def rogue(event):
            return None

    assert registry.handler_for("invoice.paid") is handlers.on_invoice_paid


def test_refused_registration_registers_none_of_its_types():
    """``handles("a", "taken")`` must not leave "a" registered to a handler that was refused."""
    with pytest.raises(RegistryError):

        @handles(TEST_TYPE, "invoice.paid")
        def half_registered(event):
            return None

    assert TEST_TYPE not in registry.registered_types()
    call_command("check")


def test_registering_the_same_handler_again_is_allowed():
    """Module reloads re-run the decorators: the same path for the same type is not a conflict."""
    path = registry.registered_types()["invoice.paid"]

    registry.register(path, "invoice.paid")

    assert registry.registered_types()["invoice.paid"] == path

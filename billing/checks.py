"""System checks: a handler that cannot run must fail ``manage.py check``, not a webhook."""

from django.core import checks

from .webhook import registry


@checks.register(checks.Tags.compatibility, deploy=False)
def check_handler_registry(app_configs=None, **kwargs):
    errors = []
    for event_type, path in sorted(registry.registered_types().items()):
        try:
            registry.resolve(path)
        except registry.RegistryError as exc:
            errors.append(
                checks.Error(
                    f"The handler of {event_type} is broken: {exc}",
                    hint="Fix the import, or unregister the event type.",
                    obj=path,
                    id="billing.E001",
                )
            )
    return errors


@checks.register(checks.Tags.security, deploy=True)
def check_webhook_secrets(app_configs=None, **kwargs):
    from django.conf import settings

    if not settings.STRIPE_WEBHOOK_SECRETS:
        return [
            checks.Warning(
                "STRIPE_WEBHOOK_SECRETS is empty: every webhook delivery will be rejected.",
                hint="Set it to the endpoint's signing secret(s), comma-separated (whsec_...).",
                id="billing.W001",
            )
        ]
    return []

from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing (Stripe mirror)"

    def ready(self):
        # Registers the handlers (decorators run on import) and the registry's system check.
        from . import checks  # noqa: F401
        from .webhook import handlers  # noqa: F401

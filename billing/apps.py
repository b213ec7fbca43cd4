import functools

from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing (Stripe mirror)"

    def ready(self):
        # Registers the handlers (decorators run on import) and the registry's system check.
        from . import checks  # noqa: F401
        from .webhook import handlers  # noqa: F401

        _cache_history_manager_classes()


def _cache_history_manager_classes():
    """Build simple-history's manager class once per model instead of on every save.

    ``HistoryDescriptor.__get__`` calls ``Manager.from_queryset(...)``, which creates a class
    (and walks the queryset's members with ``inspect``) each time a historical record is
    written: 0.4 ms of every webhook that saves a row, by profile. The class it builds depends
    only on the two classes, so it is cached; behaviour is unchanged.
    """

    from simple_history import models as history_models

    if getattr(history_models.HistoryDescriptor, "_billing_cached", False):
        return

    @functools.cache
    def manager_class(manager, queryset):
        return manager.from_queryset(queryset)

    def __get__(self, instance, owner):
        return manager_class(self.manager_class, self.queryset_class)(self.model, instance)

    history_models.HistoryDescriptor.__get__ = __get__
    history_models.HistoryDescriptor._billing_cached = True

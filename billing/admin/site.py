"""The admin site as a whole: the admins of other apps get the list checks every billing list has.

Django's users and groups, DRF's tokens and provisioning's members are registered by their own
apps, whose lists trust their address as Django's do (``?username__regex=(`` answers 500).
Each is registered again here, as the same admin with ``CheckedListMixin`` (``lists``) mixed
in, so that no list of this site answers 500 to what its address says. billing's admin is
loaded after theirs (``billing`` comes last in ``INSTALLED_APPS``), so they are all registered by
then. Support staff belong to the "Billing support" group (migration
``billing.0008_billing_support_group``).
"""

from django.contrib import admin

from .lists import CheckedListMixin


def check_every_list(site: admin.AdminSite = admin.site) -> None:
    """Register every model admin of ``site`` that does not check its list again, with the checks."""
    for model, model_admin in list(site._registry.items()):
        if isinstance(model_admin, CheckedListMixin):
            continue
        cls = type(model_admin)
        checked = type(cls.__name__, (CheckedListMixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        site.unregister(model)
        site.register(model, checked)

"""factory-boy factories for provisioning's rows (and the Django users that belong to accounts).

Defaults are realistic and minimal: every row is valid and unique on its own, and nothing more.
A test passes the fields it depends on explicitly, even when they equal a default.

    account = AccountFactory(name="Acme", billing_email="billing@acme.example")
    MembershipFactory(account=account, role=Membership.Role.OWNER)
    EntitlementFactory(account=account, kind=Entitlement.Kind.TRIAL, seats=3)
    UserFactory(superuser=True)               # staff and superuser, for the admin
    UserFactory(password="pw")                # a usable password, for client.login()

billing's factories build on these; these never import billing.
"""

from datetime import timedelta

import factory
from django.conf import settings
from django.utils import timezone
from factory.django import DjangoModelFactory, Password

from provisioning.models import Account, Entitlement, Membership


def stripe_id_sequence(prefix: str):
    """Unique ids in Stripe's format (``cus_00000000000001``), one sequence per factory."""
    return factory.Sequence(lambda n: f"{prefix}_{n:014d}")


def now():
    """An aware UTC datetime, to the second (Stripe's timestamps are whole seconds)."""
    return timezone.now().replace(microsecond=0)


class UserFactory(DjangoModelFactory):
    """A Django user with an e-mail. Without ``password=...`` its password is unusable (as
    ``create_user`` without one makes it): tests use ``client.force_login``. Pass a password for
    ``client.login`` (it is hashed like ``set_password`` does)."""

    class Meta:
        model = settings.AUTH_USER_MODEL

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = Password(None)  # make_password(None): an unusable password

    class Params:
        staff = factory.Trait(is_staff=True)
        superuser = factory.Trait(is_staff=True, is_superuser=True)


class AccountFactory(DjangoModelFactory):
    """An account already known to Stripe as a customer. For one that checkout has not linked
    yet, pass ``stripe_customer_id=None``."""

    class Meta:
        model = Account

    name = factory.Sequence(lambda n: f"Account {n}")
    stripe_customer_id = stripe_id_sequence("cus")


class MembershipFactory(DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    account = factory.SubFactory(AccountFactory)
    role = Membership.Role.MEMBER


class EntitlementFactory(DjangoModelFactory):
    """A paid window of one seat, in force now for a month.

    Its default ``stripe_subscription_id`` names no subscription billing's factories make
    (``sub_entitled...``); a test about a subscription's entitlement passes that subscription's id.
    """

    class Meta:
        model = Entitlement

    account = factory.SubFactory(AccountFactory)
    kind = Entitlement.Kind.PAID
    seats = 1
    starts_at = factory.LazyFunction(now)
    expires_at = factory.LazyAttribute(lambda o: o.starts_at + timedelta(days=30))
    stripe_subscription_id = factory.Sequence(lambda n: f"sub_entitled{n:06d}")

"""The account owner's view of billing: its invoices and its subscription.

Only owners and admins of an account see its billing. A user who administers several accounts
names one with ``?account=<id>``.
"""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics
from rest_framework.exceptions import PermissionDenied, ValidationError

from billing.models import Invoice, Subscription
from provisioning.models import Account, Membership
from provisioning.selectors import current_entitlement

from .serializers import InvoiceSerializer, SubscriptionSerializer

ACCOUNT_PARAM = OpenApiParameter(
    "account", int, description="The account, when the caller administers several.", required=False
)


def billing_account_of(request) -> Account:
    memberships = Membership.objects.filter(
        user=request.user, role__in=[Membership.Role.OWNER, Membership.Role.ADMIN]
    ).select_related("account")
    wanted = request.query_params.get("account")
    if wanted is not None:
        if not wanted.isdigit():
            raise ValidationError({"account": "must be an account id"})
        memberships = memberships.filter(account_id=int(wanted))
    accounts = [m.account for m in memberships[:2]]
    if not accounts:
        raise PermissionDenied("Only an account's owners and admins can see its billing.")
    if len(accounts) > 1:
        raise ValidationError({"account": "you administer several accounts: name one with ?account=<id>"})
    return accounts[0]


@extend_schema(parameters=[ACCOUNT_PARAM])
class InvoiceList(generics.ListAPIView):
    """Invoices of the caller's account, newest first."""

    serializer_class = InvoiceSerializer

    def get_queryset(self):
        return Invoice.objects.filter(account=billing_account_of(self.request)).order_by("-stripe_created", "-pk")


@extend_schema(parameters=[ACCOUNT_PARAM])
class CurrentSubscription(generics.RetrieveAPIView):
    """The caller's account's subscription (the live one, else the latest) and its entitlement now."""

    serializer_class = SubscriptionSerializer

    def get_object(self):
        self.account = billing_account_of(self.request)
        subscriptions = Subscription.objects.filter(account=self.account)
        return get_object_or_404(subscriptions.order_by("ended_at", "-stripe_created", "-pk")[:1])

    def get_serializer_context(self):
        context = super().get_serializer_context()
        if hasattr(self, "account"):
            context["entitlement"] = current_entitlement(self.account)
        return context

"""The account owner's view of billing: its invoices and its subscription.

Only owners and admins of an account see its billing. A user who administers several accounts
names one with ``?account=<id>``. Callers authenticate with a token (``Authorization: Token
<key>``, the key from ``POST /api/auth/token/``) or with the session of the login page.
"""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, serializers
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import PermissionDenied, ValidationError

from billing.models import Invoice, Subscription
from provisioning.models import Account, Membership
from provisioning.selectors import current_entitlement

from .serializers import InvoiceSerializer, SubscriptionSerializer

ACCOUNT_PARAM = OpenApiParameter(
    "account", int, description="The account, when the caller administers several.", required=False
)

# Any string a caller types: "²" passes str.isdigit() but not int(), and a number past the
# primary key's bigint range would reach PostgreSQL. DRF's field refuses both with a 400.
_ACCOUNT_ID = serializers.IntegerField(min_value=1, max_value=2**63 - 1)


def _account_id(value: str) -> int:
    try:
        return _ACCOUNT_ID.run_validation(value)
    except ValidationError as exc:
        raise ValidationError({"account": exc.detail}) from None


def billing_account_of(request) -> Account:
    memberships = Membership.objects.filter(
        user=request.user, role__in=[Membership.Role.OWNER, Membership.Role.ADMIN]
    ).select_related("account")
    wanted = request.query_params.get("account")
    if wanted is not None:
        memberships = memberships.filter(account_id=_account_id(wanted))
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


class ObtainToken(ObtainAuthToken):
    """The caller's API token, for their username and password (created on the first call, the same after).

    No authentication class: the credentials are in the body, and a browser's session (whose
    CSRF check DRF's session authentication would add) plays no part.
    """

    authentication_classes = ()

    @extend_schema(
        request=AuthTokenSerializer,
        responses=inline_serializer("AuthTokenKey", {"token": serializers.CharField()}),
        auth=[],
        tags=["auth"],
        description="Post your username and password (form or JSON); the answer is your API token. "
        "Send it on every call as `Authorization: Token <token>`. Wrong credentials: 400.",
    )
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)

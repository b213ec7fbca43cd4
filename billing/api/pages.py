"""The page an account owner lands on after signing in at ``/accounts/login/``.

It lists the user's accounts and, where the user is an owner or admin, links to the account's
invoices and subscription in the API (browsable in a signed-in browser). The API itself is the
product; this page only says where it is and how to get a token for scripts.
"""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.urls import reverse

from provisioning.models import Membership

BILLING_ROLES = (Membership.Role.OWNER, Membership.Role.ADMIN)


@login_required
def my_billing(request):
    memberships = Membership.objects.filter(user=request.user).select_related("account").order_by("account__name")
    accounts = [
        {
            "account": membership.account,
            "role": membership.get_role_display(),
            "sees_billing": membership.role in BILLING_ROLES,
        }
        for membership in memberships
    ]
    context = {
        "accounts": accounts,
        "several": sum(1 for row in accounts if row["sees_billing"]) > 1,
        "token_url": request.build_absolute_uri(reverse("api-token")),
        "invoices_url": request.build_absolute_uri(reverse("billing-api-invoices")),
    }
    return render(request, "billing/my_billing.html", context)

"""Accounts and what they are entitled to.

The SaaS asks this app one question, through ``provisioning.selectors``: what may this account
use right now (kind, seats, until when)? Entitlements answer it; billing handlers create and
adjust them through ``provisioning.services`` and nothing else writes them.
"""

from django.conf import settings
from django.db import models
from simple_history.models import HistoricalRecords


class Account(models.Model):
    """A customer organisation, known to Stripe as one customer."""

    name = models.CharField(max_length=255)
    stripe_customer_id = models.CharField(
        max_length=255,
        unique=True,
        null=True,
        blank=True,
        help_text="Stripe's customer id (cus_...). Null until a checkout or an event names it; "
        "one account per customer, always.",
    )
    billing_email = models.EmailField(
        blank=True, help_text="Where receipts go when the invoice names no customer e-mail."
    )
    default_payment_method_id = models.CharField(
        max_length=255,
        blank=True,
        help_text="The payment method saved by the last succeeded SetupIntent (pm_...).",
    )
    payment_method_added_at = models.DateTimeField(
        null=True, blank=True, help_text="When a payment method was last put on file."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    history = HistoricalRecords()

    class Meta:
        ordering = ["name", "pk"]

    def __str__(self):
        return f"{self.name} ({self.stripe_customer_id or 'no Stripe customer'})"

    @property
    def has_payment_method(self) -> bool:
        return bool(self.default_payment_method_id)


class Membership(models.Model):
    """Ties a Django user to an account with a role."""

    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    history = HistoricalRecords()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "account"], name="uniq_membership_user_account")]

    def __str__(self):
        return f"{self.user} is {self.role} of {self.account}"


# What makes an entitlement's window: one row per subscription, kind and start (``uniq_entitlement_window``).
ENTITLEMENT_WINDOW = ("stripe_subscription_id", "kind", "starts_at")


class Entitlement(models.Model):
    """What an account may use for a window of time.

    One row per trial and per paid period of a subscription; the unique constraint on
    (subscription, kind, start) is what makes "a paid period becomes an entitlement exactly
    once" hold even when two deliveries race.
    """

    class Kind(models.TextChoices):
        TRIAL = "trial", "Trial"
        PAID = "paid", "Paid"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="entitlements")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    seats = models.PositiveIntegerField(default=1)
    starts_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    stripe_subscription_id = models.CharField(
        max_length=255, db_index=True, help_text="The Stripe subscription this window belongs to."
    )
    stripe_invoice_id = models.CharField(
        max_length=255, blank=True, help_text="The paid invoice that bought this window (paid only)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    history = HistoricalRecords()

    class Meta:
        ordering = ["starts_at", "pk"]
        constraints = [
            models.UniqueConstraint(fields=ENTITLEMENT_WINDOW, name="uniq_entitlement_window"),
            models.CheckConstraint(
                condition=models.Q(expires_at__gte=models.F("starts_at")), name="entitlement_window_ordered"
            ),
        ]
        indexes = [models.Index(fields=["account", "expires_at"], name="entitlement_account_expiry")]

    def __str__(self):
        return f"{self.kind} x{self.seats} {self.starts_at:%Y-%m-%d}..{self.expires_at:%Y-%m-%d}"

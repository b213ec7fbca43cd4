from rest_framework import serializers

from billing.models import Invoice, Subscription
from provisioning.models import Entitlement


class InvoiceSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="stripe_id", help_text="Stripe's invoice id (in_...).")
    subscription = serializers.SerializerMethodField(
        help_text="Stripe's id of the invoice's subscription (sub_...); null for a one-off invoice."
    )
    created = serializers.DateTimeField(
        source="stripe_created",
        allow_null=True,
        read_only=True,
        help_text="When Stripe created the invoice; null until a snapshot of it has named that time.",
    )

    class Meta:
        model = Invoice
        fields = [
            "id",
            "subscription",
            "number",
            "status",
            "billing_reason",
            "currency",
            "total",
            "amount_due",
            "amount_paid",
            "amount_remaining",
            "amount_refunded",
            "period_start",
            "period_end",
            "paid_at",
            "created",
            "hosted_invoice_url",
            "invoice_pdf",
        ]

    def get_subscription(self, obj) -> str | None:
        # The id the invoice names, kept even before its subscription is mirrored.
        return obj.stripe_subscription_id or None


class EntitlementSerializer(serializers.ModelSerializer):
    class Meta:
        model = Entitlement
        fields = ["kind", "seats", "starts_at", "expires_at"]


class SubscriptionSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="stripe_id", help_text="Stripe's subscription id (sub_...).")
    entitlement = serializers.SerializerMethodField(help_text="What the account may use right now.")

    class Meta:
        model = Subscription
        fields = [
            "id",
            "status",
            "quantity",
            "current_period_start",
            "current_period_end",
            "trial_end",
            "cancel_at_period_end",
            "canceled_at",
            "ended_at",
            "entitlement",
        ]

    def get_entitlement(self, obj) -> EntitlementSerializer(allow_null=True):  # type: ignore[valid-type]
        entitlement = self.context.get("entitlement")
        return EntitlementSerializer(entitlement).data if entitlement else None

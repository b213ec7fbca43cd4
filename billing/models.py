"""The Stripe mirror, the inbox of events, and what the app still owes (e-mails).

Every mirrored row remembers the Stripe ``created`` time of the event that last wrote it
(``last_event_created``): an older snapshot never overwrites a newer one, whatever order
Stripe delivers them in. See docs/decisions/0002-inbox-and-ordering.rst.
"""

from django.conf import settings
from django.db import models
from django.db.models.fields.json import KeyTextTransform, KeyTransform
from django.db.models.functions import Coalesce
from django.db.models.lookups import Exact, In
from simple_history.models import HistoricalRecords

from provisioning.models import Account, Entitlement


def livemode_field():
    """Whether the object lives in Stripe's live mode or its test mode (its dashboard URL differs).

    Set from the object (or its event) by the service that mirrors it; rows mirrored before the
    field existed took it from their events (migration 0007).
    """
    return models.BooleanField(
        default=False, help_text="Stripe's `livemode`: live or test mode (the dashboard link follows it)."
    )


class MirrorFields(models.Model):
    """Bookkeeping common to every row mirrored from a Stripe object."""

    stripe_created = models.DateTimeField(null=True, blank=True, help_text="The object's own `created` in Stripe.")
    last_event_created = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Stripe's `created` of the event whose snapshot last wrote this row; older snapshots are ignored.",
    )
    last_event_id = models.CharField(max_length=255, blank=True, help_text="The event that last wrote this row.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class Subscription(MirrorFields):
    """Mirror of a Stripe subscription (https://docs.stripe.com/api/subscriptions/object)."""

    class Status(models.TextChoices):
        INCOMPLETE = "incomplete"
        INCOMPLETE_EXPIRED = "incomplete_expired"
        TRIALING = "trialing"
        ACTIVE = "active"
        PAST_DUE = "past_due"
        CANCELED = "canceled"
        UNPAID = "unpaid"
        PAUSED = "paused"

    stripe_id = models.CharField(max_length=255, unique=True)
    livemode = livemode_field()
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="subscriptions")
    status = models.CharField(max_length=32, choices=Status.choices)
    quantity = models.PositiveIntegerField(default=1, help_text="Seats: the quantity of the subscription item.")
    price_id = models.CharField(max_length=255, blank=True)
    current_period_start = models.DateTimeField(null=True, blank=True)
    current_period_end = models.DateTimeField(null=True, blank=True)
    trial_start = models.DateTimeField(null=True, blank=True)
    trial_end = models.DateTimeField(null=True, blank=True)
    cancel_at_period_end = models.BooleanField(default=False)
    cancel_at = models.DateTimeField(null=True, blank=True)
    canceled_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    history = HistoricalRecords()

    class Meta:
        ordering = ["-created_at", "pk"]
        permissions = [("resync_subscription", "Can re-sync a subscription from Stripe")]

    def __str__(self):
        return f"{self.stripe_id} ({self.status})"


class Invoice(MirrorFields):
    """Mirror of a Stripe invoice (https://docs.stripe.com/api/invoices/object).

    Money is an integer in the currency's minor unit, always beside ``currency``.
    """

    class Status(models.TextChoices):
        DRAFT = "draft"
        OPEN = "open"
        PAID = "paid"
        UNCOLLECTIBLE = "uncollectible"
        VOID = "void"

    stripe_id = models.CharField(max_length=255, unique=True)
    livemode = livemode_field()
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="invoices")
    subscription = models.ForeignKey(
        Subscription,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="invoices",
        help_text="Null for one-off invoices, and until the subscription itself is mirrored.",
    )
    stripe_subscription_id = models.CharField(
        max_length=255,
        blank=True,
        db_index=True,
        help_text="The subscription the invoice names, kept even before that subscription is mirrored.",
    )
    number = models.CharField(max_length=255, blank=True, help_text="Assigned by Stripe at finalization.")
    status = models.CharField(max_length=16, choices=Status.choices)
    billing_reason = models.CharField(max_length=64, blank=True)
    currency = models.CharField(max_length=3)
    total = models.BigIntegerField(default=0)
    amount_due = models.BigIntegerField(default=0)
    amount_paid = models.BigIntegerField(default=0)
    amount_remaining = models.BigIntegerField(default=0)
    amount_refunded = models.BigIntegerField(default=0, help_text="Refunded so far, from charge and refund events.")
    customer_email = models.EmailField(blank=True)
    hosted_invoice_url = models.URLField(max_length=1000, blank=True)
    invoice_pdf = models.URLField(max_length=1000, blank=True)
    period_start = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Service period of the invoice's subscription line (not Stripe's invoice period).",
    )
    period_end = models.DateTimeField(null=True, blank=True)
    line_quantity = models.PositiveIntegerField(
        null=True, blank=True, help_text="Quantity billed on the subscription line for that period."
    )
    paid_at = models.DateTimeField(null=True, blank=True)
    receipt_sent_at = models.DateTimeField(null=True, blank=True)
    lines_digest = models.CharField(
        max_length=32,
        blank=True,
        editable=False,
        help_text="A fingerprint of the lines as last written: a snapshot with the same lines rewrites none.",
    )

    history = HistoricalRecords()

    class Meta:
        ordering = ["-stripe_created", "-pk"]
        indexes = [models.Index(fields=["subscription", "period_start"], name="invoice_sub_period")]
        permissions = [
            ("resync_invoice", "Can re-sync an invoice from Stripe"),
            ("resend_receipt", "Can resend the receipt of a paid invoice"),
        ]

    def __str__(self):
        return self.number or self.stripe_id


class InvoiceLineItem(models.Model):
    """One line of a mirrored invoice (https://docs.stripe.com/api/invoice-line-item/object)."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    stripe_id = models.CharField(max_length=255)
    description = models.TextField(blank=True)
    currency = models.CharField(max_length=3)
    amount = models.BigIntegerField(default=0)
    quantity = models.PositiveIntegerField(null=True, blank=True)
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True)
    parent_type = models.CharField(
        max_length=64, blank=True, help_text="subscription_item_details or invoice_item_details."
    )
    stripe_subscription_id = models.CharField(max_length=255, blank=True)
    price_id = models.CharField(max_length=255, blank=True)
    proration = models.BooleanField(default=False)

    history = HistoricalRecords()

    class Meta:
        ordering = ["invoice", "pk"]
        constraints = [models.UniqueConstraint(fields=["invoice", "stripe_id"], name="uniq_invoice_line")]

    def __str__(self):
        return self.stripe_id


class Renewal(models.Model):
    """One planned move of a subscription into its next paid period.

    Created ahead of time by provisioning (at trial start: effective at ``trial_end``; after
    each paid period: effective at its end), linked to the invoice that pays for it, and
    processed exactly once when that invoice is paid. See
    docs/decisions/0001-invoice-to-renewal-matching.rst.
    """

    # No index of its own: uniq_renewal_effective_date's index starts with subscription_id.
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="renewals", db_index=False)
    effective_date = models.DateTimeField(
        null=True,
        blank=True,
        help_text="The instant (UTC) the new period starts: trial_end, or the end of the paid period before.",
    )
    # Unique through uniq_renewal_stripe_invoice_id (Meta): unique=True would add a second,
    # varchar_pattern_ops index on PostgreSQL for LIKE queries nobody makes.
    stripe_invoice_id = models.CharField(
        max_length=255,
        null=True,
        blank=True,
        help_text="The invoice that pays for this renewal (in_...). Set once; a conflicting id is ignored.",
    )
    processed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the paid entitlement was granted; set once, never cleared."
    )
    from_entitlement = models.ForeignKey(
        Entitlement, on_delete=models.SET_NULL, null=True, blank=True, related_name="renewals_from"
    )
    to_entitlement = models.ForeignKey(
        Entitlement, on_delete=models.SET_NULL, null=True, blank=True, related_name="renewals_to"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # History rows are written once per change and read by renewal (``id``, kept indexed) in
    # the admin; indexes on its other columns cost every write and serve no query.
    history = HistoricalRecords(no_db_index=["subscription", "stripe_invoice_id", "from_entitlement", "to_entitlement"])

    class Meta:
        ordering = ["subscription", "effective_date", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["subscription", "effective_date"], name="uniq_renewal_effective_date"),
            models.UniqueConstraint(fields=["stripe_invoice_id"], name="uniq_renewal_stripe_invoice_id"),
        ]

    def __str__(self):
        return (
            f"renewal of {self.subscription_id} at {self.effective_date:%Y-%m-%d %H:%M}"
            if self.effective_date
            else f"renewal of {self.subscription_id}"
        )


def event_owner():
    """Whose an event's object is: ``data.object.customer`` (``cus_...``), or, for an object that
    names no customer (an invoice payment), the invoice it belongs to (``data.object.invoice``).

    Indexed (``stripeevent_owner``): a customer's id finds all of that customer's events
    (subscriptions, invoices, charges, refunds, checkout sessions, ...) without reading payloads.
    """
    obj = KeyTransform("object", KeyTransform("data", "payload"))
    return Coalesce(KeyTextTransform("customer", obj), KeyTextTransform("invoice", obj))


class StripeEventQuerySet(models.QuerySet):
    """The events behind a row or a customer, found through indexes (never by reading payloads)."""

    def about(self, stripe_id: str) -> "StripeEventQuerySet":
        """Events whose object is ``stripe_id``, or belongs to it (the invoice payments of an invoice)."""
        return self.filter(events_about(stripe_id))

    def of_customer(self, customer_id: str) -> "StripeEventQuerySet":
        """Every event of a customer (``cus_...``); see ``events_of_customer``."""
        return self.filter(events_of_customer(customer_id))


def events_about(stripe_id: str) -> models.Q:
    return models.Q(object_id=stripe_id) | models.Q(Exact(event_owner(), stripe_id))


def events_of_customer(customer_id: str) -> models.Q:
    """Every event of a customer: about the customer itself, about an object that names it
    (subscriptions, invoices, charges, PaymentIntents, checkout sessions, setup intents, recent
    refunds: ``event_owner``), about an invoice payment of one of its invoices, and about a
    refund or dispute of one of its payments (objects that may name no customer).

    The customer's invoice, refund and dispute ids are read first (a few rows, by index), so the
    events are found by the ``object_id`` and ``stripeevent_owner`` indexes alone.
    """
    invoice_ids = list(
        Invoice.objects.filter(account__stripe_customer_id=customer_id).values_list("stripe_id", flat=True)
    )
    payments = Payment.objects.filter(stripe_invoice_id__in=invoice_ids)
    refund_ids = Refund.objects.of_payments(payments).values_list("stripe_id", flat=True)
    dispute_ids = Dispute.objects.of_payments(payments).values_list("stripe_id", flat=True)
    object_ids = [customer_id, *refund_ids, *dispute_ids]
    return models.Q(object_id__in=object_ids) | models.Q(In(event_owner(), [customer_id, *invoice_ids]))


class StripeEvent(models.Model):
    """The inbox: every verified delivery, whatever its fate.

    The primary key is Stripe's event id, so a duplicate delivery finds the row of the first.
    """

    class Status(models.TextChoices):
        RECEIVED = "received"
        PROCESSED = "processed"
        IGNORED = "ignored"
        FAILED = "failed"

    id = models.CharField(primary_key=True, max_length=255, help_text="Stripe's event id (evt_...).")
    type = models.CharField(max_length=255)
    api_version = models.CharField(max_length=64, blank=True)
    livemode = models.BooleanField(default=False)
    created = models.DateTimeField(help_text="Stripe's creation time of the event.")
    object_id = models.CharField(
        max_length=255, blank=True, db_index=True, help_text="`data.object.id`: finds the events behind a row."
    )
    payload = models.JSONField(help_text="The event exactly as Stripe sent it.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    attempts = models.PositiveIntegerField(default=0, help_text="Times a handler ran on this event.")
    last_error = models.TextField(blank=True)
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    objects = StripeEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created", "-received_at"]
        # Every delivery inserts into each of these, so there are as few as the reads need:
        # by type (and its prefix), by object (the admin, seats of a period) and the events still
        # to be settled (failed or received: what operators and the admin look for; processed
        # and ignored rows, nearly all of them, are not in that index at all).
        indexes = [
            models.Index(fields=["type", "created"], name="stripeevent_type_created"),
            models.Index(
                fields=["status", "created"],
                condition=models.Q(status__in=["failed", "received"]),
                name="stripeevent_unsettled",
            ),
            # A customer's events, for support (``billing.admin.inbox``); see ``event_owner``.
            models.Index(event_owner(), name="stripeevent_owner"),
        ]
        permissions = [("reprocess_stripeevent", "Can re-process a Stripe event")]

    def __str__(self):
        return f"{self.id} {self.type} ({self.status})"


class Payment(models.Model):
    """A PaymentIntent that paid (part of) an invoice, and what was refunded of it.

    Since API version 2025-03-31.basil a charge no longer names its invoice; the link comes
    from ``invoice_payment.paid`` events (or Stripe's InvoicePayments API), so refunds can
    arrive before the invoice they belong to is known: they are kept here until it is.
    """

    payment_intent_id = models.CharField(max_length=255, unique=True)
    livemode = livemode_field()
    invoice = models.ForeignKey(Invoice, on_delete=models.SET_NULL, null=True, blank=True, related_name="payments")
    stripe_invoice_id = models.CharField(max_length=255, blank=True, db_index=True)
    charge_id = models.CharField(max_length=255, blank=True, db_index=True)
    currency = models.CharField(max_length=3, blank=True)
    charge_amount_refunded = models.BigIntegerField(
        default=0, help_text="The charge's cumulative `amount_refunded` from charge.refunded."
    )
    last_event_created = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    history = HistoricalRecords()

    def __str__(self):
        return self.payment_intent_id


class OfPaymentQuerySet(models.QuerySet):
    """Refunds or disputes, which name a payment by its PaymentIntent or its charge.

    A refund or dispute belongs to a payment when it names the payment's PaymentIntent or its
    (non-empty) charge: the one rule, read forwards (``of_payments``) and backwards (``payments``).
    """

    def of_payments(self, payments: models.QuerySet) -> "OfPaymentQuerySet":
        """The rows of the PaymentIntents or charges of ``payments`` (a ``Payment`` queryset)."""
        return self.filter(
            models.Q(payment_intent_id__in=payments.values("payment_intent_id"))
            | models.Q(charge_id__in=payments.exclude(charge_id="").values("charge_id"))
        )

    def payments(self) -> models.QuerySet:
        """The payments these rows are about: the rule of ``of_payments``, read backwards."""
        return Payment.objects.filter(
            models.Q(payment_intent_id__in=self.exclude(payment_intent_id="").values("payment_intent_id"))
            | models.Q(charge_id__in=self.exclude(charge_id="").values("charge_id"))
        )


class RefundQuerySet(OfPaymentQuerySet):
    """Refunds, found through their payment as disputes are (``OfPaymentQuerySet``)."""


class Refund(models.Model):
    """Mirror of a Stripe refund (https://docs.stripe.com/api/refunds/object)."""

    stripe_id = models.CharField(max_length=255, unique=True)
    livemode = livemode_field()
    payment_intent_id = models.CharField(max_length=255, blank=True, db_index=True)
    charge_id = models.CharField(max_length=255, blank=True, db_index=True)
    amount = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=32, blank=True)
    last_event_created = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = RefundQuerySet.as_manager()
    history = HistoricalRecords()

    def __str__(self):
        return self.stripe_id


class DisputeQuerySet(OfPaymentQuerySet):
    """Disputes reached through their payment, resolved when asked (docs/decisions/0006-disputes.rst).

    A dispute names its charge and PaymentIntent only. Which invoice that payment paid is what
    ``Payment.stripe_invoice_id`` says *now*, and whose invoice it is is what ``Invoice.account``
    says now (after any merge of accounts), so nothing here goes stale when the payment or the
    invoice arrives after the dispute.
    """

    def for_invoice(self, invoice: Invoice) -> "DisputeQuerySet":
        return self.of_payments(Payment.objects.filter(stripe_invoice_id=invoice.stripe_id))

    def for_account(self, account: Account) -> "DisputeQuerySet":
        invoice_ids = Invoice.objects.filter(account=account).values("stripe_id")
        return self.of_payments(Payment.objects.filter(stripe_invoice_id__in=invoice_ids))


class Dispute(MirrorFields):
    """Mirror of a Stripe dispute (https://docs.stripe.com/api/disputes/object).

    A cardholder's bank contests a charge. The dispute is shown to support on its invoice and
    its account, found through its payment at read time (``Dispute.objects.for_invoice``); it
    changes no entitlement by itself. Money is an integer in the currency's minor unit.
    """

    class Status(models.TextChoices):
        # https://docs.stripe.com/api/disputes/object#dispute_object-status
        WARNING_NEEDS_RESPONSE = "warning_needs_response"
        WARNING_UNDER_REVIEW = "warning_under_review"
        WARNING_CLOSED = "warning_closed"
        NEEDS_RESPONSE = "needs_response"
        UNDER_REVIEW = "under_review"
        APPEAL_NEEDS_RESPONSE = "appeal_needs_response"
        APPEAL_UNDER_REVIEW = "appeal_under_review"
        WON = "won"
        LOST = "lost"
        PREVENTED = "prevented"

    stripe_id = models.CharField(max_length=255, unique=True, help_text="Stripe's dispute id (dp_...).")
    livemode = livemode_field()
    charge_id = models.CharField(max_length=255, db_index=True, help_text="The disputed charge (ch_...).")
    payment_intent_id = models.CharField(
        max_length=255,
        blank=True,
        db_index=True,
        help_text="The PaymentIntent of the disputed charge (pi_...); blank for a charge made without one. "
        "Through its Payment it reaches the invoice and the account.",
    )
    amount = models.BigIntegerField(
        default=0, help_text="Disputed amount in the currency's minor unit; may be less than the charge."
    )
    currency = models.CharField(max_length=3)
    reason = models.CharField(
        max_length=64, blank=True, help_text="The cardholder's reason, in Stripe's words (fraudulent, duplicate, ...)."
    )
    status = models.CharField(max_length=32, choices=Status.choices)
    evidence_due_by = models.DateTimeField(
        null=True,
        blank=True,
        help_text="`evidence_details.due_by`: last moment to submit evidence; empty when no response is allowed.",
    )
    is_charge_refundable = models.BooleanField(
        default=False, help_text="Whether refunding the charge is still possible (and would stop further withdrawals)."
    )

    objects = DisputeQuerySet.as_manager()
    history = HistoricalRecords()

    class Meta:
        ordering = ["-stripe_created", "-pk"]

    def __str__(self):
        return self.stripe_id

    def payments(self) -> models.QuerySet:
        """The payments of this dispute's PaymentIntent or charge (``OfPaymentQuerySet.payments``)."""
        return Dispute.objects.filter(pk=self.pk).payments()

    def invoices(self) -> models.QuerySet:
        """The invoices those payments paid (usually one), with their accounts."""
        paid = self.payments().values("stripe_invoice_id")
        return Invoice.objects.filter(stripe_id__in=paid).select_related("account")


class OwedEmail(models.Model):
    """An e-mail the app owes, recorded in the transaction of the change that owes it.

    The on-commit task normally sends it at once; if the broker or the process died in
    between, the periodic sweep finds it still unsent. ``key`` makes it owed once: a receipt is
    ``receipt:<invoice id>``, whatever the number of deliveries of ``invoice.paid``. A receipt
    sent again because someone asked (``billing.outbox.resend_receipt``, the only way to send one
    twice) is a row of its own, ``receipt:<invoice id>:resend:<n>``, naming who asked.
    """

    class Kind(models.TextChoices):
        RECEIPT = "receipt"
        PAYMENT_FAILED = "payment_failed"
        TRIAL_WILL_END = "trial_will_end"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"

    key = models.CharField(max_length=255, unique=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="owed_emails")
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, null=True, blank=True, related_name="owed_emails")
    subscription = models.ForeignKey(
        Subscription, on_delete=models.CASCADE, null=True, blank=True, related_name="owed_emails"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="Who asked for this e-mail (a receipt sent again from the admin); empty when an event owed it.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("send_owedemail", "Can send an owed e-mail now")]

    def __str__(self):
        return self.key

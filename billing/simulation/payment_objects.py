"""Simulated Stripe payments, refunds, disputes, checkout sessions, SetupIntents and customers.

The same rules as ``billing.simulation.objects`` (which names these builders too): every key
exists in the same resource of Stripe's ``fixtures3.json``; the functions are pure.
"""

from __future__ import annotations

from .objects import _derived

# --- Payments, refunds, checkout, setup ------------------------------------------------------------


def charge_object(
    *,
    id: str,
    customer: str,
    payment_intent: str,
    amount: int,
    amount_refunded: int = 0,
    currency: str = "usd",
    created: int,
    payment_method: str | None = None,
    livemode: bool = False,
) -> dict:
    """A succeeded card charge (https://docs.stripe.com/api/charges/object); no ``invoice`` since basil."""
    return {
        "id": id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": _derived("txn", id),
        "billing_details": {"address": None, "email": None, "name": None, "phone": None},
        "calculated_statement_descriptor": "SIMULATED SAAS",
        "captured": True,
        "created": created,
        "currency": currency,
        "customer": customer,
        "description": None,
        "disputed": False,
        "failure_balance_transaction": None,
        "failure_code": None,
        "failure_message": None,
        "fraud_details": {},
        "livemode": livemode,
        "metadata": {},
        "on_behalf_of": None,
        "outcome": {
            "advice_code": None,
            "network_advice_code": None,
            "network_decline_code": None,
            "network_status": "approved_by_network",
            "reason": None,
            "seller_message": "Payment complete.",
            "type": "authorized",
        },
        "paid": True,
        "payment_intent": payment_intent,
        "payment_method": payment_method or _derived("pm", customer),
        "payment_method_details": {
            "card": {
                "brand": "visa",
                "country": "US",
                "exp_month": 12,
                "exp_year": 2034,
                "funding": "credit",
                "last4": "4242",
                "network": "visa",
            },
            "type": "card",
        },
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": f"https://pay.stripe.com/receipts/payment/{_derived('rcpt', id, 40)}",
        "refunded": amount_refunded >= amount > 0,
        "review": None,
        "shipping": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "succeeded",
        "transfer_data": None,
        "transfer_group": None,
    }


def refund_object(
    *,
    id: str,
    charge: str,
    payment_intent: str,
    amount: int,
    currency: str = "usd",
    status: str = "succeeded",
    created: int,
) -> dict:
    """A refund of (part of) a charge (https://docs.stripe.com/api/refunds/object)."""
    return {
        "id": id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": _derived("txn", id) if status == "succeeded" else None,
        "charge": charge,
        "created": created,
        "currency": currency,
        "destination_details": {"card": {"type": "refund"}, "type": "card"},
        "metadata": {},
        "payment_intent": payment_intent,
        "reason": "requested_by_customer",
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }


# The evidence a merchant may submit against a dispute: none submitted yet.
_DISPUTE_EVIDENCE_FIELDS = (
    "access_activity_log billing_address cancellation_policy cancellation_policy_disclosure cancellation_rebuttal "
    "customer_communication customer_email_address customer_name customer_purchase_ip customer_signature "
    "duplicate_charge_documentation duplicate_charge_explanation duplicate_charge_id product_description receipt "
    "refund_policy refund_policy_disclosure refund_refusal_explanation service_date service_documentation "
    "shipping_address shipping_carrier shipping_date shipping_documentation shipping_tracking_number "
    "uncategorized_file uncategorized_text"
).split()


def dispute_object(
    *,
    id: str,
    charge: str,
    payment_intent: str | None,
    amount: int,
    currency: str = "usd",
    reason: str = "fraudulent",
    status: str = "needs_response",
    created: int,
    evidence_due_by: int | None = None,
    has_evidence: bool = False,
    submission_count: int = 0,
    funds_withdrawn: bool = False,
    funds_reinstated: bool = False,
    is_charge_refundable: bool = False,
    livemode: bool = False,
) -> dict:
    """A dispute of a card charge (https://docs.stripe.com/api/disputes/object).

    ``evidence_due_by`` defaults to a week after ``created``; Stripe sends 0 where the network
    allows no response. The disputed amount is withdrawn from the balance (with the dispute fee)
    when the dispute opens, and given back if it is won: ``balance_transactions`` lists them.
    https://docs.stripe.com/disputes/how-disputes-work
    """
    movements = [(-amount, 1500, "dispute")] if funds_withdrawn else []
    movements += [(amount, 0, "dispute_reversal")] if funds_reinstated else []
    balance_transactions = [
        {
            "id": _derived("txn", f"{id}:{category}"),
            "object": "balance_transaction",
            "amount": value,
            "available_on": created + 2 * 24 * 3600,
            "balance_type": "payments",
            "created": created,
            "currency": currency,
            "description": f"Chargeback for {charge}",
            "exchange_rate": None,
            "fee": fee,
            "fee_details": [],
            "net": value - fee,
            "reporting_category": category,
            "source": id,
            "status": "pending",
            "type": "adjustment",
        }
        for value, fee, category in movements
    ]
    return {
        "id": id,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": balance_transactions,
        "charge": charge,
        "created": created,
        "currency": currency,
        "enhanced_eligibility_types": [],
        "evidence": {**dict.fromkeys(_DISPUTE_EVIDENCE_FIELDS), "enhanced_evidence": {}},
        "evidence_details": {
            "due_by": created + 7 * 24 * 3600 if evidence_due_by is None else evidence_due_by,
            "enhanced_eligibility": {},
            "has_evidence": has_evidence,
            "past_due": False,
            "submission_count": submission_count,
        },
        "is_charge_refundable": is_charge_refundable,
        "livemode": livemode,
        "metadata": {},
        "payment_intent": payment_intent,
        "payment_method_details": {
            "card": {"brand": "visa", "case_type": "chargeback", "network_reason_code": "10.4", "network": "visa"},
            "type": "card",
        },
        "reason": reason,
        "status": status,
    }


def checkout_session_object(
    *,
    id: str,
    customer: str,
    subscription: str,
    client_reference_id: str | None = None,
    created: int,
    customer_email: str = "",
    customer_name: str = "",
    amount_total: int | None = None,
    payment_status: str = "paid",
    currency: str = "usd",
    livemode: bool = False,
) -> dict:
    """A completed Checkout Session in subscription mode (https://docs.stripe.com/api/checkout/sessions/object).

    ``client_reference_id`` is how the SaaS names its own account to Checkout
    (https://docs.stripe.com/payments/checkout/fulfill-orders). ``payment_status`` is
    ``no_payment_required`` when a trial defers the first payment.
    """
    return {
        "id": id,
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": "https://saas.example.com/billing/cancel",
        "client_reference_id": client_reference_id,
        "client_secret": None,
        "consent": None,
        "consent_collection": None,
        "created": created,
        "currency": currency,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer,
        "customer_creation": "always",
        "customer_details": {
            "address": None,
            "email": customer_email or None,
            "name": customer_name or None,
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        },
        "customer_email": None,
        "discounts": [],
        "expires_at": created + 24 * 3600,
        "invoice": None,
        "invoice_creation": None,
        "livemode": livemode,
        "locale": None,
        "metadata": {},
        "mode": "subscription",
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": "always",
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "complete",
        "submit_type": None,
        "subscription": subscription,
        "success_url": "https://saas.example.com/billing/success?session_id={CHECKOUT_SESSION_ID}",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": None,
    }


def setup_intent_object(
    *,
    id: str,
    customer: str,
    payment_method: str,
    created: int,
    status: str = "succeeded",
    livemode: bool = False,
) -> dict:
    """A SetupIntent that saved a card for later payments (https://docs.stripe.com/api/setup_intents/object)."""
    return {
        "id": id,
        "object": "setup_intent",
        "application": None,
        "automatic_payment_methods": None,
        "cancellation_reason": None,
        "client_secret": f"{id}_secret_{_derived('s', id, 24)[2:]}",
        "created": created,
        "customer": customer,
        "description": None,
        "flow_directions": None,
        "last_setup_error": None,
        "latest_attempt": _derived("setatt", id),
        "livemode": livemode,
        "mandate": None,
        "metadata": {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": payment_method,
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "single_use_mandate": None,
        "status": status,
        "usage": "off_session",
    }


def customer_object(
    *,
    id: str,
    created: int,
    email: str = "",
    name: str = "",
    invoice_prefix: str | None = None,
    livemode: bool = False,
) -> dict:
    """A customer (https://docs.stripe.com/api/customers/object)."""
    return {
        "id": id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": created,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email or None,
        "invoice_prefix": invoice_prefix or _derived("x", id, 8)[2:].upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": livemode,
        "metadata": {},
        "name": name or None,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }

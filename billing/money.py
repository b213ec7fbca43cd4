"""Amounts as people read them.

Stripe gives every amount as an integer in the currency's minor unit, and that unit is not
always a hundredth: ``1200`` is 12.00 USD but 1,200 JPY, and 1.200 KWD.
See https://docs.stripe.com/currencies#zero-decimal and #three-decimal.
"""

from decimal import Decimal

# Stripe's zero-decimal currencies: the amount is already in whole units.
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
# Stripe's three-decimal currencies: the amount is in thousandths.
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
# Not listed above on purpose: ISK, HUF and TWD are whole-unit in practice, but Stripe's API keeps
# them two-decimal for backwards compatibility (ISK 100 means 1 krona), so they divide by 100.


def decimal_places(currency: str) -> int:
    """How many digits of ``currency``'s Stripe amounts lie after the decimal point."""
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    if code in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


def format_amount(amount: int, currency: str) -> str:
    """Format a Stripe amount for people: ``"12.34 USD"``, ``"1,200 JPY"``, ``"-1.500 KWD"``.

    Exact (Decimal, never float) because receipts and the admin must show what Stripe charged.
    """
    places = decimal_places(currency)
    value = Decimal(amount).scaleb(-places)
    return f"{value:,.{places}f} {currency.upper()}".rstrip()

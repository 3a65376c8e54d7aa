"""Credits are money: kept as integer micro-credits so sums are exact, shown as decimal credits."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

MICROS_PER_CREDIT = 1_000_000


def to_micros(credits: float | str | Decimal) -> int:
    return int((Decimal(str(credits)) * MICROS_PER_CREDIT).to_integral_value(ROUND_HALF_UP))


def to_credits(micros: int) -> float:
    return micros / MICROS_PER_CREDIT


def price(width: int, height: int, steps: int, *, per_image: float, per_megapixel_step: float) -> int:
    """What one image costs: a flat part plus a part that grows with its pixels and steps."""
    megapixel_steps = width * height / 1_000_000 * steps
    return to_micros(per_image) + to_micros(per_megapixel_step * megapixel_steps)

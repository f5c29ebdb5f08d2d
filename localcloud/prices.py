"""What the pipeline costs on Google Cloud: one table for every tool that turns throughput into money.

us-central1 list prices with the boot disk, from the README's "What it costs" table (read 2026-09),
and the fixed cost per million images there (uploads, logging, the function, reads, storage,
Pub/Sub, BigQuery), which does not depend on the worker VM.
"""

from __future__ import annotations

VM_PRICE_PER_HOUR = {"e2-standard-2": 0.0698, "n2-standard-2": 0.0999, "e2-standard-4": 0.1368}
FIXED_COST_PER_MILLION = 7.79


def cost_per_million(images_per_s: float, vm_price_per_hour: float) -> float:
    """Dollars per million images for one VM serving images_per_s: the fixed part plus the VM's
    hours for a million images (1e6 / 3600 / T hours)."""
    return FIXED_COST_PER_MILLION + 1e6 / 3600.0 * vm_price_per_hour / images_per_s

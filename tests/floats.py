"""Float comparisons that hold for any model the build trains.

Two float32 computations of the same logits (another batch size, another process, another
library) differ by summation order only. Each reordered sum can move a result by a few units in
the last place (ULPs) of the magnitudes it adds, so the bound scales with the largest magnitude in
play, never with the particular weights one clone happened to train. Bit equality is tested only
where it is a real property (e.g. the JSON encoding of float32, tests/test_engines.py).
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: one ULP at 1.0
# Same engine and graph, different batch or process: measured differences are 1-2 ULPs; 64 leaves
# room for reductions reordered by thread count without hiding a wrong input (which moves logits
# by whole units).
SAME_GRAPH_ULPS = 64


def f32_bound(reference: np.ndarray, ulps: int = SAME_GRAPH_ULPS) -> float:
    """Largest |a - b| expected between two float32 evaluations of `reference`'s values."""
    scale = max(1.0, float(np.max(np.abs(reference)))) if np.size(reference) else 1.0
    return ulps * F32_EPS * scale


def assert_f32_close(actual: np.ndarray, reference: np.ndarray, ulps: int = SAME_GRAPH_ULPS) -> None:
    actual, reference = np.asarray(actual), np.asarray(reference)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    bound = f32_bound(reference, ulps)
    gap = float(np.max(np.abs(actual.astype(np.float64) - reference.astype(np.float64)))) if actual.size else 0.0
    assert gap <= bound, f"max |d| {gap:.3g} over the float32 bound {bound:.3g} ({ulps} ULPs of the largest value)"

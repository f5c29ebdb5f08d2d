"""One inference interface, one implementation per engine (in the spirit of Beam's ModelHandler).

Engines neither log nor time themselves: the worker's batch runner times every engine at the same
boundary, so their numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    name: str
    version: str
    device: str
    precision: str
    model_form: str


class Engine(Protocol):
    def load(self) -> None:
        """Load and compile the model; called once per process."""

    def warmup(self) -> None:
        """Run representative inputs so the first real batch is not the slow one."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, 128, 128, 1) in [0, 1] -> float32 logits (n,). Thread-safe."""

    def describe(self) -> EngineInfo:
        """Facts recorded with every row (valid after load)."""


def warmup_batch(batch_size: int, seed: int = 0) -> np.ndarray:
    """Inputs shaped and valued like decoded images (multiples of 1/255 in [0, 1]): random floats
    would cost the JSON path of the TF Serving client ~10x more than real pixels do."""
    levels = np.random.default_rng(seed).integers(0, 256, (batch_size, 128, 128, 1))
    return (levels / 255.0).astype(np.float32)

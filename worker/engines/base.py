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

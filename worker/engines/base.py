"""One inference interface, one implementation per engine (in the spirit of Beam's ModelHandler).

Engines neither log nor time themselves: the worker's batch runner times every engine at the same
boundary, so their numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelspec.preprocess import normalize
from modelspec.spec import ModelSpec, demo_spec


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
        """float32 (n, *input shape), preprocessed as the spec says -> float32 (n, units): the
        model's output named in the spec, one row per image. Thread-safe."""

    def describe(self) -> EngineInfo:
        """Facts recorded with every row (valid after load)."""


def warmup_batch(batch_size: int, seed: int = 0, spec: ModelSpec | None = None) -> np.ndarray:
    """Inputs shaped and valued like preprocessed images (random 8-bit pixels through the spec's
    arithmetic): random floats would cost the JSON path of the TF Serving client ~10x more than
    real pixels do."""
    spec = spec or demo_spec()
    shape = (batch_size, spec.input.height, spec.input.width, spec.input.channels)
    return normalize(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), spec)


def in_fixed_batches(infer_once, batch: np.ndarray, fixed: int | None) -> np.ndarray:
    """Run infer_once on the whole batch, or, for a model whose batch dimension is fixed, on
    slices of that size (the last one padded with copies of its first image, then trimmed)."""
    if not fixed or len(batch) == fixed:
        return infer_once(batch)
    parts = []
    for start in range(0, len(batch), fixed):
        part = batch[start:start + fixed]
        padded = np.concatenate([part, np.repeat(part[:1], fixed - len(part), axis=0)]) if len(part) < fixed else part
        parts.append(infer_once(padded)[:len(part)])
    return np.concatenate(parts)

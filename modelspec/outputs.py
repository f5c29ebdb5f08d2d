"""Model outputs -> predictions, as the spec's output section says: the one decision function.

A model gives `units` numbers per image: one for a binary model that scores class_names[1] alone
(a logit through sigmoid, or a probability), or one per class (logits through softmax, or
probabilities). Every image gets a score per class; the top-1 label is class_names[1] when its
score reaches the threshold (binary models with one unit), else the highest score. A prediction's
score is always its own label's, and the top-k pairs come sorted by score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelspec.errors import SpecError
from modelspec.spec import OutputSpec


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # the label's own score
    class_index: int
    raw: float  # the model's number behind the decision: the logit of a binary model, else the label's output
    top_k: tuple[tuple[str, float, int], ...]  # (label, score, class index), best first


def class_scores(outputs: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """(n, units) model outputs -> (n, classes) float64 scores per class."""
    values = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if values.shape[1] != spec.width:
        raise SpecError(f"the model gave {values.shape[1]} numbers per image where its spec says {spec.width} "
                        f"(output {spec.name!r}, {len(spec.class_names)} classes)")
    if spec.width == 1:
        positive = values[:, 0] if spec.activation == "none" else _sigmoid(values[:, 0])
        return np.stack([1.0 - positive, positive], axis=1)
    if spec.activation == "softmax":
        shifted = np.exp(values - values.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return values


def predictions(outputs: np.ndarray, spec: OutputSpec) -> list[Prediction]:
    values = np.asarray(outputs, dtype=np.float32).reshape(len(outputs), -1)
    scores = class_scores(values, spec)
    if spec.width == 1:
        chosen = (scores[:, 1] >= spec.threshold).astype(int)
    else:
        chosen = scores.argmax(axis=1)
    k = min(spec.top_k, len(spec.class_names))
    # Stable on ties: the lower class index first, as argmax does.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    result = []
    for row, index in enumerate(chosen):
        index = int(index)
        raw = values[row, 0] if spec.width == 1 else values[row, index]
        result.append(Prediction(
            label=spec.class_names[index],
            score=float(scores[row, index]),
            class_index=index,
            raw=float(raw),
            top_k=tuple((spec.class_names[int(j)], float(scores[row, j]), int(j)) for j in order[row]),
        ))
    return result


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))

"""TensorFlow in process: the SavedModel's serving signature, called directly.

Never `model.predict` per request: it builds a tf.data pipeline per call (~40 ms here). The
signature is a concrete function, compiled once at load and safe to call from several threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelspec.spec import ModelSpec, demo_spec
from worker.engines.base import EngineInfo, in_fixed_batches, warmup_batch

SIGNATURE = "serving_default"


class TensorFlowEngine:
    def __init__(self, saved_model_dir: Path, model_form: str = "saved_model", spec: ModelSpec | None = None):
        self.saved_model_dir = Path(saved_model_dir)
        self.model_form = model_form
        self.spec = spec or demo_spec()
        self._tf = None
        self._signature = None
        self._loaded = None
        self._info: EngineInfo | None = None

    def load(self) -> None:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter is not a log line
        import tensorflow as tf

        if not (self.saved_model_dir / "saved_model.pb").is_file():
            raise FileNotFoundError(f"no SavedModel in {self.saved_model_dir}: rebuild the model (make model)")
        self._tf = tf
        loaded = tf.saved_model.load(str(self.saved_model_dir))
        if SIGNATURE not in loaded.signatures:
            raise RuntimeError(f"{self.saved_model_dir} has no {SIGNATURE!r} signature "
                               f"(has {sorted(loaded.signatures)}): rebuild the model")
        self._signature = loaded.signatures[SIGNATURE]
        self._loaded = loaded  # keeps the variables the signature captures alive
        outputs = self._signature.structured_outputs
        wanted = self.spec.output.name
        if wanted not in outputs:
            raise RuntimeError(f"signature {SIGNATURE!r} has no {wanted!r} output (has {sorted(outputs)})")
        self._info = EngineInfo(
            name="tensorflow",
            version=tf.__version__,
            device=self._device_name(tf),
            precision=_precision(tf, outputs[wanted].dtype),
            model_form=self.model_form,
        )

    def _device_name(self, tf) -> str:
        # TF places the signature's ops on a GPU by itself when one is visible.
        return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"

    def warmup(self) -> None:
        for batch_size in (1, 8, 32):
            self.infer(warmup_batch(batch_size, spec=self.spec))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return in_fixed_batches(self._infer_once, batch, self.spec.input.batch)

    def _infer_once(self, batch: np.ndarray) -> np.ndarray:
        tensor = self._tf.constant(np.ascontiguousarray(batch, dtype=np.float32))
        outputs = self._signature(**{self.spec.input.name: tensor})
        return outputs[self.spec.output.name].numpy().astype(np.float32, copy=False).reshape(len(batch), -1)

    def describe(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("describe() before load()")
        return self._info


def _precision(tf, output_dtype) -> str:
    """The SavedModel computes in its variables' dtype (float32 here) unless grappler's oneDNN
    bf16 auto-mixed-precision rewrite is switched on for the process; read both back."""
    options = tf.config.optimizer.get_experimental_options()
    if options.get("auto_mixed_precision_onednn_bfloat16") or options.get("auto_mixed_precision_mkl"):
        return "bf16"
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(output_dtype.name, output_dtype.name)

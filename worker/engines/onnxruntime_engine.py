"""ONNX Runtime in process (CPU execution provider), from the model version's ONNX form.

The runtime most users of an ONNX model would pick on their own. `onnxruntime` is imported only
when this engine is chosen, and only images that serve ONNX models install it (the `onnx` extra).

A model whose batch dimension is fixed (an integer in the ONNX input's shape) cannot be reshaped
safely here: ONNX Runtime checks the input against that number, and a graph may bake the batch
size into a Reshape. Such a model is called in slices of its batch size (`in_fixed_batches`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelspec.spec import ModelSpec, demo_spec
from worker.engines.base import EngineInfo, in_fixed_batches, warmup_batch

PROVIDER = "CPUExecutionProvider"
ORT_PIN = "onnxruntime==1.31.1"
_ONNX_TYPES = {"tensor(float)": "f32", "tensor(float16)": "f16", "tensor(double)": "f64", "tensor(bfloat16)": "bf16"}


class OnnxRuntimeEngine:
    def __init__(self, model_path: Path, model_form: str = "onnx", threads: int = 0, spec: ModelSpec | None = None):
        self.model_path = Path(model_path)
        self.model_form = model_form
        self.threads = threads  # intra-op threads; 0: ONNX Runtime's choice (every core)
        self.spec = spec or demo_spec()
        self._session = None
        self._fixed_batch: int | None = None
        self._info: EngineInfo | None = None

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(f"onnxruntime is not installed ({exc}): pip install {ORT_PIN} "
                               "(the `onnx` extra); the OpenVINO and TensorFlow worker images leave it out") from None
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model {self.model_path} is missing: re-import the model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # one call at a time (the batch runner serializes calls)
        options.log_severity_level = 3  # errors only: ONNX Runtime's warnings are not the worker's log lines
        session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=[PROVIDER])
        inputs = {node.name: node for node in session.get_inputs()}
        outputs = {node.name: node for node in session.get_outputs()}
        wanted_in, wanted_out = self.spec.input.name, self.spec.output.name
        if wanted_in not in inputs or len(inputs) != 1:
            raise RuntimeError(f"{self.model_path} has inputs {sorted(inputs)}; the spec feeds one, {wanted_in!r}")
        if wanted_out not in outputs:
            raise RuntimeError(f"{self.model_path} has no output {wanted_out!r} (outputs: {sorted(outputs)})")
        batch_dim = inputs[wanted_in].shape[0] if inputs[wanted_in].shape else None
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self._session = session
        self._info = EngineInfo(
            name="onnxruntime",
            version=ort.__version__,
            device="CPU",
            precision=_ONNX_TYPES.get(outputs[wanted_out].type, outputs[wanted_out].type),
            model_form=self.model_form,
        )

    def warmup(self) -> None:
        for batch_size in (1, 8, 32):
            self.infer(warmup_batch(batch_size, spec=self.spec))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return in_fixed_batches(self._infer_once, batch, self._fixed_batch)

    def _infer_once(self, batch: np.ndarray) -> np.ndarray:
        # InferenceSession.run is safe to call from several threads.
        (outputs,) = self._session.run([self.spec.output.name],
                                       {self.spec.input.name: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(outputs, dtype=np.float32).reshape(len(batch), -1)

    def describe(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("describe() before load()")
        return self._info

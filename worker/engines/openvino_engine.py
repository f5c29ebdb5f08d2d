"""OpenVINO in process, from the model version's IR."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from worker.engines.base import EngineInfo

# Setting -> OpenVINO INFERENCE_PRECISION_HINT. "default" leaves the plugin's choice
# (bf16 on CPUs with AMX/avx512_bf16), which is recorded as the effective precision anyway.
PRECISION_HINTS = {"f32": "f32", "bf16": "bf16", "f16": "f16", "default": None}


class OpenVINOEngine:
    def __init__(self, model_xml: Path, model_form: str, precision: str = "f32", device: str = "CPU"):
        self.model_xml = Path(model_xml)
        self.model_form = model_form
        self.precision = precision
        self.device = device
        self._compiled = None
        self._logits_output = None
        self._local = threading.local()
        self._info: EngineInfo | None = None

    def load(self) -> None:
        import openvino as ov

        if not self.model_xml.is_file():
            raise FileNotFoundError(f"OpenVINO IR {self.model_xml} is missing: rebuild the model (make model)")
        core = ov.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        hint = PRECISION_HINTS[self.precision]
        if hint:
            # Must be given at compile time: set afterwards it has no effect (a fault of the seed).
            config["INFERENCE_PRECISION_HINT"] = hint
        self._compiled = core.compile_model(core.read_model(self.model_xml), self.device, config)
        self._logits_output = _find_output(self._compiled, "logits")
        effective = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if "int8" in self.model_form:
            effective = f"i8+{effective}"
        self._info = EngineInfo(
            name="openvino", version=ov.get_version().split("-")[0], device=self.device,
            precision=effective, model_form=self.model_form,
        )

    def warmup(self) -> None:
        rng = np.random.default_rng(0)
        for batch_size in (1, 8, 32):
            self.infer(rng.random((batch_size, 128, 128, 1), dtype=np.float32))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            # One infer request per thread: a request is not safe to share between threads.
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(result[self._logits_output], dtype=np.float32).reshape(len(batch))

    def describe(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("describe() before load()")
        return self._info


def _find_output(compiled, wanted: str):
    for output in compiled.outputs:
        if any(wanted in name for name in output.get_names()):
            return output
    names = [sorted(output.get_names()) for output in compiled.outputs]
    raise RuntimeError(f"the IR has no output named like {wanted!r} (outputs: {names}): rebuild the model")

"""OpenVINO in process, from one of the model version's IRs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from modelspec.spec import ModelSpec, demo_spec
from worker.engines.base import EngineInfo, in_fixed_batches, warmup_batch

# Precision setting -> (IR form, OpenVINO INFERENCE_PRECISION_HINT). "default" leaves the plugin's
# choice (bf16 on CPUs with AMX/avx512_bf16). "int8" selects the NNCF-quantized IR; its layers
# that stay unquantized run in f32. What really runs is read back after compiling (see
# effective_precision): on a CPU without native f16, the f16 hint runs in bf16.
PRECISIONS = {
    "f32": ("openvino_fp32", "f32"),
    "bf16": ("openvino_fp32", "bf16"),
    "f16": ("openvino_fp16", "f16"),
    "int8": ("openvino_int8", "f32"),
    "default": ("openvino_fp32", None),
}
_COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution")
_RUNTIME_NAMES = {"u8": "int8", "i8": "int8", "f32": "f32", "bf16": "bf16", "f16": "f16"}


class OpenVINOEngine:
    def __init__(self, model_xml: Path, model_form: str, precision: str = "f32", device: str = "CPU",
                 threads: int = 0, spec: ModelSpec | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.model_xml = Path(model_xml)
        self.model_form = model_form
        self.precision = precision
        self.device = device
        self.threads = threads  # 0: the plugin's choice (every core)
        self.spec = spec or demo_spec()
        self._compiled = None
        self._logits_output = None
        self._fixed_batch: int | None = None
        self._local = threading.local()
        self._info: EngineInfo | None = None

    def load(self) -> None:
        import openvino as ov

        if not self.model_xml.is_file():
            raise FileNotFoundError(f"OpenVINO IR {self.model_xml} is missing: rebuild the model (make model)")
        core = ov.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        hint = PRECISIONS[self.precision][1]
        if hint:
            # Must be given at compile time: set afterwards it has no effect (a fault of the seed).
            config["INFERENCE_PRECISION_HINT"] = hint
        if self.threads:
            # On a machine shared with other busy processes, a call spread over every core waits
            # for its slowest thread; fewer threads can be faster there.
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        model = core.read_model(self.model_xml)
        self._fixed_batch = _free_the_batch(model)
        self._compiled = core.compile_model(model, self.device, config)
        self._logits_output = _find_output(self._compiled, self.spec.output.name)
        self._info = EngineInfo(
            name="openvino",
            version=ov.get_version().split("-")[0],
            device=",".join(self._compiled.get_property("EXECUTION_DEVICES")) or self.device,
            precision=effective_precision(self._compiled),
            model_form=self.model_form,
        )

    def warmup(self) -> None:
        for batch_size in (1, 8, 32):
            self.infer(warmup_batch(batch_size, spec=self.spec))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return in_fixed_batches(self._infer_once, batch, self._fixed_batch)

    def _infer_once(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            # One infer request per thread: a request is not safe to share between threads.
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(result[self._logits_output], dtype=np.float32).reshape(len(batch), -1)

    def describe(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("describe() before load()")
        return self._info


def effective_precision(compiled) -> str:
    """The precision the compute layers (convolutions, fully connected) really execute in, read
    from the compiled runtime graph: "f32", "bf16", "int8"; "+"-joined when mixed. Falls back to
    the compiled INFERENCE_PRECISION_HINT when the plugin exposes no runtime graph."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    try:
        found = set()
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) in _COMPUTE_LAYERS:
                runtime = info["runtimePrecision"].astype(str)
                found.add(_RUNTIME_NAMES.get(runtime, runtime))
    except Exception:  # not every device plugin exposes rt_info
        return hint
    if not found:
        return hint
    order = ("int8", "f16", "bf16", "f32")
    return "+".join(sorted(found, key=lambda name: (order.index(name) if name in order else len(order), name)))


def _free_the_batch(model) -> int | None:
    """Make a fixed batch dimension dynamic where OpenVINO can reshape the model; None when it is
    (or already was) dynamic, else the fixed size that calls must keep."""
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape[0].is_dynamic:
        return None
    fixed = shape[0].get_length()
    try:
        import openvino as ov

        dims = [ov.Dimension(-1)] + [shape[i] for i in range(1, shape.rank.get_length())]
        model.reshape({model.inputs[0]: ov.PartialShape(dims)})
        return None
    except Exception:  # some graphs bake the batch size into a Reshape: keep it and split calls
        return fixed


def _find_output(compiled, wanted: str):
    for output in compiled.outputs:
        if any(wanted in name for name in output.get_names()):
            return output
    names = [sorted(output.get_names()) for output in compiled.outputs]
    raise RuntimeError(f"the IR has no output named like {wanted!r} (outputs: {names}): rebuild the model")

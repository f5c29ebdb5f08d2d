"""Engine registry: settings + model version -> an Engine (not yet loaded).

Each engine module imports its library (openvino, tensorflow, grpc, onnxruntime) only when chosen,
so an OpenVINO worker never pays TensorFlow's import. An engine asked for a form the model lacks
refuses here, naming the forms the model has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelspec.spec import spec_from_manifest
from worker.engines.base import Engine, EngineInfo

__all__ = ["ENGINE_FORMS", "ENGINE_PRECISIONS", "Engine", "EngineInfo", "TFServingOptions", "create_engine"]

# Which precision settings each engine accepts. TensorFlow and TF Serving run the SavedModel as
# saved (float32); "default" means "whatever the engine does by itself".
ENGINE_PRECISIONS = {
    "openvino": ("f32", "bf16", "f16", "int8", "default"),
    "tensorflow": ("f32", "default"),
    "tfserving": ("f32", "default"),
    "onnxruntime": ("f32", "default"),
}
# The form each engine other than OpenVINO runs (OpenVINO's depends on the precision).
ENGINE_FORMS = {"tensorflow": "saved_model", "tfserving": "saved_model", "onnxruntime": "onnx"}


@dataclass(frozen=True)
class TFServingOptions:
    url: str  # REST: http://host:8501; gRPC: host:8500
    protocol: str = "rest"
    model_name: str = ""  # default: the manifest's name
    timeout_s: float = 10.0


def create_engine(engine: str, precision: str, model_dir: Path, manifest: dict,
                  tfserving: TFServingOptions | None = None, threads: int = 0) -> Engine:
    if engine not in ENGINE_PRECISIONS:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINE_PRECISIONS)})")
    if precision not in ENGINE_PRECISIONS[engine]:
        raise ValueError(f"engine {engine!r} does not run precision {precision!r} "
                         f"(it runs {', '.join(ENGINE_PRECISIONS[engine])})")
    model_dir = Path(model_dir)
    spec = spec_from_manifest(manifest)
    forms: dict[str, str] = manifest.get("forms", {})
    if engine == "openvino":
        from worker.engines.openvino_engine import PRECISIONS, OpenVINOEngine

        form = PRECISIONS[precision][0]
        if form not in forms:
            # Never fall back silently to another IR: the row would claim a precision it did not get.
            raise ValueError(f"model {manifest['name']}/{manifest['version']} has no form {form!r} for precision "
                             f"{precision!r} (forms: {', '.join(sorted(forms))}){_skipped(manifest, form)}; "
                             "rebuild it with this modelkit")
        return OpenVINOEngine(model_dir / forms[form], model_form=form, precision=precision, threads=threads,
                              spec=spec)
    form = ENGINE_FORMS[engine]
    if form not in forms:
        raise ValueError(f"engine {engine!r} runs the {form!r} form, which model {manifest['name']}/"
                         f"{manifest['version']} lacks (forms: {', '.join(sorted(forms))}){_skipped(manifest, form)}")
    if engine == "onnxruntime":
        from worker.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_dir / forms[form], model_form=form, threads=threads, spec=spec)
    if engine == "tensorflow":
        from worker.engines.tensorflow_engine import TensorFlowEngine

        return TensorFlowEngine(model_dir / forms["saved_model"], model_form="saved_model", spec=spec)
    from worker.engines.tfserving_engine import TFServingEngine

    if tfserving is None or not tfserving.url:
        raise ValueError("engine 'tfserving' needs the server's address (WORKER_TFSERVING_URL)")
    return TFServingEngine(
        url=tfserving.url,
        model_name=tfserving.model_name or str(manifest["name"]),
        model_version=int(manifest["version"]),
        protocol=tfserving.protocol,
        timeout_s=tfserving.timeout_s,
        spec=spec,
    )


def _skipped(manifest: dict, form: str) -> str:
    """Why an import left the form out, when its manifest says (e.g. INT8 without calibration images)."""
    reason = (manifest.get("skipped_forms") or {}).get(form)
    return f"; {form} was skipped at import: {reason}" if reason else ""

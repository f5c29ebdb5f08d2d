"""Engine registry: settings + model manifest -> an Engine (not yet loaded)."""

from __future__ import annotations

from pathlib import Path

from worker.engines.base import Engine, EngineInfo

__all__ = ["Engine", "EngineInfo", "create_engine"]

OPENVINO_FORMS = {"f32": "openvino_fp32", "bf16": "openvino_fp32", "default": "openvino_fp32", "f16": "openvino_fp16"}


def create_engine(engine: str, precision: str, model_dir: Path, manifest: dict) -> Engine:
    if engine == "openvino":
        from worker.engines.openvino_engine import OpenVINOEngine

        form = OPENVINO_FORMS[precision]
        if form not in manifest.get("forms", {}):
            form = "openvino_fp32"
        return OpenVINOEngine(model_dir / manifest["forms"][form], model_form=form, precision=precision)
    raise ValueError(f"unknown engine {engine!r}")

"""Names inside a model version directory, and the rule for its path.

    <name>/<version>/                                  TF Serving's layout: the directory is the SavedModel
        saved_model.pb, variables/, fingerprint.pb     signature serving_default: image -> logits, probabilities
        assets.extra/tf_serving_warmup_requests        TFRecord of PredictionLog, replayed by TF Serving at load
        openvino/fp32/model.xml|.bin                   IR, FP32 weights
        openvino/fp16/model.xml|.bin                   IR, FP16-compressed weights (computed per the precision hint)
        openvino/int8/model.xml|.bin                   IR quantized by NNCF post-training quantization
        manifest.json                                  written last (see modelspec.manifest)
"""

from __future__ import annotations

import re
from pathlib import Path

from modelkit.errors import ExportError

INPUT_NAME = "image"
INPUT_SHAPE = (None, 128, 128, 1)
OUTPUT_NAMES = ("logits", "probabilities")
SIGNATURE = "serving_default"
WARMUP_RECORDS = "assets.extra/tf_serving_warmup_requests"
FORMS = {
    "saved_model": ".",
    "openvino_fp32": "openvino/fp32/model.xml",
    "openvino_fp16": "openvino/fp16/model.xml",
    "openvino_int8": "openvino/int8/model.xml",
}
# A version built by an older modelkit lacks some of these; build-demo rebuilds it.
REQUIRED_FILES = (WARMUP_RECORDS,)


# TF Serving needs numeric versions, and names become folder names.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def version_dir_for(models_root: Path, name: str, version: int) -> Path:
    """`<models_root>/<name>/<version>`, after checking both parts are safe directory names."""
    if not _NAME_PATTERN.fullmatch(name):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '.', '-' and not start with '.' or '-'")
    if version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving's layout), got {version}")
    return Path(models_root) / name / str(version)

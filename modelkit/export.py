"""Write a trained Keras model as the forms engines load, and run each form for evaluation.

The layout of one version directory is described in `modelkit.layout`. TensorFlow and Keras are
imported by the functions that use them, so converting an ONNX or TFLite model (modelkit.importer)
does not pay TensorFlow's import.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import openvino as ov

from modelkit.errors import ExportError
from modelkit.layout import FORMS, INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES, SIGNATURE, WARMUP_RECORDS
from worker.engines.openvino_engine import effective_precision

__all__ = ["FORMS", "INPUT_NAME", "INPUT_SHAPE", "OUTPUT_NAMES", "SIGNATURE", "WARMUP_RECORDS"]

CALIBRATION_SIZE = 300  # NNCF's default subset size; ml-stack.md measured 2 s for 300 images
WARMUP_BATCH_SIZES = (1, 8, 32)  # the batch sizes the worker sends most; TF Serving replays each once
TF_SERVING_API_PIN = "tensorflow-serving-api==2.21.0"
EVAL_BATCH = 32  # bounds memory: the first conv layer holds 126x126x64 floats per image


def export_saved_model(model: keras.Model, version_dir: Path) -> None:
    """SavedModel with one signature: image [None,128,128,1] -> {logits, probabilities}.

    The model ends in a linear Dense(1); the sigmoid lives here so every engine also exposes the
    logit, which is what parity checks compare (probabilities saturate and hide differences).
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec(INPUT_SHAPE, tf.float32, name=INPUT_NAME)])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = model(image, training=False)
        return {"logits": logits, "probabilities": tf.sigmoid(logits)}

    archive.add_endpoint(SIGNATURE, serve)
    archive.write_out(str(version_dir), verbose=False)


def export_openvino(version_dir: Path, source: Path | None = None, input_name: str = INPUT_NAME,
                    output_names: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Convert a model to FP32 and FP16 IRs in version_dir: by default the SavedModel that
    version_dir is (dynamic batch); `source` may name another file ov.convert_model reads (ONNX,
    TFLite). The IRs must keep the input and output names the engines look up."""
    converted = ov.convert_model(str(source or version_dir))
    # FP32 first: the saved file, not the in-memory model, is what evaluation reads back.
    ov.save_model(converted, str(version_dir / FORMS["openvino_fp32"]), compress_to_fp16=False)
    ov.save_model(converted, str(version_dir / FORMS["openvino_fp16"]), compress_to_fp16=True)
    for form in ("openvino_fp32", "openvino_fp16"):
        _check_ir_names(version_dir / FORMS[form], input_name, output_names)


def quantize_int8(version_dir: Path, calibration_images: np.ndarray, input_name: str = INPUT_NAME,
                  output_names: tuple[str, ...] = OUTPUT_NAMES, sample_batch: int = 1) -> dict:
    """NNCF post-training quantization of the FP32 IR (min/max statistics on calibration_images,
    `sample_batch` images per NNCF sample: 1, or the fixed batch size of a model that has one;
    fast bias correction). Writes openvino/int8 and returns facts for the manifest. Calibration
    images must come from the training split, never the held-out one."""
    try:
        import nncf
    except ImportError as exc:
        raise ExportError(f"nncf is not installed ({exc}): pip install nncf==3.4.0 (see pyproject.toml)") from None

    if len(calibration_images) == 0:
        raise ExportError("INT8 quantization needs at least one calibration image")
    model = ov.Core().read_model(str(version_dir / FORMS["openvino_fp32"]))
    samples = [_padded(calibration_images[index : index + sample_batch], sample_batch)
               for index in range(0, len(calibration_images), sample_batch)]
    nncf.set_log_level(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stderr is for progress here
        quantized = nncf.quantize(
            model,
            nncf.Dataset(samples),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(samples),
        )
    target = version_dir / FORMS["openvino_int8"]
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    _check_ir_names(target, input_name, output_names)
    return {
        "tool": f"nncf {nncf.__version__}",
        "method": "post-training quantization (nncf.quantize), preset performance, fast bias correction",
        "calibration_images": len(calibration_images),
    }


def _padded(images: np.ndarray, size: int) -> np.ndarray:
    """images, with copies of the first appended up to size (a fixed batch's last slice)."""
    if len(images) >= size:
        return images
    return np.concatenate([images, np.repeat(images[:1], size - len(images), axis=0)])


def write_warmup_requests(version_dir: Path, model_name: str, images: np.ndarray, input_name: str = INPUT_NAME,
                          batch_sizes: tuple[int, ...] = WARMUP_BATCH_SIZES) -> None:
    """TF Serving's SavedModel warm-up: a TFRecord of PredictionLog under assets.extra/, one
    PredictRequest per batch size (real images, so no saturated paths; a model with a fixed batch
    dimension is warmed with that size only)."""
    import tensorflow as tf

    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        raise ExportError(
            f"the TF Serving protos are missing: pip install --no-deps {TF_SERVING_API_PIN} "
            "(--no-deps: its wheel depends on the full tensorflow package, not tensorflow-cpu)"
        ) from None
    if len(images) == 0:
        raise ExportError("TF Serving warm-up records need at least one image")
    target = version_dir / WARMUP_RECORDS
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for batch_size in batch_sizes:
            batch = np.resize(images, (batch_size, *images.shape[1:])).astype(np.float32)  # repeats if few
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE)
            )
            request.inputs[input_name].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def _check_ir_names(xml_path: Path, input_name: str = INPUT_NAME,
                    wanted_outputs: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Engines look tensors up by name; fail the build now rather than the worker later."""
    model = ov.Core().read_model(str(xml_path))
    input_names = [sorted(port.get_names()) for port in model.inputs]
    output_names = set().union(*(port.get_names() for port in model.outputs))
    if len(model.inputs) != 1 or input_name not in input_names[0]:
        raise ExportError(f"{xml_path} has inputs {input_names}, expected one named {input_name!r}")
    missing = [name for name in wanted_outputs if name not in output_names]
    if missing:
        raise ExportError(f"{xml_path} lacks outputs {missing} (has {sorted(output_names)})")


def saved_model_outputs(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run the exported serving signature (not the in-memory Keras model) over images."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
    batches = [
        signature(**{INPUT_NAME: tf.constant(images[start : start + EVAL_BATCH])})
        for start in range(0, len(images), EVAL_BATCH)
    ]
    return {name: np.concatenate([batch[name].numpy() for batch in batches]) for name in OUTPUT_NAMES}


def openvino_outputs(
    xml_path: Path, images: np.ndarray, precision_hint: str = "f32"
) -> tuple[dict[str, np.ndarray], str]:
    """Run an IR on CPU; returns outputs and the effective inference precision.

    The hint matters: on CPUs with bf16 support OpenVINO silently computes an FP32 IR in bf16.
    """
    compiled = ov.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": precision_hint})
    effective = effective_precision(compiled)  # read back: "f32", "bf16", "int8"...
    request = compiled.create_infer_request()
    collected: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, len(images), EVAL_BATCH):
        result = request.infer({INPUT_NAME: images[start : start + EVAL_BATCH]})
        for name in OUTPUT_NAMES:
            collected[name].append(np.array(result[compiled.output(name)]))
    return {name: np.concatenate(parts) for name, parts in collected.items()}, effective


def staging_dir_for(target: Path) -> Path:
    """A hidden, non-numeric sibling: TF Serving and the worker never mistake it for a version."""
    return target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}"


def publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished staging directory into place (atomic on one filesystem).

    With overwrite, the old version is moved aside first and deleted after; readers may briefly
    find no version, never a mix of two.
    """
    if not target.exists():
        staging.rename(target)
        return
    if not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it or pick another --version")
    retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)

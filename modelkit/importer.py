"""`python -m modelkit import`: a classifier trained elsewhere -> one model version directory.

    source            forms written (manifest "forms")
    .keras, .h5       saved_model: "." (the version directory is the SavedModel, TF Serving's layout;
                      signature serving_default takes the spec's input name and returns its output
                      name), openvino_fp32 and openvino_fp16 (converted from that SavedModel),
                      openvino_int8 (NNCF, with calibration images), TF Serving warm-up records
    SavedModel dir    the same; the SavedModel's own files are copied as they are
    .onnx             onnx: "model.onnx" (the file itself), openvino_fp32/fp16/int8 (from it)
    .tflite           tflite: "model.tflite" (kept for the record: no engine runs it),
                      openvino_fp32/fp16/int8 (from it)

The spec comes from `modelkit.import_spec.assemble_spec` (what the user declared + what the model
says, checked). Then the source runs once in its own framework (Keras, TensorFlow, ONNX Runtime,
the TFLite interpreter) on the import's inputs: the calibration images when given, else seeded
random pixels through the spec's arithmetic. Its outputs must have the spec's width (and rows that
sum to 1 when declared probabilities). Each written form then runs through the worker's own engine
(OpenVINO with the f32 hint, TensorFlow, ONNX Runtime) on the same inputs; the manifest's "parity"
records max |d| per form against the source run, and a float32 form outside the f32 tolerance of
`modelkit.parity` stops the import (a conversion that changed the model). Like training, the
version is built in a hidden staging directory, verified and renamed into place.

TensorFlow is imported only for Keras, SavedModel and TFLite sources; onnxruntime only for ONNX.
"""

from __future__ import annotations


import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from modelkit.errors import ModelkitError
from modelkit.import_spec import ModelFacts, TensorInfo, assemble_spec, check_outputs, labels_from_metadata
from modelkit.layout import FORMS, SIGNATURE, WARMUP_RECORDS, version_dir_for
from modelkit.parity import TOLERANCES
from modelspec.manifest import hash_tree, sha256_file, verify_manifest, write_manifest
from modelspec.preprocess import ImageRejected, preprocess_image
from modelspec.spec import ModelSpec
from worker.engines.base import in_fixed_batches, warmup_batch

_LOGGER = logging.getLogger(__name__)

SUFFIXES = {".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".onnx": "onnx", ".tflite": "tflite"}
ONNX_FILE = "model.onnx"
TFLITE_FILE = "model.tflite"
# What is copied from a SavedModel source (anything else in its folder is not part of it).
SAVED_MODEL_PARTS = ("saved_model.pb", "saved_model.pbtxt", "variables", "assets", "assets.extra", "fingerprint.pb")
CALIBRATION_SIZE = 300  # as the demo build (modelkit.export.CALIBRATION_SIZE)
PARITY_IMAGES = 64  # of the calibration images, the first (sorted by path)
RANDOM_INPUTS = 16  # without calibration images: random pixels through the spec's arithmetic
RANDOM_SEED = 0
CHUNK = 32  # images per call of a source or engine during the import
ONNXRUNTIME_PIN = "onnxruntime==1.31.1"
# The f32 bound's atol gains this many times the source's float32 noise floor (source_noise_floor):
# two correct float32 runs were 0.8-2x the floor apart on the zoo's networks (ResNet152 0.8x,
# ResNet50 2x).
NOISE_FLOOR_FACTOR = 4
# ONNX Runtime graph rewrites the import's reference run leaves out (see OnnxSource.run): it
# judges every form, so it must be the most exact run of the graph ONNX Runtime offers.
ONNX_REFERENCE_DISABLED_OPTIMIZERS = ("NchwcTransformer",)
INT8_SKIPPED = ("no calibration images (--calibration-dir): NNCF sets INT8 ranges from real images like the ones "
                "the model will see, and random pixels would set them wrong")
# The tolerance each form's parity is judged by (keys of modelkit.parity.TOLERANCES): FP16 weights
# are rounded to 11 bits even with the f32 hint; INT8 is compared on outputs clipped as parity does.
FORM_TOLERANCE = {"saved_model": "f32", "onnx": "f32", "openvino_fp32": "f32", "openvino_fp16": "f16",
                  "openvino_int8": "int8"}


class ImportRefused(ModelkitError):
    """The source cannot be imported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ImportRequest:
    source: Path
    models_root: Path
    name: str
    version: int
    declared: dict[str, dict[str, Any]]  # partial spec: HF config < spec file < flags (merged)
    origin: dict[str, str]  # "section.key" -> where it was declared ("--labels", "spec file x.yaml", ...)
    calibration_dir: Path | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class Imported:
    version_dir: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    origins: dict[str, str]


def detect_format(source: Path) -> str:
    source = Path(source)
    if source.is_dir():
        if (source / "saved_model.pb").is_file() or (source / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise ImportRefused(f"{source} is a folder without saved_model.pb: give a SavedModel folder, or a .keras, "
                            ".h5, .onnx or .tflite file")
    if not source.is_file():
        raise ImportRefused(f"{source} does not exist")
    if source.name in ("saved_model.pb", "saved_model.pbtxt"):
        raise ImportRefused(f"{source} is part of a SavedModel: give its folder, {source.parent}")
    kind = SUFFIXES.get(source.suffix.lower())
    if kind is None:
        raise ImportRefused(f"{source}: unknown model format {source.suffix or '(no suffix)'!r} (known: "
                            f"{', '.join(sorted(SUFFIXES))} files and SavedModel folders)")
    return kind


def import_model(request: ImportRequest) -> Imported:
    """Read, check, convert, measure, write the manifest, publish the version directory atomically."""
    from modelkit import export

    started = time.perf_counter()
    target = version_dir_for(request.models_root, request.name, request.version)
    if target.exists() and not request.overwrite:
        raise ImportRefused(f"{target} already exists; pass --overwrite to replace it or pick another --version")
    kind = detect_format(request.source)
    source = open_source(kind, Path(request.source))
    facts = source.facts()
    spec, origins = assemble_spec(request.declared, facts, request.origin)
    _LOGGER.info("%s %s: input %s, output %s", kind, request.source, facts.inputs[0].describe(),
                 next(t.describe() for t in facts.outputs if t.name == spec.output.name))

    calibration, calibration_info = (load_calibration(request.calibration_dir, spec)
                                     if request.calibration_dir is not None else (None, None))
    if calibration is not None:
        inputs = calibration[_spaced(len(calibration), PARITY_IMAGES)]
        inputs_note = f"{len(inputs)} of the calibration images from {request.calibration_dir}"
    else:
        inputs = warmup_batch(RANDOM_INPUTS, seed=RANDOM_SEED, spec=spec)
        inputs_note = (f"{len(inputs)} random images (uniform 8-bit pixels, seed {RANDOM_SEED}) through the spec's "
                       "arithmetic: no calibration images were given")
    try:
        reference = source.run(inputs, spec)
    except Exception as exc:  # the source cannot run on inputs shaped as the spec says
        raise ImportRefused(f"{source.runtime} cannot run {request.source} on {spec.summary()} inputs as the spec "
                            f"declares them ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}): check "
                            "--layout, --size and --color against the model") from None
    check_outputs(reference, spec, f"the {kind} model run by {source.runtime}")
    noise_floor = source_noise_floor(source, inputs, spec, reference)

    made_parent = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = export.staging_dir_for(target)
    try:
        forms = source.write(staging, spec)
        _convert_to_openvino(staging, source.ir_source(forms), spec)
        forms.update(openvino_fp32=FORMS["openvino_fp32"], openvino_fp16=FORMS["openvino_fp16"])
        skipped: dict[str, str] = {}
        quantization = None
        if calibration is not None:
            quantization = export.quantize_int8(staging, calibration, spec.input.name, (spec.output.name,),
                                                sample_batch=spec.input.batch or 1)
            quantization["calibration"] = calibration_info
            forms["openvino_int8"] = FORMS["openvino_int8"]
        else:
            skipped["openvino_int8"] = INT8_SKIPPED
        warmup = None
        if "saved_model" in forms:
            sizes = (spec.input.batch,) if spec.input.batch else export.WARMUP_BATCH_SIZES
            export.write_warmup_requests(staging, request.name, inputs, spec.input.name, batch_sizes=sizes)
            warmup = {"file": WARMUP_RECORDS, "batch_sizes": list(sizes),
                      "format": "TFRecord of tensorflow.serving.PredictionLog (predict_log.request), replayed by "
                                "TF Serving", "images": inputs_note}
        parity = measure_parity(staging, forms, spec, inputs, reference,
                                quantized_source=source.quantized, random_inputs=calibration is None,
                                noise_floor=noise_floor)
        manifest = _manifest(request, kind, source, facts, spec, origins, forms, parity, inputs_note)
        manifest["parity"]["source_noise_floor"] = {
            "max_abs_diff": noise_floor, "factor": NOISE_FLOOR_FACTOR,
            "how": "the source run again on the same inputs with every number moved by a random fraction of "
                   "half a float32 ULP (seeded): how far float32 rounding alone moves this model's outputs; "
                   f"{NOISE_FLOOR_FACTOR} x that is added to the f32 tolerance's atol"}
        if quantization:
            manifest["quantization"] = {"openvino_int8": quantization}
        if skipped:
            manifest["skipped_forms"] = skipped
        if warmup:
            manifest["warmup"] = warmup
        manifest["import"]["duration_s"] = round(time.perf_counter() - started, 2)
        write_manifest(staging, manifest)
        verify_manifest(staging)  # self-check before anything can see it
        export.publish(staging, target, request.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_parent and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    return Imported(version_dir=target, manifest=verify_manifest(target), spec=spec, origins=origins)


def _convert_to_openvino(staging: Path, relative: str, spec: ModelSpec) -> None:
    """FP32 and FP16 IRs from the form at `relative` ("." is the SavedModel the directory is)."""
    from modelkit import export

    try:
        export.export_openvino(staging, source=staging / relative, input_name=spec.input.name,
                               output_names=(spec.output.name,))
    except ModelkitError:
        raise
    except Exception as exc:  # an op OpenVINO's frontend does not know, a graph it cannot read
        import openvino as ov

        message = " ".join(str(exc).split())[:400]
        what = "SavedModel" if relative == "." else relative
        raise ImportRefused(f"OpenVINO {ov.get_version().split('-')[0]} cannot convert the {what} to IR: "
                            f"{type(exc).__name__}: {message}") from None


# --- Sources ------------------------------------------------------------------------------------

def open_source(kind: str, path: Path):
    sources = {"keras": KerasSource, "saved_model": SavedModelSource, "onnx": OnnxSource, "tflite": TFLiteSource}
    return sources[kind](path)


class KerasSource:
    """A .keras or .h5 file, loaded with Keras 3 and exported as a SavedModel through a tf.function."""

    format = "keras"
    quantized: str | None = None  # float weights: forms are judged by their own tolerances

    def __init__(self, path: Path):
        _quiet_tensorflow()
        import keras

        self.path = path
        try:
            self.model = keras.models.load_model(str(path), compile=False)
        except Exception as exc:
            raise ImportRefused(f"Keras {keras.__version__} cannot load {path}: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from None
        self.runtime = f"keras {keras.__version__}"
        outputs = self.model.outputs
        self.output_names = list(getattr(self.model, "output_names", None) or []) or [
            f"output_{index}" for index in range(len(outputs))]

    def facts(self) -> ModelFacts:
        inputs = tuple(TensorInfo(str(t.name), _dims(t.shape), _dtype_name(t.dtype)) for t in self.model.inputs)
        outputs = tuple(TensorInfo(name, _dims(t.shape), _dtype_name(t.dtype))
                        for name, t in zip(self.output_names, self.model.outputs))
        return ModelFacts("keras", inputs, outputs)

    def _pick(self, result, name: str):
        if isinstance(result, dict):
            return result[name]
        if isinstance(result, (list, tuple)):
            return result[self.output_names.index(name)]
        return result

    def run(self, batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
        def once(part: np.ndarray) -> np.ndarray:
            return np.asarray(self._pick(self.model(part, training=False), spec.output.name), dtype=np.float32)

        return _in_chunks(once, batch, spec.input.batch)

    def write(self, staging: Path, spec: ModelSpec) -> dict[str, str]:
        import keras
        import tensorflow as tf

        archive = keras.export.ExportArchive()
        archive.track(self.model)
        model, pick, output = self.model, self._pick, spec.output.name

        @tf.function(input_signature=[tf.TensorSpec(spec.input.shape, tf.float32, name=spec.input.name)])
        def serve(image):
            return {output: pick(model(image, training=False), output)}

        archive.add_endpoint(SIGNATURE, serve)
        try:
            archive.write_out(str(staging), verbose=False)
        except Exception as exc:
            raise ImportRefused(f"cannot export {self.path} as a SavedModel: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from None
        return {"saved_model": "."}

    @staticmethod
    def ir_source(forms: dict[str, str]) -> str:
        return forms["saved_model"]


class SavedModelSource:
    """A SavedModel folder: its serving_default signature is the model; its files are copied as they are."""

    format = "saved_model"
    quantized: str | None = None  # float weights: forms are judged by their own tolerances

    def __init__(self, path: Path):
        tf = _tensorflow()
        self.path = path
        try:
            self.loaded = tf.saved_model.load(str(path))
        except Exception as exc:
            raise ImportRefused(f"TensorFlow {tf.__version__} cannot load the SavedModel {path}: "
                                f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if SIGNATURE not in self.loaded.signatures:
            raise ImportRefused(f"the SavedModel {path} has no {SIGNATURE!r} signature (it has "
                                f"{sorted(self.loaded.signatures) or 'none'}): save it with signatures="
                                f"{{'{SIGNATURE}': ...}}, the signature TF Serving and the engines call")
        self.signature = self.loaded.signatures[SIGNATURE]
        self.runtime = f"tensorflow {tf.__version__} (the source's {SIGNATURE} signature)"

    def facts(self) -> ModelFacts:
        _, named = self.signature.structured_input_signature
        outputs = self.signature.structured_outputs
        if not isinstance(outputs, dict):
            raise ImportRefused(f"the {SIGNATURE} signature of {self.path} returns unnamed outputs: "
                                "return a dict {name: tensor}")
        return ModelFacts(
            "saved_model",
            tuple(TensorInfo(name, _dims(s.shape), s.dtype.name) for name, s in sorted(named.items())),
            tuple(TensorInfo(name, _dims(s.shape), s.dtype.name) for name, s in sorted(outputs.items())),
        )

    def run(self, batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
        import tensorflow as tf

        def once(part: np.ndarray) -> np.ndarray:
            return self.signature(**{spec.input.name: tf.constant(part)})[spec.output.name].numpy()

        return _in_chunks(once, batch, spec.input.batch)

    def write(self, staging: Path, spec: ModelSpec) -> dict[str, str]:
        staging.mkdir()
        for part in SAVED_MODEL_PARTS:
            origin = self.path / part
            if origin.is_dir():
                shutil.copytree(origin, staging / part)
            elif origin.is_file():
                shutil.copy2(origin, staging / part)
        return {"saved_model": "."}

    @staticmethod
    def ir_source(forms: dict[str, str]) -> str:
        return forms["saved_model"]


ONNX_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd",
                           "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})


class OnnxSource:
    """An ONNX file: read with the onnx package, run with ONNX Runtime (CPU), kept as the onnx form."""

    format = "onnx"

    def __init__(self, path: Path):
        import onnx

        self.path = path
        try:
            header = onnx.load(str(path), load_external_data=False)
            self.external_data = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
            self.model = onnx.load(str(path)) if self.external_data else header
            onnx.checker.check_model(self.model)
        except Exception as exc:
            raise ImportRefused(f"onnx {onnx.__version__} cannot read {path}: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from None
        # A quantized graph (QDQ pairs or integer ops, e.g. onnxruntime's quantize_static) is itself an
        # int8 computation: its forms are judged by the int8 tolerance, as a TFLite file with int8 weights.
        int8_ops = sorted({node.op_type for node in self.model.graph.node if node.op_type in ONNX_INT8_OPS})
        self.quantized = f"int8 operators ({', '.join(int8_ops)})" if int8_ops else None
        self.runtime = "onnxruntime (CPUExecutionProvider)"
        self._session = None

    def facts(self) -> ModelFacts:
        graph = self.model.graph
        initializers = {t.name for t in graph.initializer}
        labels, origin = labels_from_metadata({p.key: p.value for p in self.model.metadata_props})
        return ModelFacts(
            "onnx",
            tuple(_onnx_tensor(value) for value in graph.input if value.name not in initializers),
            tuple(_onnx_tensor(value) for value in graph.output),
            labels, origin,
        )

    def run(self, batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportRefused(f"onnxruntime is not installed: pip install {ONNXRUNTIME_PIN} (the `onnx` extra); "
                                "an ONNX import runs the model once with it to measure each form against") from None
        if self._session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # The reference is the graph's own arithmetic, so it leaves out ORT's NCHWc layout rewrite
            # (on at the default level, ~2x faster): its blocked kernels round more coarsely. On the
            # zoo's EfficientNetB0 they put logits 2.3x the f32 bound from a float64 run, while
            # without them ONNX Runtime is at 0.36x and OpenVINO's IR at 0.25x; a reference that
            # rounds worse than the form it judges refused a faithful IR (issue 14).
            self._session = ort.InferenceSession(str(self.path), sess_options=options,
                                                 providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=list(ONNX_REFERENCE_DISABLED_OPTIMIZERS))
            self.runtime = (f"onnxruntime {ort.__version__} (CPUExecutionProvider, "
                            f"{', '.join(ONNX_REFERENCE_DISABLED_OPTIMIZERS)} off)")

        def once(part: np.ndarray) -> np.ndarray:
            return self._session.run([spec.output.name], {spec.input.name: part})[0]

        return _in_chunks(once, batch, spec.input.batch)

    def write(self, staging: Path, spec: ModelSpec) -> dict[str, str]:
        import onnx

        staging.mkdir()
        if self.external_data:
            onnx.save_model(self.model, str(staging / ONNX_FILE))  # weights inline: one self-contained file
        else:
            shutil.copy2(self.path, staging / ONNX_FILE)
        return {"onnx": ONNX_FILE}

    @staticmethod
    def ir_source(forms: dict[str, str]) -> str:
        return forms["onnx"]


class TFLiteSource:
    """A .tflite file: run with TensorFlow's TFLite interpreter, converted to IR by OpenVINO."""

    format = "tflite"

    def __init__(self, path: Path):
        tf = _tensorflow()
        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice (LiteRT)
                self.interpreter = tf.lite.Interpreter(model_path=str(path))
        except Exception as exc:
            raise ImportRefused(f"the TFLite interpreter of TensorFlow {tf.__version__} cannot read {path}: "
                                f"{type(exc).__name__}: {str(exc)[:300]}") from None
        self.runtime = f"the TFLite interpreter of tensorflow {tf.__version__}"
        # Weights stored as int8 (post-training quantization): the interpreter runs hybrid kernels
        # that quantize activations too, while OpenVINO dequantizes the weights and computes in float.
        quantized = sorted({np.dtype(d["dtype"]).name for d in self.interpreter.get_tensor_details()
                            if np.dtype(d["dtype"]) in (np.int8, np.uint8)})
        self.quantized = f"{'/'.join(quantized)} weights" if quantized else None

    def facts(self) -> ModelFacts:
        def info(detail) -> TensorInfo:
            signature = detail.get("shape_signature", detail["shape"])
            return TensorInfo(detail["name"], tuple(None if int(d) < 0 else int(d) for d in signature),
                              np.dtype(detail["dtype"]).name)

        return ModelFacts("tflite", tuple(info(d) for d in self.interpreter.get_input_details()),
                          tuple(info(d) for d in self.interpreter.get_output_details()))

    def run(self, batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
        interpreter = self.interpreter
        (entry,) = interpreter.get_input_details()

        def once(part: np.ndarray) -> np.ndarray:
            if list(interpreter.get_input_details()[0]["shape"]) != list(part.shape):
                interpreter.resize_tensor_input(entry["index"], list(part.shape))
            interpreter.allocate_tensors()
            interpreter.set_tensor(entry["index"], np.ascontiguousarray(part, dtype=np.float32))
            interpreter.invoke()
            (out,) = [d for d in interpreter.get_output_details() if d["name"] == spec.output.name]
            return interpreter.get_tensor(out["index"]).copy()

        return _in_chunks(once, batch, spec.input.batch)

    def write(self, staging: Path, spec: ModelSpec) -> dict[str, str]:
        staging.mkdir()
        shutil.copy2(self.path, staging / TFLITE_FILE)
        return {"tflite": TFLITE_FILE}

    @staticmethod
    def ir_source(forms: dict[str, str]) -> str:
        return forms["tflite"]


def _in_chunks(once: Callable[[np.ndarray], Any], batch: np.ndarray, fixed: int | None) -> np.ndarray:
    """Run a source over batch CHUNK images at a time (slices of a fixed batch size when it has one):
    (n, units) float32."""
    def flat(part: np.ndarray) -> np.ndarray:
        return np.asarray(once(np.ascontiguousarray(part, dtype=np.float32)), dtype=np.float32).reshape(len(part), -1)

    return np.concatenate([in_fixed_batches(flat, batch[start:start + CHUNK], fixed)
                           for start in range(0, len(batch), CHUNK)])


def _dims(shape) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    try:
        dims = list(shape.as_list()) if hasattr(shape, "as_list") else list(shape)
    except ValueError:  # a TensorShape of unknown rank
        return None
    return tuple(None if d is None or int(d) < 0 else int(d) for d in dims)


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def _onnx_tensor(value) -> TensorInfo:
    from onnx import helper

    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    except Exception:
        dtype = f"onnx type {tensor_type.elem_type}"
    if not tensor_type.HasField("shape"):
        return TensorInfo(value.name, None, dtype)
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)
    return TensorInfo(value.name, dims, dtype)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tensorflow():
    _quiet_tensorflow()
    import tensorflow as tf

    return tf


# --- Calibration images ---------------------------------------------------------------------------

def load_calibration(folder: Path, spec: ModelSpec, limit: int = CALIBRATION_SIZE) -> tuple[np.ndarray, dict]:
    """Up to `limit` images from folder (recursively, hidden files left out), each through
    preprocess_image with the spec: evenly spaced over the files sorted by path, so a folder of
    class sub-folders is sampled across every class. Files the spec cannot read are counted, not
    fatal (the next files stand in); a folder with no readable image is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportRefused(f"--calibration-dir {folder} is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    chosen = _spaced(len(files), limit)
    rest = set(range(len(files))) - set(chosen)
    order = [files[i] for i in chosen] + [files[i] for i in sorted(rest)]
    images, rejected = [], 0
    for path in order:
        if len(images) >= limit:
            break
        try:
            images.append(preprocess_image(path.read_bytes(), spec))
        except ImageRejected:
            rejected += 1
    if not images:
        raise ImportRefused(f"--calibration-dir {folder} holds no image the spec can read ({len(files)} files, "
                            f"{rejected} rejected): INT8 calibration needs real images like the ones the model "
                            "will see; add some, or leave out --calibration-dir to skip INT8")
    info = {"folder": str(folder), "images": len(images), "files_not_images": rejected,
            "order": "evenly spaced over the files sorted by path, up to the limit", "limit": limit}
    return np.stack(images), info


def _spaced(count: int, most: int) -> list[int]:
    """Up to `most` indices spread evenly over range(count), first and last included."""
    if count <= most:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, most).round().astype(int).tolist()))


# --- Parity ----------------------------------------------------------------------------------------

def form_engine(version_dir: Path, form: str, relative: str, spec: ModelSpec):
    """The worker's engine for one form, as import parity runs it (OpenVINO with the f32 hint:
    the numbers then show what the form's weights cost, not the CPU's bf16 default)."""
    path = Path(version_dir) / relative
    if form == "saved_model":
        from worker.engines.tensorflow_engine import TensorFlowEngine

        return TensorFlowEngine(path, model_form=form, spec=spec)
    if form == "onnx":
        from worker.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, model_form=form, spec=spec)
    if form.startswith("openvino_"):
        from worker.engines.openvino_engine import OpenVINOEngine

        return OpenVINOEngine(path, model_form=form, precision="int8" if form == "openvino_int8" else "f32", spec=spec)
    return None  # e.g. tflite: kept for the record, no engine runs it


def compare(outputs: np.ndarray, reference: np.ndarray, spec: ModelSpec, tolerance) -> dict[str, Any]:
    """max |d| and the worst |d| / (atol + rtol |ref|) (on clipped outputs where the tolerance
    clips, as modelkit.parity does), and how often the top-1 label agrees."""
    from modelspec.outputs import predictions

    ours, theirs = outputs.astype(np.float64), reference.astype(np.float64)
    if tolerance.clip is not None:
        ours, theirs = np.clip(ours, -tolerance.clip, tolerance.clip), np.clip(theirs, -tolerance.clip, tolerance.clip)
    bound = (tolerance.atol + tolerance.rtol * np.abs(theirs)
             + tolerance.range_rtol * (float(np.abs(theirs).max()) if theirs.size else 0.0))
    ratio = float((np.abs(ours - theirs) / bound).max())  # the bound of modelkit.parity.run_case
    labels = [p.class_index for p in predictions(outputs, spec.output)]
    expected = [p.class_index for p in predictions(reference, spec.output)]
    return {
        "max_abs_diff": float(np.abs(outputs.astype(np.float64) - reference.astype(np.float64)).max()),
        "max_abs_reference": float(np.abs(reference).max()),
        "worst_ratio": round(ratio, 4),
        "within_tolerance": ratio <= 1.0,
        "top1_agreement": float(np.mean(np.asarray(labels) == np.asarray(expected))),
    }


def source_noise_floor(source, inputs: np.ndarray, spec: ModelSpec, reference: np.ndarray) -> float:
    """Largest output change when every input number moves by at most half a float32 ULP.

    A float32 run rounds every layer's activations by about that much, and the network amplifies
    it like any input change: a well-conditioned trained ResNet50 moves by 1.9e-5 (logits to 93),
    while the zoo's ResNet152 with its random body moves by 7.8e-4 (logits to 8), as far as its
    own Keras and SavedModel runs are apart (6.5e-4). No engine can be closer than that, so the f32
    bound is widened by a few times this floor: nothing for a well-conditioned model, and for an
    ill-conditioned one exactly the part of the gap rounding explains."""
    rng = np.random.default_rng(RANDOM_SEED)
    half_ulp = np.finfo(np.float32).eps / 2
    moved = (inputs.astype(np.float64) * (1.0 + rng.uniform(-half_ulp, half_ulp, inputs.shape))).astype(np.float32)
    return float(np.abs(source.run(moved, spec).astype(np.float64) - reference).max())


def form_tolerance(key: str, noise_floor: float = 0.0):
    """The named tolerance of modelkit.parity; the f32 one widened by the source's noise floor."""
    tolerance = TOLERANCES[key]
    if key == "f32" and noise_floor > 0:
        tolerance = replace(tolerance, atol=tolerance.atol + NOISE_FLOOR_FACTOR * noise_floor,
                            why=f"{tolerance.why}; atol + {NOISE_FLOOR_FACTOR} x the source's float32 noise floor "
                                f"{noise_floor:.3g}")
    return tolerance


def measure_parity(version_dir: Path, forms: dict[str, str], spec: ModelSpec, inputs: np.ndarray,
                   reference: np.ndarray, quantized_source: str | None = None,
                   random_inputs: bool = False, noise_floor: float = 0.0) -> dict[str, dict[str, Any]]:
    """Each form through its engine on inputs, against the source run. A float32 form outside the
    f32 tolerance is refused: its conversion changed the model. A quantized source (e.g. a TFLite
    file with int8 weights) is itself an int8 computation, so every form is judged by the int8
    tolerance against it, and the row says why."""
    results = {}
    for form, relative in forms.items():
        engine = form_engine(version_dir, form, relative, spec)
        if engine is None:
            continue
        engine.load()
        outputs = np.concatenate([engine.infer(inputs[start:start + CHUNK]) for start in range(0, len(inputs), CHUNK)])
        info = engine.describe()
        key = "int8" if quantized_source else FORM_TOLERANCE[form]
        tolerance = form_tolerance(key, noise_floor)
        row = {"engine": f"{info.name} {info.version}", "precision": info.precision, "tolerance": key,
               **compare(outputs.reshape(reference.shape), reference, spec, tolerance)}
        if quantized_source:
            row["tolerance_why"] = f"the source has {quantized_source}: its own run is an int8 computation"
        elif tolerance is not TOLERANCES[key]:
            row["tolerance_atol"] = tolerance.atol
        _LOGGER.info("parity %s (%s, %s): max |d| %.3g, worst d/tol %.3g, top-1 agreement %.3f", form, row["engine"],
                     row["precision"], row["max_abs_diff"], row["worst_ratio"], row["top1_agreement"])
        if key == "f32" and not row["within_tolerance"]:
            raise ImportRefused(parity_refusal(form, row, tolerance, random_inputs))
        results[form] = row
    return results


def parity_refusal(form: str, row: dict[str, Any], tolerance, random_inputs: bool) -> str:
    """Why a float32 form is refused, and what to check: the onnx form is the source file itself
    (no conversion: its engine's kernels differ), and random pixels can drive a trained network
    far outside its training range, where float32 rounding alone exceeds the f32 bound
    (EfficientNetB0: logits up to 2.4e4, TensorFlow itself 11 away from a float64 run)."""
    cause = ("the engine computes the same file differently from the source run" if form == "onnx"
             else "the conversion changed the model")
    message = (f"form {form} run by {row['engine']} differs from the source by max |d| {row['max_abs_diff']:.3g} "
               f"(worst {row['worst_ratio']:.3g}x the f32 tolerance atol {tolerance.atol:g} + rtol "
               f"{tolerance.rtol:.3g}|ref|"
               + (f" + {tolerance.range_rtol:.3g} max|ref|" if tolerance.range_rtol else "") + f"): {cause}")
    if random_inputs:
        message += (f". The inputs were random pixels (reference |output| up to {row['max_abs_reference']:.3g}), "
                    "where a trained network can be too ill-conditioned for float32 to agree: pass "
                    "--calibration-dir with real images to judge it on inputs like the ones it will serve")
    return message


# --- Manifest ---------------------------------------------------------------------------------------

def source_fingerprint(path: Path) -> str:
    """sha256 of a file; of a folder, sha256 over its sorted 'path sha256' lines."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = "".join(f"{name} {digest}\n" for name, digest in hash_tree(path).items())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _frameworks() -> dict[str, str]:
    import openvino as ov
    import PIL

    found = {"openvino": ov.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
             "python": platform.python_version()}
    for module in ("tensorflow", "keras", "onnx", "onnxruntime", "nncf"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def _manifest(request: ImportRequest, kind: str, source, facts: ModelFacts, spec: ModelSpec,
              origins: dict[str, str], forms: dict[str, str], parity: dict, inputs_note: str) -> dict[str, Any]:
    o = spec.output
    if o.width == 1:
        score = "the sigmoid of the logit" if o.activation == "sigmoid" else "the probability"
        decision = f"class_names[1] ({o.class_names[1]!r}) when {score} >= threshold, else class_names[0]"
    else:
        score = "the softmax of the logits" if o.activation == "softmax" else "the probabilities"
        decision = f"the class with the highest score ({score})"
    return {
        "name": request.name,
        "version": request.version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frameworks": _frameworks(),
        "input": {"name": spec.input.name, "shape": list(spec.input.shape), "dtype": spec.input.dtype,
                  "layout": spec.input.layout},
        "outputs": {o.name: o.name},
        "preprocessing": {"function": "modelspec.preprocess.preprocess_image", "spec": "see 'spec'"},
        "spec": spec.to_dict(),
        "class_names": list(o.class_names),
        "threshold": o.threshold,
        "decision": decision,
        "forms": forms,
        "source": {
            "format": kind,
            "file": Path(request.source).name,
            "sha256": source_fingerprint(Path(request.source)),
            "inputs": [t.to_dict() for t in facts.inputs],
            "outputs": [t.to_dict() for t in facts.outputs],
            **({"labels_from": facts.labels_origin} if facts.labels else {}),
        },
        "import": {
            "tool": "python -m modelkit import",
            "spec_origin": origins,  # "section.key" -> declared by (flag, spec file), "model", or "default"
        },
        "parity": {
            "reference": f"the source run by {source.runtime} on the same preprocessed inputs",
            "inputs": inputs_note,
            "rule": "max |d| over every output number; worst_ratio = max |d| / (atol + rtol |reference|) with the "
                    "tolerance of modelkit.parity named per form (float32 forms must be within it)",
            "forms": parity,
        },
    }

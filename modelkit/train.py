"""Train the seed CNN on a decoded two-class folder and publish it as one model version.

Callers load the folder first (`modelkit.dataset.load_labelled_folder`, no TensorFlow), so a bad
dataset fails fast before this module's heavy imports.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import openvino as ov
import PIL
import tensorflow as tf

from modelkit import export
from modelkit.dataset import TRAINING_SPEC, LabelledImages, held_out_fingerprint, stratified_split
from modelkit.errors import ExportError
from modelkit.layout import version_dir_for
from modelspec.manifest import verify_manifest, write_manifest
from modelkit.metrics import CONFUSION_MATRIX_LAYOUT, binary_metrics
from modelspec.spec import demo_spec
from worker.sysinfo import cpu_isa_flags

_LOGGER = logging.getLogger(__name__)

# At most this many epochs; training stops earlier once the training loss is below
# CONVERGED_LOSS. With Adam's default 1e-3, some seeds sat at chance (loss ~0.69, logits ~0.1)
# for four epochs while others converged: 3e-4 converged for every seed tried (0-5) in 6-10.
DEFAULT_EPOCHS = 12
LEARNING_RATE = 3e-4
CONVERGED_LOSS = 0.05
BATCH_SIZE = 32
TEST_FRACTION = 0.3
DROPOUT_RATE = 0.25  # the seed names Dropout layers without a rate; 0.25 is the Keras-examples value
THRESHOLD = 0.5
ARCHITECTURE = (
    "seed 000 128CNN: Conv2D(64,3,relu) > MaxPool2 > Dropout > Conv2D(64,3,relu) > MaxPool2 > "
    "Dropout > Flatten > Dense(64,relu) > Dense(1, linear logit); sigmoid in the serving signature"
)


@dataclass(frozen=True)
class TrainSettings:
    models_root: Path
    name: str
    version: int
    epochs: int = DEFAULT_EPOCHS
    seed: int = 0
    overwrite: bool = False
    threads: int = 0  # TensorFlow intra-op threads; 0: TensorFlow's default (every core it sees)
    dataset_uri: str = ""  # where the dataset came from when it is not data.root (gs://...)
    json_logs: bool = False  # one JSON log line per epoch instead of Keras's progress output


def build_model(dropout_rate: float = DROPOUT_RATE) -> keras.Model:
    """The seed CNN, ending in a linear Dense(1): outputs the logit of class index 1."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(TRAINING_SPEC.input.height, TRAINING_SPEC.input.width, TRAINING_SPEC.input.channels),
                        name=export.INPUT_NAME),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(dropout_rate),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(dropout_rate),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(1, name="logit"),
        ],
        name="cnn128",
    )
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def train_and_export(data: LabelledImages, settings: TrainSettings) -> tuple[Path, dict[str, Any]]:
    """Split 70/30 (stratified), train, export every form, evaluate them on the held-out split,
    write the manifest and publish the version directory atomically. Returns (dir, manifest)."""
    target = version_dir_for(settings.models_root, settings.name, settings.version)
    if target.exists() and not settings.overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it or pick another --version")
    train_idx, test_idx = stratified_split(data.labels, TEST_FRACTION, settings.seed)
    _LOGGER.info(
        "dataset %s: %d images (%s), %d train / %d held out, %d skipped",
        data.root, len(data.labels), _class_counts(data.labels, data.class_names),
        len(train_idx), len(test_idx), len(data.skipped),
    )

    if settings.threads:
        try:
            # Before the first op: a container on a 4-core machine type may see the host's cores.
            tf.config.threading.set_intra_op_parallelism_threads(settings.threads)
        except RuntimeError:
            _LOGGER.warning("TensorFlow already started: keeping its %d intra-op threads",
                            tf.config.threading.get_intra_op_parallelism_threads())
    reproducibility = make_reproducible(settings.seed)
    model = build_model()
    started = time.perf_counter()
    history = model.fit(
        data.images[train_idx],
        data.labels[train_idx].astype(np.float32),
        batch_size=BATCH_SIZE,
        epochs=settings.epochs,
        shuffle=True,
        callbacks=[StopWhenConverged(CONVERGED_LOSS), EpochLog(settings.epochs)],
        # A progress bar on a terminal; one line per epoch in logs and CI; with JSON logs (Vertex AI,
        # Cloud Logging) only EpochLog's structured line.
        verbose=0 if settings.json_logs else 1 if sys.stdout.isatty() else 2,
    )
    train_s = time.perf_counter() - started
    losses = [round(float(v), 4) for v in history.history["loss"]]
    convergence = {"epochs_run": len(losses), "final_loss": losses[-1], "converged": losses[-1] < CONVERGED_LOSS,
                   "loss_per_epoch": losses}
    if not convergence["converged"]:
        _LOGGER.warning("training loss is %.3f after %d epochs (target %.2f): the model may be weak; "
                        "try another --seed or more --epochs", losses[-1], len(losses), CONVERGED_LOSS)
    reproducibility["weights_sha256"] = weights_fingerprint(model)
    _LOGGER.info("trained %d epochs in %.1f s (weights %s)", len(losses), train_s,
                 reproducibility["weights_sha256"][:12])

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = export.staging_dir_for(target)
    try:
        export.export_saved_model(model, staging)
        export.export_openvino(staging)
        calibration_idx = calibration_subset(train_idx, settings.seed)
        quantization = export.quantize_int8(staging, data.images[calibration_idx])
        quantization["calibration"] = (
            f"{len(calibration_idx)} images drawn from the training split (seed {settings.seed}), "
            "never from the held-out split"
        )
        export.write_warmup_requests(staging, settings.name, data.images[calibration_idx])
        metrics = _evaluate_forms(staging, data.images[test_idx], data.labels[test_idx])
        manifest = _manifest(data, settings, train_idx, test_idx, metrics, model.count_params(), train_s)
        manifest["training"]["reproducibility"] = reproducibility
        manifest["training"]["convergence"] = convergence
        manifest["quantization"] = {"openvino_int8": quantization}
        manifest["warmup"] = {
            "file": export.WARMUP_RECORDS,
            "format": "TFRecord of tensorflow.serving.PredictionLog (predict_log.request), replayed by TF Serving",
            "batch_sizes": list(export.WARMUP_BATCH_SIZES),
            "images": "from the training split",
        }
        write_manifest(staging, manifest)
        verify_manifest(staging)  # self-check before anything can see it
        export.publish(staging, target, settings.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, verify_manifest(target)


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch with `step` and `metrics` fields: Cloud Logging keeps them as
    jsonPayload.step and jsonPayload.metrics when the JSON formatter is on (modelkit.cli)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        metrics = {key: round(float(value), 6) for key, value in (logs or {}).items()}
        _LOGGER.info("epoch %d/%d: %s", epoch + 1, self.epochs,
                     ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()),
                     extra={"step": epoch + 1, "metrics": metrics})


class StopWhenConverged(keras.callbacks.Callback):
    """Ends training after the first epoch whose training loss is below loss_below."""

    def __init__(self, loss_below: float):
        super().__init__()
        self.loss_below = loss_below

    def on_epoch_end(self, epoch, logs=None):
        if logs and logs.get("loss", float("inf")) < self.loss_below:
            self.model.stop_training = True


def make_reproducible(seed: int) -> dict[str, Any]:
    """Seed every generator and ask TensorFlow for deterministic kernels; say what was granted.

    With op determinism and the same seed, data, library versions and CPU, training gives the same
    weights bit for bit (`weights_sha256` tells). Across CPUs with other instruction sets (AVX2
    against AVX-512) kernels differ, so tests never depend on a particular build's weights.
    """
    keras.utils.set_random_seed(seed)  # Python, NumPy and the backend's generators
    facts: dict[str, Any] = {"seed": seed}
    try:
        tf.config.experimental.enable_op_determinism()
        facts["op_determinism"] = True
    except (AttributeError, RuntimeError) as exc:
        facts["op_determinism"] = False
        facts["op_determinism_error"] = str(exc)
    try:
        # One inter-op thread: ops run in graph order, so no race decides which update lands first.
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already started in this process (tests): keep what it has
    facts["inter_op_threads"] = tf.config.threading.get_inter_op_parallelism_threads()
    facts["intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()  # 0: every core
    facts["deterministic"] = facts["op_determinism"] and facts["inter_op_threads"] == 1
    facts["cpu_flags"] = cpu_isa_flags()
    return facts


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 over the trained weights' bytes, in layer order: equal builds have equal prints."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    return digest.hexdigest()


def calibration_subset(train_idx: np.ndarray, seed: int, size: int = export.CALIBRATION_SIZE) -> np.ndarray:
    """Up to `size` training-split indices, drawn with the seed (sorted, for stable files)."""
    rng = np.random.default_rng([seed, 8])
    return np.sort(rng.permutation(train_idx)[:size])


def _evaluate_forms(version_dir: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """Held-out metrics per form, each with its effective precision and logit gap to SavedModel."""
    reference = export.saved_model_outputs(version_dir, images)
    results = {"saved_model": _form_metrics(reference, labels, "tensorflow CPU", "f32", reference)}
    for form in ("openvino_fp32", "openvino_fp16", "openvino_int8"):
        # f32 hint: the metrics then show what the weights' format costs, not the CPU's bf16 default
        outputs, precision = export.openvino_outputs(version_dir / export.FORMS[form], images, "f32")
        results[form] = _form_metrics(outputs, labels, "openvino CPU", precision, reference)
    for form, values in results.items():
        _LOGGER.info(
            "held-out %s: accuracy %.4f, f1 %.4f, max |logit - saved_model| %.2e",
            form, values["accuracy"], values["f1"], values["max_abs_logit_diff_vs_saved_model"],
            extra={"form": form, "metrics": {key: values[key] for key in ("accuracy", "f1", "n")}},
        )
    return results


def _form_metrics(
    outputs: dict[str, np.ndarray],
    labels: np.ndarray,
    engine: str,
    precision: str,
    reference: dict[str, np.ndarray],
) -> dict[str, Any]:
    predicted = (outputs["probabilities"].ravel() >= THRESHOLD).astype(int)
    gap = float(np.max(np.abs(outputs["logits"] - reference["logits"])))
    return {
        **binary_metrics(labels, predicted),
        "engine": engine,
        "inference_precision": precision,  # OpenVINO: read back from the compiled model
        "max_abs_logit_diff_vs_saved_model": gap,
    }


def _class_counts(labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, int]:
    return {name: int(np.sum(labels == index)) for index, name in enumerate(class_names)}


def _manifest(
    data: LabelledImages,
    settings: TrainSettings,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    metrics: dict[str, dict[str, Any]],
    parameters: int,
    train_s: float,
) -> dict[str, Any]:
    train_counts = _class_counts(data.labels[train_idx], data.class_names)
    test_counts = _class_counts(data.labels[test_idx], data.class_names)
    return {
        "name": settings.name,
        "version": settings.version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frameworks": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "openvino": ov.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,  # preprocess_image's resize: pixels depend on it
            "python": platform.python_version(),
        },
        "input": {"name": export.INPUT_NAME, "shape": list(export.INPUT_SHAPE), "dtype": "float32"},
        "outputs": {name: name for name in export.OUTPUT_NAMES},
        "preprocessing": {"function": "modelspec.preprocess.preprocess_image", "spec": "see 'spec'"},
        "spec": demo_spec(tuple(data.class_names), THRESHOLD).to_dict(),
        "class_names": list(data.class_names),
        "threshold": THRESHOLD,
        "decision": f"class_names[1] ({data.class_names[1]!r}) when probabilities >= threshold, else class_names[0]",
        "forms": dict(export.FORMS),
        "training": {
            "architecture": ARCHITECTURE,
            "parameters": parameters,
            "dropout_rate": DROPOUT_RATE,
            "optimizer": f"adam (lr {LEARNING_RATE:g})",
            "loss": "binary cross-entropy from logits",
            "epochs": settings.epochs,  # the most; convergence.epochs_run says how many ran
            "batch_size": BATCH_SIZE,
            "seed": settings.seed,
            "duration_s": round(train_s, 2),
        },
        "metrics_info": {
            "split": f"stratified held-out {TEST_FRACTION:.0%} of the dataset, never trained on",
            "confusion_matrix": CONFUSION_MATRIX_LAYOUT,
            "positive_class": data.class_names[1],
        },
        "metrics": metrics,
        "dataset": {
            "path": str(data.root),
            "source": settings.dataset_uri or str(data.root),
            "n_train": int(len(train_idx)),
            "n_test": int(len(test_idx)),
            "per_class": {
                name: {"train": train_counts[name], "test": test_counts[name]} for name in data.class_names
            },
            "skipped_files": len(data.skipped),
            "test_fraction": TEST_FRACTION,
            "held_out_sha256": held_out_fingerprint(data.root, [data.paths[i] for i in test_idx]),
            "seed": settings.seed,
            "note": data.note,
        },
    }

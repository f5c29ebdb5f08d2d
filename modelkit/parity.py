"""Parity: every engine and precision against the model's reference, on held-out or given images.

The reference is the model in its own source framework, on pixels from
`modelspec.preprocess.preprocess_image` and the manifest's spec: the SavedModel's serving signature
run directly with TensorFlow when the model has a `saved_model` form (the demo and Keras/SavedModel
imports), else the ONNX file through ONNX Runtime (`onnx`), else the TFLite file through the TFLite
interpreter (`tflite`). The images are the demo's held-out split, or a folder (`--images`): in
sub-folders named like the model's classes (labels known: accuracy), or flat (no labels). Each case
builds its engine the way the worker does (`worker.engines.create_engine`), decodes the same image
*bytes* with the spec (or its own preprocessing function, when a test swaps it), and is compared on
logits: probabilities saturate and hide differences.

Engines are compared with the reference on the same, possibly wrongly, preprocessed inputs, so
their agreement cannot show a wrong spec (RGB declared for a BGR model, a wrong mean): the
reference's own accuracy on labelled images can, and `--min-accuracy` turns it into a check.

Tolerances are keyed by the precision setting (a path set to f32 must meet the f32 bound, whatever
it runs), and for the setting "default" by the precision the engine reports it really ran. A
logit passes when |engine - reference| <= atol + rtol * |reference| (numpy.isclose's rule; INT8
compares logits clipped to +-10, see TOLERANCES); a label flip is a different side of the
decision threshold, counted only where the reference is farther from the threshold than the
tolerance (closer, rounding alone may decide the side). Wiring mistakes (wrong IR, wrong
preprocessing) show on the f32 paths, whose bound is tight; the reduced-precision bounds are loose
by nature.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from modelkit.errors import ModelkitError
from modelspec.preprocess import ImageRejected, preprocess_image
from modelspec.spec import ModelSpec, OutputSpec
from worker.engines import Engine
from worker.engines.base import in_fixed_batches

F32_EPS = float(np.finfo(np.float32).eps)
# Every case (ENGINE:PRECISION, as --engines takes them) and the form it runs, in table order: the
# default cases of a model are those whose form it has.
CASE_FORMS = {
    "openvino:f32": "openvino_fp32", "openvino:bf16": "openvino_fp32", "openvino:f16": "openvino_fp16",
    "openvino:int8": "openvino_int8", "openvino:default": "openvino_fp32", "tensorflow:f32": "saved_model",
    "tfserving-rest:f32": "saved_model", "tfserving-grpc:f32": "saved_model", "onnxruntime:f32": "onnx",
}
ENGINES = ("openvino", "tensorflow", "tfserving-rest", "tfserving-grpc", "onnxruntime")
# The forms a reference can run from, in order of preference: the model's own source framework.
REFERENCE_FORMS = ("saved_model", "onnx", "tflite")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    max_flip_fraction: float
    why: str
    clip: float | None = None  # compare logits clipped to [-clip, clip]; None: compare as they are
    # Plus this fraction of the reference's largest (clipped) |logit|: quantisation error scales
    # with the activations' range, which the logit range reflects, not with one logit's size.
    range_rtol: float = 0.0


# Measured on the demo model (180 held-out images, logits -18..9):
# - bf16 keeps 8 mantissa bits (~0.4% per op): max |d logit| 0.045; the f16 setting runs bf16 on
#   this CPU and adds FP16 weights: 0.065.
# - INT8 (NNCF min/max PTQ) clamps logits at the edge of its calibration range: the held-out logit
#   -18.1 comes out as -12.1 (same label, probability 1e-8 vs 5e-6), while below |logit| 10 the
#   largest gap is 0.28. So INT8 is compared on logits clipped to +-10 (probability 4.5e-5 from
#   certainty; no decision threshold in [1e-4, 1 - 1e-4] can tell such logits apart).
# - INT8 error depends on the build: seed 0's largest gap inside +-10 was 0.28, seed 2's 2.18
#   (with no label flip and the same accuracy). So INT8's bound adds 25% of the clipped logit
#   range, and label flips (at most 2%) are what really judges it.
TOLERANCES = {
    # f32: another library's kernels sum in another order. 256 float32 ULPs relative, and 1e-4
    # absolute for logits near zero (where a relative bound means nothing after cancellation),
    # plus 64 ULPs of the largest |logit|: a small logit is a difference of terms as large as the
    # logit range, so its rounding scales with that range. Measured against a float64 run of the
    # zoo's EfficientNetB0 (logits to 116): Keras f32 is 31 ULPs of the range away, ONNX Runtime's
    # default session 28, so two correct f32 runs can differ by ~60 (issue 14).
    "f32": Tolerance(atol=1e-4, rtol=256 * F32_EPS, max_flip_fraction=0.0, range_rtol=64 * F32_EPS,
                     why="same math, summation order only"),
    "bf16": Tolerance(atol=0.1, rtol=0.02, max_flip_fraction=0.01, why="bf16 compute, 8-bit mantissa"),
    "f16": Tolerance(atol=0.1, rtol=0.02, max_flip_fraction=0.01, why="f16 compute, 11-bit mantissa"),
    "int8": Tolerance(atol=0.5, rtol=0.1, max_flip_fraction=0.02, clip=10.0, range_rtol=0.25,
                      why="int8 PTQ: error scales with the activations' range; clamps confident logits"),
}


def tolerance_for(setting: str, effective_precision: str) -> Tolerance:
    """The setting's tolerance; for "default", the loosest among the precisions a (possibly
    mixed, "int8+f32") path reports."""
    if setting != "default":
        if setting not in TOLERANCES:
            raise ModelkitError(f"no parity tolerance for precision setting {setting!r}")
        return TOLERANCES[setting]
    parts = effective_precision.split("+")
    order = ["int8", "f16", "bf16", "f32"]
    known = [part for part in order if part in parts]
    if not known:
        raise ModelkitError(f"no parity tolerance for precision {effective_precision!r}")
    return TOLERANCES[known[0]]


@dataclass(frozen=True)
class Case:
    """One row of the table: how to build the engine and how it preprocesses bytes."""

    engine: str
    precision: str  # the setting (WORKER_PRECISION)
    make: Callable[[], Engine]
    # None: the model's own spec, run by preprocess_image (tests swap in wrong wiring here)
    preprocess: Callable[[bytes], np.ndarray] | None = None
    label: str = ""  # e.g. "rest" for tfserving

    @property
    def name(self) -> str:
        return f"{self.engine} ({self.label})" if self.label else self.engine


@dataclass
class Row:
    engine: str
    precision: str
    effective: str = "-"
    form: str = "-"
    n: int = 0
    max_abs_diff: float = math.nan
    worst_ratio: float = math.nan  # max |d| / (atol + rtol |ref|); <= 1 passes
    flips: int = 0
    accuracy: float = math.nan
    batch_ms: float = math.nan  # median wall time of one batch of batch_size
    tolerance: Tolerance | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        if self.error or self.tolerance is None:
            return False
        allowed_flips = math.floor(self.tolerance.max_flip_fraction * self.n)
        return self.worst_ratio <= 1.0 and self.flips <= allowed_flips


@dataclass(frozen=True)
class HeldOut:
    paths: tuple[Path, ...]
    labels: np.ndarray
    data: tuple[bytes, ...]


def held_out_images(manifest: dict[str, Any], dataset_dir: Path | None = None) -> HeldOut:
    """Recompute the model's held-out split from its dataset folder (same loader, split and seed
    as training) and check it is the same set of files when the manifest records a fingerprint."""
    from modelkit.dataset import held_out_fingerprint, load_labelled_folder, stratified_split

    info = manifest.get("dataset") or {}
    root = Path(dataset_dir or info.get("path") or "")
    if not root.is_dir():
        raise ModelkitError(f"dataset folder {root} not found: "
                            "pass --dataset-dir (the folder the model was trained on)")
    data = load_labelled_folder(root)
    if list(data.class_names) != list(manifest["class_names"]):
        raise ModelkitError(f"{root} has classes {list(data.class_names)}, the model {manifest['class_names']}")
    _, test_idx = stratified_split(data.labels, float(info.get("test_fraction", 0.3)), int(info.get("seed", 0)))
    paths = tuple(data.paths[i] for i in test_idx)
    expected = info.get("held_out_sha256")
    if expected and held_out_fingerprint(root, list(paths)) != expected:
        raise ModelkitError(f"the held-out split recomputed from {root} is not the one the model was evaluated on "
                            "(files added, removed or renamed since training)")
    return HeldOut(paths=paths, labels=data.labels[test_idx], data=tuple(p.read_bytes() for p in paths))


@dataclass(frozen=True)
class FolderImages:
    """Images of a folder the spec can read, sorted by path, and the files it could not."""

    folder: Path
    paths: tuple[Path, ...]
    data: tuple[bytes, ...]
    pixels: np.ndarray  # preprocess_image of each, stacked
    labels: np.ndarray | None  # class index (in the spec's class_names) per image; None: no class sub-folders
    skipped: tuple[tuple[Path, str], ...]  # (file, reason code) the spec could not read

    def describe(self) -> str:
        if self.labels is None:
            how = "no labels (no sub-folder named like a class)"
        else:
            counts = Counter(path.relative_to(self.folder).parts[0] for path in self.paths)
            how = f"labelled by class sub-folder ({', '.join(f'{name} {n}' for name, n in sorted(counts.items()))})"
        skipped = ""
        if self.skipped:
            path, reason = self.skipped[0]
            skipped = (f"; {len(self.skipped)} file(s) skipped, not images the spec can read (first: "
                       f"{path.relative_to(self.folder)}: {reason})")
        return f"{len(self.data)} from {self.folder}, {how}{skipped}"


def images_from_folder(folder: Path, spec: ModelSpec, limit: int | None = None) -> FolderImages:
    """Every file under folder (recursively, hidden ones left out, sorted by path) the spec can read.

    Labelled when its sub-folders are named like the model's classes: each image's label is the
    class of the sub-folder it is in (not every class needs one). Then every sub-folder must be a
    class and no file may lie beside them; a folder with no such sub-folder is unlabelled. With a
    limit, that many files evenly spaced over the sorted list (so every class keeps its share).
    Files the spec cannot read are skipped and counted; a folder without a readable image is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelkitError(f"--images {folder} is not a folder")

    def visible(path: Path) -> bool:
        return not any(part.startswith(".") for part in path.relative_to(folder).parts)

    names = list(spec.output.class_names)
    entries = [path for path in folder.iterdir() if visible(path)]
    subfolders = sorted(path.name for path in entries if path.is_dir())
    labelled = any(name in names for name in subfolders)
    if labelled:
        strays = [name for name in subfolders if name not in names]
        if strays:
            raise ModelkitError(f"--images {folder}: sub-folder(s) {', '.join(strays)} are not classes of the model "
                                f"({', '.join(names)}): name each sub-folder after a class, or give a folder "
                                "without class sub-folders (no labels)")
        loose = sorted(path.name for path in entries if path.is_file())
        if loose:
            raise ModelkitError(f"--images {folder} has class sub-folders and {len(loose)} file(s) beside them "
                                f"({loose[0]}{', ...' if len(loose) > 1 else ''}): put each image in the sub-folder "
                                "of its class")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and visible(path))
    if limit is not None and len(files) > limit:
        files = [files[i] for i in sorted(set(np.linspace(0, len(files) - 1, limit).round().astype(int).tolist()))]
    paths, data, pixels, labels, skipped = [], [], [], [], []
    for path in files:
        try:
            blob = path.read_bytes()
            pixels.append(preprocess_image(blob, spec))
        except ImageRejected as exc:
            skipped.append((path, exc.reason))
            continue
        except OSError as exc:
            skipped.append((path, type(exc).__name__))
            continue
        paths.append(path)
        data.append(blob)
        if labelled:
            labels.append(names.index(path.relative_to(folder).parts[0]))
    if not data:
        raise ModelkitError(f"--images {folder} holds no image the spec can read ({len(files)} files, "
                            f"{len(skipped)} skipped)")
    return FolderImages(folder=folder, paths=tuple(paths), data=tuple(data), pixels=np.stack(pixels),
                        labels=np.asarray(labels, dtype=int) if labelled else None, skipped=tuple(skipped))


def default_cases(forms: dict[str, str]) -> list[str]:
    """Every ENGINE:PRECISION case the model's forms allow, in table order."""
    return [case for case, form in CASE_FORMS.items() if form in forms]


@dataclass(frozen=True)
class Reference:
    form: str  # the form it ran: saved_model, onnx or tflite
    runtime: str  # e.g. "onnxruntime 1.31.1 (CPUExecutionProvider)"
    outputs: np.ndarray  # (n, units) float32

    def describe(self) -> str:
        return f"the {self.form} form run by {self.runtime}"


def reference_outputs(version_dir: Path, manifest: dict[str, Any], images: np.ndarray, batch_size: int = 32,
                      spec: ModelSpec | None = None) -> Reference:
    """The model in its own source framework on preprocessed images: the SavedModel through
    TensorFlow, else the ONNX file through ONNX Runtime, else the TFLite file through the TFLite
    interpreter (ONNX and TFLite run as the import measured them: modelkit.importer's sources)."""
    from modelspec.spec import spec_from_manifest

    version_dir = Path(version_dir)
    spec = spec or spec_from_manifest(manifest)
    forms: dict[str, str] = manifest.get("forms", {})
    form = next((name for name in REFERENCE_FORMS if name in forms), None)
    if form is None:
        raise ModelkitError(f"model {manifest.get('name')}/{manifest.get('version')} has no form a reference can run "
                            f"(one of {', '.join(REFERENCE_FORMS)}; it has {', '.join(sorted(forms))})")
    path = version_dir / forms[form]
    if form == "saved_model":
        import tensorflow as tf

        from modelkit.layout import SIGNATURE

        return Reference(form, f"tensorflow {tf.__version__} ({SIGNATURE} signature)",
                         reference_logits(path, images, batch_size, spec))
    from modelkit.importer import OnnxSource, TFLiteSource

    source = (OnnxSource if form == "onnx" else TFLiteSource)(path)
    outputs = source.run(images, spec)
    return Reference(form, source.runtime, np.asarray(outputs, dtype=np.float32).reshape(len(images), -1))


def reference_logits(version_dir: Path, images: np.ndarray, batch_size: int = 32,
                     spec: ModelSpec | None = None) -> np.ndarray:
    """TensorFlow, the SavedModel's serving_default signature, nothing else in between:
    (n, units), the spec's output (a fixed batch dimension is fed in slices of its size)."""
    import tensorflow as tf

    from modelkit.layout import SIGNATURE
    from modelspec.manifest import load_manifest
    from modelspec.spec import spec_from_manifest

    spec = spec or spec_from_manifest(load_manifest(version_dir))
    signature = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]

    def once(part: np.ndarray) -> np.ndarray:
        outputs = signature(**{spec.input.name: tf.constant(np.ascontiguousarray(part, dtype=np.float32))})
        return outputs[spec.output.name].numpy().reshape(len(part), -1)

    parts = [in_fixed_batches(once, images[i : i + batch_size], spec.input.batch)
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).reshape(len(images), -1).astype(np.float32)


def accuracy(outputs: np.ndarray, labels: np.ndarray, output: OutputSpec) -> float:
    """Share of images whose decision (modelspec.outputs.predictions, as the worker decides) is their label."""
    from modelspec.outputs import predictions

    chosen = np.asarray([p.class_index for p in predictions(outputs, output)])
    return float(np.mean(chosen == np.asarray(labels)))


def run_case(case: Case, data: tuple[bytes, ...], labels: np.ndarray | None, reference: np.ndarray,
             threshold_logit: float, spec: ModelSpec, batch_size: int = 32, timing_batches: int = 5) -> Row:
    """One engine x precision on data, against the reference's outputs. labels: class indices, or
    None (accuracy not known). threshold_logit: the decision threshold on a one-unit output as the
    model gives it (`decision_threshold`)."""
    prepare = case.preprocess or (lambda item: preprocess_image(item, spec))
    row = Row(engine=case.name, precision=case.precision, n=len(data))
    try:
        engine = case.make()
        engine.load()
        engine.warmup()
        info = engine.describe()
        row.effective, row.form = info.precision, info.model_form
        row.tolerance = tolerance_for(case.precision, info.precision)
        pixels = np.stack([prepare(item) for item in data])
        logits = np.concatenate([engine.infer(pixels[i : i + batch_size])
                                 for i in range(0, len(pixels), batch_size)]).reshape(len(pixels), -1)
        timings = []
        timing_batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
        for _ in range(timing_batches):
            started = time.perf_counter()
            engine.infer(timing_batch)
            timings.append((time.perf_counter() - started) * 1000.0)
    except Exception as exc:  # one broken engine is a failed row, not a crashed table
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    tolerance = row.tolerance
    reference = np.asarray(reference, dtype=np.float32).reshape(len(logits), -1)
    ours, theirs = logits.astype(np.float64), reference.astype(np.float64)
    if tolerance.clip is not None:
        ours, theirs = np.clip(ours, -tolerance.clip, tolerance.clip), np.clip(theirs, -tolerance.clip, tolerance.clip)
    diff = np.abs(ours - theirs)
    bound = (tolerance.atol + tolerance.rtol * np.abs(theirs)
             + tolerance.range_rtol * (float(np.abs(theirs).max()) if theirs.size else 0.0))
    row.max_abs_diff = float(np.abs(logits.astype(np.float64) - reference).max())  # unclipped, for the record
    row.worst_ratio = float((diff / bound).max())
    # A reference within the tolerance of the decision (the threshold; for N classes, the runner-up)
    # may fall on either side by rounding alone: only a clearly decided image can flip.
    if logits.shape[1] == 1:
        decided = np.abs(theirs[:, 0] - threshold_logit) > bound[:, 0]
        ours_top, theirs_top = (logits[:, 0] >= threshold_logit).astype(int), (reference[:, 0] >= threshold_logit)
    else:
        ranked = np.sort(theirs, axis=1)
        decided = ranked[:, -1] - ranked[:, -2] > 2 * bound.max(axis=1)
        ours_top, theirs_top = logits.argmax(axis=1), reference.argmax(axis=1)
    row.flips = int(np.sum(decided & (ours_top != theirs_top)))
    row.accuracy = float(np.mean(ours_top == labels)) if labels is not None else math.nan
    row.batch_ms = statistics.median(timings)
    return row


def threshold_logit(threshold: float) -> float:
    return math.log(threshold / (1.0 - threshold))


def decision_threshold(output: OutputSpec) -> float:
    """Where a one-unit output changes class, on the number the model gives: the threshold's logit
    for a logit (sigmoid), the threshold itself for a probability."""
    return threshold_logit(output.threshold) if output.activation == "sigmoid" else output.threshold


def format_table(rows: list[Row], batch_size: int) -> str:
    header = ("engine", "precision", "effective", "form", "n", "max |d logit|", "tolerance", "d/tol", "flips",
              "accuracy", f"b={batch_size} ms", "result")
    lines = [header]
    for row in rows:
        tol = row.tolerance
        tolerance = (f"atol {tol.atol:g} rtol {tol.rtol:g}" + (f" clip {tol.clip:g}" if tol.clip else "")
                     + (f" +{tol.range_rtol:g} range" if tol.range_rtol else "")
                     + f" flips<={math.floor(tol.max_flip_fraction * row.n)}") if tol else "-"
        result = "ok" if row.passed else ("ERROR " + (row.error or "")[:120] if row.error else "FAIL")
        lines.append((row.engine, row.precision, row.effective, row.form, str(row.n), f"{row.max_abs_diff:.3g}",
                      tolerance, f"{row.worst_ratio:.2f}", str(row.flips),
                      "-" if math.isnan(row.accuracy) else f"{row.accuracy:.4f}",
                      f"{row.batch_ms:.2f}", result))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(out)

"""`python -m modelkit zoo`: the seeds' architectures, built here and imported like any user's model.

The TensorRT, edge and timing seeds measured MobileNet, ResNet50/152, VGG16, Xception, InceptionV3
and EfficientNetB0. Nothing is downloaded: each network is built by `keras.applications` with
weights=None at its native input size, with a 2-class head (the demo dataset's grass/moon), and
given weights in one of two ways, recorded in build/zoo/NAME/record.json:

- trained end to end ("full"): a short fit on demo images (a budget of a few hundred images, 1-2
  epochs), then the held-out accuracy of the Keras model. 2 shared vCPUs make this cheap only for the
  light networks.
- head only ("head": VGG16, Xception, InceptionV3, ResNet152): a full fit costs several seconds per
  image per step here, so the convolutional body keeps its random initial weights and only the
  classifier layer is fitted, a linear probe on the body's features of the same demo images (one
  forward pass per image, then a logistic fit in seconds). Random convolutional features separate
  grass from moon well, so the held-out accuracy means something and the INT8 accuracy change can
  be set beside the seeds'; it is not ImageNet accuracy, and the README says so.

Either way the BatchNormalization statistics are then set from one batch of demo images (momentum 0
for one forward pass): a short fit leaves the moving averages at their initial values, and the
inference graph would otherwise see activations the training never did.

Then each network goes through `python -m modelkit import` (a subprocess: the very command users
run), INT8 calibrated on demo images outside the held-out set. An ONNX export (tf2onnx) of the same
Keras model goes through the same import as version 2 of the same name, so ONNX Runtime runs the
same weights. Results are cached: a network whose record matches the requested build and whose
versions verify is not rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

LABELS = ("grass", "moon")
ZOO_ROOT = Path("build/zoo")
DATASET_DIR = Path("build/demo-dataset")
HELD_OUT = 64  # images never trained on nor calibrated on: accuracy and fidelity are measured on them
CALIBRATION = 100  # INT8 calibration images (from the training side of the split)
KERAS_VERSION, ONNX_VERSION, ONNX_INT8_VERSION = 1, 2, 3  # the model versions of one network's imports

# keras.applications preprocess_input modes, as spec flags of `modelkit import`.
PREPROCESS = {
    "tf": {"scale": 1 / 127.5, "offset": -1.0, "color": "rgb"},  # [-1, 1]
    "caffe": {"scale": 1.0, "offset": 0.0, "color": "bgr", "mean": (103.939, 116.779, 123.68)},
    "identity": {"scale": 1.0, "offset": 0.0, "color": "rgb"},  # EfficientNet rescales inside the graph
}


@dataclass(frozen=True)
class Network:
    name: str  # the zoo's key and the model name's suffix (zoo-NAME)
    builder: str  # keras.applications attribute, or "tiny" (the tests' network)
    size: int  # native input size (square)
    preprocess: str  # key of PREPROCESS
    train_images: int  # 0: fidelity only (random weights)
    epochs: int = 1
    why_not_trained: str = ""
    training: str = "full"  # "full": fit end to end; "head": fit the classifier on the frozen random body


_HEAVY = ("a full fit is too slow on 2 shared vCPUs (several s per image per step): random convolutional body, "
          "classifier fitted on its features (linear probe)")
NETWORKS = {n.name: n for n in (
    Network("mobilenetv2", "MobileNetV2", 224, "tf", train_images=256, epochs=2),
    Network("resnet50", "ResNet50", 224, "caffe", train_images=192),
    Network("efficientnetb0", "EfficientNetB0", 224, "identity", train_images=192),
    Network("vgg16", "VGG16", 224, "caffe", 192, why_not_trained=_HEAVY, training="head"),
    Network("xception", "Xception", 299, "tf", 192, why_not_trained=_HEAVY, training="head"),
    Network("inceptionv3", "InceptionV3", 299, "tf", 192, why_not_trained=_HEAVY, training="head"),
    Network("resnet152", "ResNet152", 224, "caffe", 192, why_not_trained=_HEAVY, training="head"),
    # Not a seed network: a 2-layer CNN at 32x32 for the tests (seconds, not minutes).
    Network("tiny", "tiny", 32, "tf", train_images=64),
)}
DEFAULT_NETWORKS = ("mobilenetv2", "resnet50", "vgg16", "xception", "inceptionv3", "efficientnetb0", "resnet152")


class ZooError(RuntimeError):
    pass


def model_name(network: str) -> str:
    return f"zoo-{network}"


def import_flags(net: Network) -> list[str]:
    """The spec flags `modelkit import` gets for this network (also the training preprocessing)."""
    p = PREPROCESS[net.preprocess]
    flags = ["--color", p["color"], "--scale", repr(p["scale"]), "--offset", repr(p["offset"]),
             "--labels", ",".join(LABELS), "--kind", "logits", "--activation", "softmax"]
    if "mean" in p:
        flags += ["--mean", ",".join(str(m) for m in p["mean"])]
    return flags


def training_spec(net: Network):
    """The ModelSpec import will assemble from import_flags: training and serving share
    modelspec.preprocess.preprocess_image with it."""
    from modelspec.spec import ModelSpec

    p = PREPROCESS[net.preprocess]
    return ModelSpec.from_dict({
        "input": {"name": "image", "height": net.size, "width": net.size, "channels": 3, "color": p["color"]},
        "preprocess": {"scale": p["scale"], "offset": p["offset"], "mean": list(p.get("mean", (0.0,)))},
        "output": {"name": "logits", "kind": "logits", "activation": "softmax", "class_names": list(LABELS)},
    })


def split_dataset(dataset_dir: Path, seed: int, held_out: int = HELD_OUT) -> dict[str, list[tuple[str, int]]]:
    """(relative path, class index) lists: held_out images, and the rest (training and calibration),
    by a seeded permutation of the files sorted by path."""
    files = [(str(path.relative_to(dataset_dir)), LABELS.index(path.parent.name))
             for path in sorted(Path(dataset_dir).glob("*/*.png")) if path.parent.name in LABELS]
    if len(files) < held_out + 16:
        raise ZooError(f"{dataset_dir} has {len(files)} labelled PNGs in {'/'.join(LABELS)} sub-folders; the zoo needs "
                       f"at least {held_out + 16}: run `make model` (it writes the demo dataset)")
    order = np.random.default_rng(seed).permutation(len(files))
    ordered = [files[i] for i in order]
    return {"held_out": ordered[:held_out], "rest": ordered[held_out:]}


def load_images(dataset_dir: Path, items: list[tuple[str, int]], spec) -> tuple[np.ndarray, np.ndarray]:
    from modelspec.preprocess import preprocess_image

    x = np.stack([preprocess_image((Path(dataset_dir) / rel).read_bytes(), spec) for rel, _ in items])
    return x, np.asarray([label for _, label in items], dtype=np.int64)


def build_keras(net: Network, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    shape = (net.size, net.size, 3)
    if net.builder == "tiny":
        inputs = keras.Input(shape, name="image")
        x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(len(LABELS), name="logits")(x), name="tiny")
    build = getattr(keras.applications, net.builder)
    return build(weights=None, input_shape=shape, classes=len(LABELS), classifier_activation=None)


def recalibrate_batchnorm(model, images: np.ndarray) -> int:
    """Set every BatchNormalization's moving mean/variance from one forward pass over images."""
    import keras

    layers = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def train_briefly(model, net: Network, x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    started = time.perf_counter()
    history = model.fit(x, y, batch_size=16, epochs=net.epochs, verbose=0, shuffle=True)
    return {"train_s": round(time.perf_counter() - started, 1), "images": int(len(x)), "epochs": net.epochs,
            "batch_size": 16, "optimizer": "Adam 1e-3",
            "final_train_accuracy": float(history.history["accuracy"][-1])}


def train_head(model, x: np.ndarray, y: np.ndarray, seed: int, batch_size: int = 16) -> dict[str, Any]:
    """Fit only the last (Dense) layer: logistic regression on the frozen body's features of x,
    scaled to unit RMS for the fit and the scale folded back into the layer's kernel, so the saved
    model is the plain keras.applications graph."""
    import keras

    classifier = model.layers[-1]
    if not isinstance(classifier, keras.layers.Dense):
        raise ZooError(f"{model.name}: the last layer is {type(classifier).__name__}, not the Dense classifier a "
                       "head-only fit replaces")
    started = time.perf_counter()
    body = keras.Model(model.inputs, classifier.input)
    features = np.concatenate([np.asarray(body(x[i:i + batch_size], training=False), dtype=np.float64)
                               for i in range(0, len(x), batch_size)])
    features = features.reshape(len(x), -1)
    # One scale for all features, no centring: folding per-feature standardisation back gives a
    # near-constant feature a kernel weight of w/std and the bias -w.mean/std, large terms that
    # cancel, and float32 engines then disagree far beyond their rounding (ResNet152's SavedModel
    # differed from Keras by 7x the f32 tolerance that way).
    scale = float(np.sqrt(np.mean(features ** 2))) or 1.0
    keras.utils.set_random_seed(seed)
    probe = keras.Sequential([keras.Input((features.shape[1],)),
                              keras.layers.Dense(classifier.units, kernel_regularizer=keras.regularizers.L2(1e-3))])
    probe.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = probe.fit((features / scale).astype(np.float32), y, batch_size=32, epochs=60, verbose=0, shuffle=True)
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in probe.layers[-1].get_weights())
    classifier.set_weights([(kernel / scale).astype(np.float32), bias.astype(np.float32)])
    return {"mode": "head", "train_s": round(time.perf_counter() - started, 1), "images": int(len(x)),
            "features": int(features.shape[1]), "feature_layer": classifier.name, "epochs": 60, "batch_size": 32,
            "optimizer": "Adam 1e-2, L2 1e-3 on features scaled to unit RMS", "head_fit": HEAD_FIT_VERSION,
            "final_train_accuracy": float(history.history["accuracy"][-1])}


HEAD_FIT_VERSION = 2  # bump when train_head changes: head-fitted networks are rebuilt
ONNX_EXPORT_FORMAT = 3  # bump when export_onnx changes how it exports: failed ONNX steps are retried
# Resident-memory limit of the tf2onnx subprocess: most of the machine's memory, never all of it.
ONNX_EXPORT_MEMORY_BYTES = int(0.85 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def export_onnx(saved_model_dir: Path, path: Path, memory_bytes: int = ONNX_EXPORT_MEMORY_BYTES) -> str:
    """tf2onnx from the imported SavedModel (the same weights and signature names as every other
    form), in a subprocess watched for memory: ResNet50 needs ~7 GB, VGG16 more, and an
    out-of-memory kill could take the caller with it. The watch reads the resident set (an
    address-space limit instead made tf2onnx crash with SIGSEGV on VGG16 at 20 GB, far below its
    real use, as TensorFlow reserves much more than it touches)."""
    import tempfile

    import psutil
    import tf2onnx

    work = Path(tempfile.mkdtemp(prefix="onnx-export-", dir=path.parent))
    archive = work / "model.zip"
    # --large_model keeps the weights out of the graph while tf2onnx works on it: VGG16 then peaks
    # at 17.6 GB resident instead of passing 20 GB. Its writer still calls numpy.product, which
    # numpy 2 removed (tf2onnx 1.17.0), hence the alias before tf2onnx's own entry point runs.
    command = [sys.executable, "-c", TF2ONNX_ENTRY, "--saved-model", str(saved_model_dir), "--output", str(archive),
               "--opset", "17", "--large_model"]
    peak, over = 0, False
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            if peak > memory_bytes:
                over = True
                child.kill()
                child.wait()
                break
            time.sleep(0.25)
        log.seek(0)
        tail = " ".join(log.read()[-600:].split())
    try:
        if over or child.returncode != 0 or not archive.is_file():
            cause = (f"its resident memory passed {memory_bytes / 2**30:.0f} GB and it was stopped" if over
                     else f"exit {child.returncode}, peak resident memory {peak / 2**30:.1f} GB")
            raise ZooError(f"tf2onnx {tf2onnx.__version__} could not convert {saved_model_dir} ({cause}): {tail}")
        _single_onnx_file(archive, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return (f"tf2onnx {tf2onnx.__version__} from the imported SavedModel, opset 17, --large_model "
            f"(peak resident {peak / 2**30:.1f} GB)")


# `python -m tf2onnx.convert`, with numpy.product (gone in numpy 2, still called by tf2onnx 1.17.0's
# --large_model writer) aliased to numpy.prod.
TF2ONNX_ENTRY = ("import runpy, sys, numpy; numpy.product = numpy.prod; sys.argv[0] = 'tf2onnx.convert'; "
                 "runpy.run_module('tf2onnx.convert', run_name='__main__')")


def _single_onnx_file(archive: Path, path: Path) -> None:
    """tf2onnx's --large_model zip (graph plus one file per weight) as one self-contained .onnx
    file, the form `modelkit import` and ONNX users handle; fine below protobuf's 2 GB."""
    import zipfile

    import onnx

    unpacked = archive.parent / "unpacked"
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(unpacked)
    graphs = sorted(unpacked.glob("*.onnx"))
    if len(graphs) != 1:
        raise ZooError(f"tf2onnx's archive {archive} holds {len(graphs)} .onnx graphs, not one")
    model = onnx.load(str(graphs[0]), load_external_data=True)
    onnx.save(model, str(path))


def quantize_onnx(source: Path, target: Path, calibration: np.ndarray, input_name: str) -> str:
    """ONNX Runtime's own static INT8 quantization (QDQ, per-channel int8 weights, uint8
    activations) calibrated on the same demo images as OpenVINO's: the ONNX user's INT8 path."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([{input_name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._feeds, None)

    prepared = target.with_name("model-preprocessed.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()
    return (f"onnxruntime {onnxruntime.__version__} quantize_static: QDQ, per-channel int8 weights, uint8 "
            f"activations, MinMax on {len(calibration)} calibration images")


def run_import(source: Path, net: Network, models_root: Path, version: int, calibration_dir: Path | None) -> dict:
    """`python -m modelkit import` in a subprocess: the command users run, nothing special."""
    command = [sys.executable, "-m", "modelkit", "import", str(source), "--name", model_name(net.name),
               "--version", str(version), "--models-root", str(models_root), "--overwrite", *import_flags(net)]
    if calibration_dir is not None:
        command += ["--calibration-dir", str(calibration_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        raise ZooError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    from modelkit.layout import version_dir_for
    from modelspec.manifest import verify_manifest

    manifest = verify_manifest(version_dir_for(models_root, model_name(net.name), version))
    return {"command": " ".join(command), "seconds": round(time.perf_counter() - started, 1),
            "forms": manifest["forms"], "parity": manifest["parity"]["forms"]}


def build_record_key(net: Network, seed: int, dataset_dir: Path) -> dict:
    network = asdict(net)
    if network["training"] == "full":  # the field came later: full-trained networks keep their cached builds
        del network["training"]
    else:
        network["head_fit"] = HEAD_FIT_VERSION
    return {"network": network, "seed": seed, "dataset": str(dataset_dir), "held_out": HELD_OUT,
            "calibration": CALIBRATION, "zoo_format": 1}


def cached_record(root: Path, net: Network, key: dict) -> dict | None:
    """The record of an earlier build with the same key whose model versions still verify."""
    from modelkit.layout import version_dir_for
    from modelspec.manifest import verify_manifest

    path = root / net.name / "record.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key:
        return None
    try:
        for version in record["versions"].values():
            verify_manifest(version_dir_for(root / "models", model_name(net.name), int(version)))
    except Exception:
        return None
    return record


def build_network(name: str, root: Path = ZOO_ROOT, dataset_dir: Path = DATASET_DIR, seed: int = 0,
                  force: bool = False, log=print, in_process: bool = False, train_only: bool = False) -> dict:
    """Build, train (or not), save, import through `modelkit import`; returns the record (cached).

    A build runs in a process of its own (`python -m modelkit zoo --networks NAME --in-process`)
    unless in_process: TensorFlow keeps what a network's build allocated until its process ends
    (11 GB after VGG16 and ResNet152 in one process, which the kernel's OOM killer then ended), and
    the caller may be a bench that goes on to time engines."""
    if name not in NETWORKS:
        raise ZooError(f"unknown network {name!r} (known: {', '.join(NETWORKS)})")
    net = NETWORKS[name]
    root, dataset_dir = Path(root), Path(dataset_dir)
    key = build_record_key(net, seed, dataset_dir)
    if not force and (record := cached_record(root, net, key)) is not None:
        log(f"{name}: cached ({root / name / 'record.json'})")
        return add_onnx_int8(add_onnx(record, net, root, log), net, root, dataset_dir, log)
    if not in_process:
        return _build_in_child(name, root, dataset_dir, seed, force, log)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = root / name
    trained_file = work / "trained.json"  # what the fit left (model.keras of this key), for later steps
    kept = json.loads(trained_file.read_text()) if trained_file.is_file() and (work / "model.keras").is_file() else None
    if kept is None or kept.get("key") != key:
        kept = None
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    split = split_dataset(dataset_dir, seed)
    spec = training_spec(net)
    rest = split["rest"]
    if kept is None or "keras_held_out_accuracy" not in kept:
        kept = _train_and_save(net, name, work, key, kept, split, spec, dataset_dir, seed, log)
    if train_only:
        return kept  # the caller's next process imports, without this one's TensorFlow memory
    record: dict[str, Any] = {"key": key, "network": name, "keras_application": net.builder,
                              "input_size": net.size, "preprocess": net.preprocess,
                              "parameters": kept["parameters"], "held_out": split["held_out"],
                              "training": kept["training"],
                              "batchnorm_layers_recalibrated": kept["batchnorm_layers_recalibrated"],
                              "keras_held_out_accuracy": kept["keras_held_out_accuracy"],
                              "trained": bool(net.train_images),  # full or head: the accuracy means something
                              "training_mode": net.training if net.train_images else "none"}
    if net.training != "full" or not net.train_images:
        record["not_trained_why"] = net.why_not_trained
    keras_file = work / "model.keras"
    # Calibration images: from the training side of the split, never the held-out ones.
    calibration_dir = work / "calibration"
    for rel, _ in rest[-CALIBRATION:]:
        target = calibration_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dataset_dir / rel, target)
    models_root = root / "models"
    log(f"{name}: modelkit import (Keras, INT8 calibrated on {CALIBRATION} demo images)")
    record["imports"] = {"keras": run_import(keras_file, net, models_root, KERAS_VERSION, calibration_dir)}
    record["versions"] = {"keras": KERAS_VERSION}
    record["sizes_bytes"] = {"keras": keras_file.stat().st_size}
    (work / "record.json").write_text(json.dumps(record, indent=2))
    return add_onnx_int8(add_onnx(record, net, root, log), net, root, dataset_dir, log)


def _train_and_save(net: Network, name: str, work: Path, key: dict, kept: dict | None, split: dict, spec,
                    dataset_dir: Path, seed: int, log) -> dict:
    """Build and fit (or reuse the fitted model.keras), measure the Keras held-out accuracy, save;
    returns what trained.json keeps, so that later steps need not load the model again."""
    import keras

    trained_file = work / "trained.json"
    rest = split["rest"]
    if kept is not None:
        log(f"{name}: reusing the trained {work / 'model.keras'} ({trained_file})")
        model = keras.models.load_model(str(work / "model.keras"), compile=False)
        training, recalibrated = kept["training"], kept["batchnorm_layers_recalibrated"]
    else:
        model = build_keras(net, seed)
        if net.train_images and net.training == "head":
            log(f"{name}: fitting the classifier on the random body's features of {net.train_images} images at "
                f"{net.size}px")
            x, y = load_images(dataset_dir, rest[:net.train_images], spec)
            # The body's statistics first: the probe is fitted on the features inference will compute.
            recalibrated = recalibrate_batchnorm(model, x[:32])
            training = train_head(model, x, y, seed)
            log(f"{name}: classifier fitted in {training['train_s']} s")
        else:
            if net.train_images:
                log(f"{name}: training on {net.train_images} images x {net.epochs} epoch(s) at {net.size}px")
                x, y = load_images(dataset_dir, rest[:net.train_images], spec)
                training = train_briefly(model, net, x, y, seed)
                log(f"{name}: trained in {training['train_s']} s")
                bn_images = x[:64]
            else:
                training = None
                bn_images, _ = load_images(dataset_dir, rest[:32], spec)
            recalibrated = recalibrate_batchnorm(model, bn_images)
        model.save(work / "model.keras")
    held_x, held_y = load_images(dataset_dir, split["held_out"], spec)
    logits = np.concatenate([np.asarray(model(held_x[i:i + 16], training=False)) for i in range(0, len(held_x), 16)])
    accuracy = float(np.mean(logits.argmax(axis=1) == held_y))
    log(f"{name}: Keras held-out accuracy {accuracy:.3f} on {len(held_y)} images")
    kept = {"key": key, "training": training, "batchnorm_layers_recalibrated": recalibrated,
            "parameters": int(model.count_params()), "keras_held_out_accuracy": accuracy}
    trained_file.write_text(json.dumps(kept))
    return kept


def _build_in_child(name: str, root: Path, dataset_dir: Path, seed: int, force: bool, log) -> dict:
    """Fit and save in one process, import in the next: the import's engines and tf2onnx then have
    the memory the fit's TensorFlow held."""
    common = [sys.executable, "-m", "modelkit", "zoo", "--networks", name, "--root", str(root), "--dataset-dir",
              str(dataset_dir), "--seed", str(seed), "--in-process"]
    common += ["--force"] if force else []
    _run_child([*common, "--train-only"], name, log)
    _run_child(common, name, log)
    record_file = root / name / "record.json"
    return json.loads(record_file.read_text())


def _run_child(command: list[str], name: str, log) -> None:
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}) as child:
        tail: list[str] = []
        for line in child.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            if line.startswith(f"{name}:") or line.startswith("Error"):
                log(line)
    if child.returncode != 0:
        killed = " (killed by a signal: out of memory?)" if child.returncode < 0 else ""
        raise ZooError(f"`{' '.join(command)}` failed (exit {child.returncode}{killed}):\n" + "\n".join(tail))


def onnx_attempt_key() -> dict:
    """What decides whether the ONNX export and import succeed: a cached build whose ONNX step
    failed under other values is tried again."""
    from importlib.metadata import version

    # The installed version, without importing tf2onnx (it imports TensorFlow: seconds per call).
    return {"tf2onnx": version("tf2onnx"), "memory_bytes": ONNX_EXPORT_MEMORY_BYTES, "export": ONNX_EXPORT_FORMAT,
            "parity_inputs": "calibration images"}


def add_onnx(record: dict, net: Network, root: Path, log=print) -> dict:
    """The ONNX export of the imported SavedModel (tf2onnx) through `modelkit import` as version 2;
    a failure is recorded (onnx_skipped), not fatal: TensorFlow and OpenVINO are still measured."""
    attempt = onnx_attempt_key()
    if "onnx" in record["versions"] or record.get("onnx_attempt") == attempt:
        return record
    work = root / net.name
    onnx_file = work / "model.onnx"
    record.pop("onnx_skipped", None)
    record.pop("onnx_int8_skipped", None)  # it followed from the missing export
    record["onnx_attempt"] = attempt
    try:
        log(f"{net.name}: exporting ONNX (tf2onnx) and modelkit import (ONNX)")
        record["onnx_export"] = export_onnx(model_dirs(root, net.name)["keras"], onnx_file)
        # Parity on the demo images, as for the Keras import: on random pixels a trained network can
        # be too ill-conditioned for float32 (EfficientNetB0: logits up to 2.4e4, TensorFlow itself
        # 11 from a float64 run), and no faithful form could pass (issue 14).
        record["imports"]["onnx"] = run_import(onnx_file, net, root / "models", ONNX_VERSION,
                                               work / "calibration")
        record["versions"]["onnx"] = ONNX_VERSION
        record["sizes_bytes"]["onnx"] = onnx_file.stat().st_size
    except ZooError as exc:
        record["onnx_skipped"] = " ".join(str(exc).split())[:800]
        log(f"{net.name}: ONNX skipped: {record['onnx_skipped'][:300]}")
    (work / "record.json").write_text(json.dumps(record, indent=2))
    return record


def add_onnx_int8(record: dict, net: Network, root: Path, dataset_dir: Path, log=print) -> dict:
    """ONNX Runtime INT8 (version 3), when its quantizer and the import's parity accept it; a
    failure is recorded (onnx_int8_skipped), not fatal. Added to cached builds that lack it."""
    if "onnx_int8" in record["versions"] or "onnx_int8_skipped" in record:
        return record
    if "onnx" not in record["versions"]:
        record["onnx_int8_skipped"] = "no ONNX export to quantize (see onnx_skipped)"
        return record
    import onnx

    work = root / net.name
    onnx_file, onnx_int8 = work / "model.onnx", work / "model-int8.onnx"
    spec = training_spec(net)
    input_name = onnx.load(str(onnx_file), load_external_data=False).graph.input[0].name
    calibration_files = sorted(str(p.relative_to(work / "calibration")) for p in (work / "calibration").rglob("*.png"))
    try:
        log(f"{net.name}: ONNX Runtime INT8 (quantize_static) and modelkit import")
        calibration, _ = load_images(work / "calibration", [(rel, 0) for rel in calibration_files[::3]], spec)
        record["onnx_int8_quantization"] = quantize_onnx(onnx_file, onnx_int8, calibration, input_name)
        record["imports"]["onnx_int8"] = run_import(onnx_int8, net, root / "models", ONNX_INT8_VERSION, None)
        record["versions"]["onnx_int8"] = ONNX_INT8_VERSION
        record["sizes_bytes"]["onnx_int8"] = onnx_int8.stat().st_size
    except Exception as exc:
        record["onnx_int8_skipped"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"
        log(f"{net.name}: ONNX Runtime INT8 skipped: {record['onnx_int8_skipped'][:300]}")
    (work / "record.json").write_text(json.dumps(record, indent=2))
    return record


def describe_weights(record: dict) -> str:
    """How the network got its weights, in words, for tables and reports."""
    training = record.get("training") or {}
    accuracy = f"Keras held-out accuracy {record['keras_held_out_accuracy']:.3f}"
    if training.get("mode") == "head":
        return (f"random convolutional body, classifier fitted on its features of {training['images']} demo images "
                f"({accuracy}; a grass/moon probe, not ImageNet accuracy)")
    if record.get("trained"):
        return f"trained briefly on {training.get('images', '?')} demo images ({accuracy})"
    return f"random weights, fidelity only ({record.get('not_trained_why') or 'not trained'})"


def model_dirs(root: Path, name: str) -> dict[str, Path]:
    from modelkit.layout import version_dir_for

    models_root = Path(root) / "models"
    dirs = {"keras": version_dir_for(models_root, model_name(name), KERAS_VERSION)}
    for kind, version in (("onnx", ONNX_VERSION), ("onnx_int8", ONNX_INT8_VERSION)):
        if (version_dir_for(models_root, model_name(name), version) / "manifest.json").is_file():
            dirs[kind] = version_dir_for(models_root, model_name(name), version)
    return dirs

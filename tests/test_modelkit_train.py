"""One real (tiny) training + export run, checked from the outside with TF and OpenVINO APIs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelkit.dataset import load_labelled_folder, make_demo_dataset
from modelkit.errors import ExportError
from modelspec.manifest import hash_tree, verify_manifest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from modelkit.train import TrainSettings, train_and_export

    root = tmp_path_factory.mktemp("modelkit")
    make_demo_dataset(root / "data", per_class=16, seed=1)
    data = load_labelled_folder(root / "data")
    version_dir, manifest = train_and_export(
        data, TrainSettings(models_root=root / "models", name="tiny", version=3, epochs=1, seed=1)
    )
    return {"root": root, "data": data, "dir": version_dir, "manifest": manifest}


def test_version_directory_layout(built: dict) -> None:
    version_dir: Path = built["dir"]

    assert version_dir == built["root"] / "models" / "tiny" / "3"
    for relative in ("saved_model.pb", "variables/variables.index", "manifest.json",
                     "openvino/fp32/model.xml", "openvino/fp32/model.bin",
                     "openvino/fp16/model.xml", "openvino/fp16/model.bin",
                     "openvino/int8/model.xml", "openvino/int8/model.bin",
                     "assets.extra/tf_serving_warmup_requests"):
        assert (version_dir / relative).is_file(), relative
    # Staging and retired directories are gone.
    assert [p.name for p in version_dir.parent.iterdir()] == ["3"]


def test_signature_takes_image_and_returns_logits_and_probabilities(built: dict) -> None:
    import tensorflow as tf

    signature = tf.saved_model.load(str(built["dir"])).signatures["serving_default"]

    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["image"]
    assert inputs["image"].shape.as_list() == [None, 128, 128, 1] and inputs["image"].dtype == tf.float32
    outputs = signature.structured_outputs
    assert sorted(outputs) == ["logits", "probabilities"]
    assert all(spec.shape.as_list() == [None, 1] for spec in outputs.values())


def test_ir_tensor_names_and_dynamic_batch(built: dict) -> None:
    import openvino as ov

    for form in ("openvino_fp32", "openvino_fp16", "openvino_int8"):
        model = ov.Core().read_model(str(built["dir"] / built["manifest"]["forms"][form]))
        assert [port.get_any_name() for port in model.inputs] == ["image"]
        assert model.inputs[0].get_partial_shape()[0].is_dynamic
        assert {name for port in model.outputs for name in port.get_names()} >= {"logits", "probabilities"}


def test_manifest_content_and_hashes(built: dict) -> None:
    version_dir: Path = built["dir"]
    on_disk = json.loads((version_dir / "manifest.json").read_text())

    assert verify_manifest(version_dir) == on_disk == built["manifest"]
    assert on_disk["files"] == hash_tree(version_dir)
    assert (on_disk["name"], on_disk["version"], on_disk["threshold"]) == ("tiny", 3, 0.5)
    assert on_disk["class_names"] == ["grass", "moon"]
    assert on_disk["input"] == {"name": "image", "shape": [None, 128, 128, 1], "dtype": "float32"}
    from modelspec.spec import ModelSpec, demo_spec

    assert on_disk["preprocessing"]["function"] == "modelspec.preprocess.preprocess_image"
    assert ModelSpec.from_dict(on_disk["spec"]) == demo_spec(("grass", "moon"), 0.5)
    assert set(on_disk["frameworks"]) >= {"tensorflow", "keras", "openvino"}
    for form in ("saved_model", "openvino_fp32", "openvino_fp16", "openvino_int8"):
        metrics = on_disk["metrics"][form]
        assert set(metrics) >= {"accuracy", "precision", "recall", "f1", "confusion_matrix", "n"}
        assert metrics["n"] == on_disk["dataset"]["n_test"] == 10
    assert on_disk["metrics"]["openvino_int8"]["inference_precision"] == "int8"  # read back from the runtime graph
    assert on_disk["quantization"]["openvino_int8"]["calibration_images"] == 22  # the whole (tiny) training split
    assert "training split" in on_disk["quantization"]["openvino_int8"]["calibration"]
    assert len(on_disk["dataset"]["held_out_sha256"]) == 64
    assert on_disk["dataset"]["n_train"] == 22
    assert on_disk["dataset"]["per_class"] == {"grass": {"train": 11, "test": 5}, "moon": {"train": 11, "test": 5}}


def test_manifest_records_how_reproducible_the_build_was(built: dict) -> None:
    facts = built["manifest"]["training"]["reproducibility"]

    assert facts["seed"] == 1 and facts["op_determinism"] is True
    assert facts["deterministic"] == (facts["inter_op_threads"] == 1)
    assert len(facts["weights_sha256"]) == 64 and isinstance(facts["cpu_flags"], list)
    convergence = built["manifest"]["training"]["convergence"]
    assert convergence["epochs_run"] == len(convergence["loss_per_epoch"]) == 1  # epochs=1: the cap
    assert convergence["converged"] == (convergence["final_loss"] < 0.05)


def test_training_twice_with_one_seed_gives_the_same_weights(built: dict) -> None:
    """Op determinism and seeds make a build repeatable on one machine (not across CPUs)."""
    from modelkit.train import build_model, make_reproducible, weights_fingerprint

    images, labels = built["data"].images[:24], built["data"].labels[:24].astype(np.float32)

    def train(seed: int) -> str:
        make_reproducible(seed)
        model = build_model()
        model.fit(images, labels, batch_size=8, epochs=1, shuffle=True, verbose=0)
        return weights_fingerprint(model)

    first, again, other = train(5), train(5), train(6)

    assert first == again
    assert first != other


def test_openvino_fp32_logits_match_saved_model_on_real_images(built: dict) -> None:
    import openvino as ov
    import tensorflow as tf

    images = built["data"].images  # decoded demo crops, not noise: noise saturates the sigmoid
    signature = tf.saved_model.load(str(built["dir"])).signatures["serving_default"]
    reference = signature(image=tf.constant(images))["logits"].numpy()
    compiled = ov.Core().compile_model(
        str(built["dir"] / "openvino/fp32/model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )

    logits = compiled(images)[compiled.output("logits")]

    assert reference.std() > 1e-3, "degenerate model: logits do not vary across images"
    from modelkit.parity import TOLERANCES

    f32 = TOLERANCES["f32"]  # another library: summation order only
    np.testing.assert_allclose(logits, reference, rtol=f32.rtol, atol=f32.atol)


def test_existing_version_is_not_overwritten_by_default(built: dict) -> None:
    from modelkit.train import TrainSettings, train_and_export

    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        train_and_export(built["data"], TrainSettings(models_root=built["root"] / "models", name="tiny", version=3))


def test_build_demo_reuses_the_real_version_without_tensorflow(built: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "modelkit", "build-demo",
         "--dataset-dir", str(built["root"] / "data"), "--models-root", str(built["root"] / "models"),
         "--name", "tiny", "--version", "3", "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reused")
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "tensorflow" not in imported and "openvino" not in imported


def test_int8_ir_really_runs_int8_kernels(built: dict) -> None:
    import openvino as ov

    from worker.engines.openvino_engine import effective_precision

    compiled = ov.Core().compile_model(str(built["dir"] / "openvino/int8/model.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    assert effective_precision(compiled) == "int8"
    assert (built["dir"] / "openvino/int8/model.bin").stat().st_size < (
        built["dir"] / "openvino/fp32/model.bin").stat().st_size / 3


def test_warmup_records_are_prediction_logs_tf_serving_can_replay(built: dict) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    records = [prediction_log_pb2.PredictionLog.FromString(raw.numpy())
               for raw in tf.data.TFRecordDataset(str(built["dir"] / "assets.extra/tf_serving_warmup_requests"))]

    assert [log.WhichOneof("log_type") for log in records] == ["predict_log"] * 3
    requests = [log.predict_log.request for log in records]
    assert {r.model_spec.name for r in requests} == {"tiny"}
    assert {r.model_spec.signature_name for r in requests} == {"serving_default"}
    batches = [tf.make_ndarray(r.inputs["image"]) for r in requests]
    assert [b.shape for b in batches] == [(1, 128, 128, 1), (8, 128, 128, 1), (32, 128, 128, 1)]
    assert all(b.dtype == np.float32 and 0.0 <= b.min() and b.max() <= 1.0 and b.std() > 0 for b in batches)

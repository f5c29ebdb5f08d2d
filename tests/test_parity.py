"""The parity check passes on the real model and FAILS when an engine is wired to the wrong model
or fed differently preprocessed pixels: a check that cannot fail proves nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from modelkit import parity
from modelkit.cli import cli
from modelspec.preprocess import preprocess_image
from modelspec.spec import demo_spec, spec_from_manifest
from tests.helpers import DEMO_DATASET
from worker.engines import create_engine
from worker.engines.openvino_engine import OpenVINOEngine

LIMIT = 60  # held-out images per case in the quick tests (the slow test runs all 180)
IMAGE_SIZE = demo_spec().input.height


def decode_image(data: bytes) -> np.ndarray:
    return preprocess_image(data, demo_spec())


@pytest.fixture(scope="module")
def manifest(model_dir) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def held_out(manifest):
    return parity.held_out_images(manifest, DEMO_DATASET)


@pytest.fixture(scope="module")
def reference(model_dir, held_out) -> np.ndarray:
    return parity.reference_logits(model_dir, np.stack([decode_image(item) for item in held_out.data[:LIMIT]]))


def _run(case: parity.Case, held_out, reference, manifest) -> parity.Row:
    threshold = parity.threshold_logit(manifest["threshold"])
    return parity.run_case(case, held_out.data[:LIMIT], held_out.labels[:LIMIT], reference, threshold,
                           spec_from_manifest(manifest), timing_batches=1)


def _openvino_f32(model_dir, manifest):
    return lambda: create_engine("openvino", "f32", model_dir, manifest)


# The held-out split ----------------------------------------------------------------------------

def test_held_out_split_is_the_one_the_manifest_was_evaluated_on(manifest, held_out):
    assert len(held_out.data) == manifest["dataset"]["n_test"] == manifest["metrics"]["saved_model"]["n"]
    assert {p.parent.name for p in held_out.paths} == set(manifest["class_names"])


def test_a_changed_dataset_folder_is_refused(manifest, tmp_path):
    from modelkit.errors import ModelkitError

    copy = tmp_path / "data"
    for class_dir in sorted(p for p in DEMO_DATASET.iterdir() if p.is_dir()):
        (copy / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[1:]:  # one file fewer per class: another split
            (copy / class_dir.name / path.name).write_bytes(path.read_bytes())

    with pytest.raises(ModelkitError, match="not the one the model was evaluated on"):
        parity.held_out_images(manifest, copy)


# Passing and failing cases ---------------------------------------------------------------------

def test_the_right_wiring_passes(model_dir, manifest, held_out, reference):
    row = _run(parity.Case("openvino", "f32", _openvino_f32(model_dir, manifest)), held_out, reference, manifest)

    assert row.passed, row
    assert row.worst_ratio <= 1.0 and row.flips == 0 and row.effective == "f32"


def test_an_engine_wired_to_the_fp16_ir_fails_the_f32_bound(model_dir, manifest, held_out, reference):
    wrong_ir = model_dir / manifest["forms"]["openvino_fp16"]
    case = parity.Case("openvino", "f32", lambda: OpenVINOEngine(wrong_ir, "openvino_fp32", "f32"))

    row = _run(case, held_out, reference, manifest)

    assert not row.passed
    assert 1e-4 < row.max_abs_diff < 0.1  # FP16 weights: small, but far outside f32


def test_an_engine_wired_to_another_model_fails(model_dir, manifest, held_out, reference, tmp_path):
    """Another model: the same IR with the first convolution's kernel nudged by 1%."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model_dir / manifest["forms"]["openvino_fp32"]))
    constants = [op for op in model.get_ops() if op.get_type_name() == "Constant" and op.get_output_size() == 1
                 and op.get_output_element_type(0) == ov.Type.f32 and list(op.get_output_shape(0)) == [64, 1, 3, 3]]
    assert len(constants) == 1, "expected the first Conv2D(64, 3x3) kernel of the seed CNN"
    kernel = constants[0]
    nudged = ov.opset13.constant(kernel.get_data() * np.float32(1.01))
    for target in kernel.output(0).get_target_inputs():
        target.replace_source_output(nudged.output(0))
    ov.save_model(model, str(tmp_path / "other.xml"), compress_to_fp16=False)
    case = parity.Case("openvino", "f32", lambda: OpenVINOEngine(tmp_path / "other.xml", "openvino_fp32", "f32"))

    row = _run(case, held_out, reference, manifest)

    assert not row.passed
    assert row.max_abs_diff > 1e-3


def _nearest_resize(data: bytes) -> np.ndarray:
    """A plausible-looking preprocessing that differs: nearest-neighbour instead of bilinear."""
    gray = Image.open(io.BytesIO(data)).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
    return (np.asarray(gray, dtype=np.float32) / 255.0).reshape(IMAGE_SIZE, IMAGE_SIZE, 1)


def _scaled_by_256(data: bytes) -> np.ndarray:
    """Off by one in the normalisation: /256 instead of /255."""
    return decode_image(data) * np.float32(255.0 / 256.0)


@pytest.mark.parametrize("preprocess", [_nearest_resize, _scaled_by_256], ids=["nearest-resize", "divide-by-256"])
@pytest.mark.parametrize("engine", ["openvino", "tensorflow"])
def test_a_different_preprocessing_fails(model_dir, manifest, held_out, reference, preprocess, engine):
    case = parity.Case(engine, "f32", lambda: create_engine(engine, "f32", model_dir, manifest), preprocess=preprocess)

    row = _run(case, held_out, reference, manifest)

    assert not row.passed
    assert row.max_abs_diff > 1e-3


def test_an_engine_that_cannot_load_is_a_failed_row(model_dir, manifest, held_out, reference):
    case = parity.Case("openvino", "f32", lambda: OpenVINOEngine(Path("/nonexistent.xml"), "openvino_fp32"))

    row = _run(case, held_out, reference, manifest)

    assert not row.passed and "FileNotFoundError" in row.error


def test_tolerances_follow_the_setting_and_for_default_the_effective_precision():
    assert parity.tolerance_for("f32", "bf16") is parity.TOLERANCES["f32"]  # claimed f32 must be f32
    assert parity.tolerance_for("f16", "bf16") is parity.TOLERANCES["f16"]
    assert parity.tolerance_for("default", "bf16") is parity.TOLERANCES["bf16"]
    assert parity.tolerance_for("default", "int8+f32") is parity.TOLERANCES["int8"]
    assert parity.TOLERANCES["f32"].atol == 1e-4 and parity.TOLERANCES["f32"].max_flip_fraction == 0
    assert parity.TOLERANCES["f32"].clip is None and parity.TOLERANCES["int8"].clip == 10.0


def test_int8_saturation_beyond_the_clip_passes_but_a_gap_below_it_fails(model_dir, manifest):
    """-18 vs -12 (both certain) is INT8's calibration clamp; 1.0 vs -0.5 is a real difference."""
    class Fixed:
        def __init__(self, logits):
            self.logits = np.asarray(logits, np.float32)

        def load(self):
            pass

        def warmup(self):
            pass

        def infer(self, batch):
            return self.logits[: len(batch)]

        def describe(self):
            from worker.engines import EngineInfo

            return EngineInfo("fake", "0", "CPU", "int8", "openvino_int8")

    def run(logits) -> parity.Row:
        case = parity.Case("fake", "int8", lambda: Fixed(logits),
                           preprocess=lambda _: np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1), np.float32))
        reference = np.array([-18.0, 3.0], np.float32)
        return parity.run_case(case, (b"x", b"y"), np.array([0, 1]), reference, 0.0, demo_spec(), batch_size=2,
                               timing_batches=1)

    assert run([-12.0, 3.1]).passed
    assert run([-18.0, 1.0]).passed  # 2 off, inside 0.5 + 10% + 25% of the clipped range (10)
    assert not run([-18.0, -1.0]).passed  # 4 off, and the label flips


# The command -----------------------------------------------------------------------------------

def _parity_command(model_dir: Path, *args: str):
    return CliRunner().invoke(cli, ["parity", "--model-dir", str(model_dir), "--dataset-dir", str(DEMO_DATASET), *args])


def test_the_command_prints_a_table_and_exits_0(model_dir):
    result = _parity_command(model_dir, "--limit", str(LIMIT), "--engines", "openvino:f32,openvino:int8,tensorflow:f32")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "engine" and len(table) == 4
    assert all(line.rstrip(" |").endswith("ok") for line in table[1:])
    assert lines[-1].startswith("ok ")


def test_the_command_exits_1_when_the_worker_wiring_points_f32_at_the_wrong_ir(model_dir, monkeypatch):
    """The wiring the worker itself uses (create_engine's precision -> IR table), broken."""
    from worker.engines import openvino_engine

    monkeypatch.setitem(openvino_engine.PRECISIONS, "f32", ("openvino_fp16", "f32"))

    result = _parity_command(model_dir, "--limit", str(LIMIT), "--engines", "openvino:f32,tensorflow:f32")

    assert result.exit_code == 1
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert rows["openvino"].rstrip(" |").endswith("FAIL") and rows["tensorflow"].rstrip(" |").endswith("ok")
    assert "FAILED    1 of 2 cases" in result.stderr


def test_a_bad_engine_spec_is_one_line(model_dir):
    result = _parity_command(model_dir, "--engines", "onnx:f32")

    assert result.exit_code == 2
    assert "'onnx:f32' is not ENGINE:PRECISION" in result.stderr


@pytest.mark.slow
def test_every_engine_and_precision_is_within_tolerance_on_all_held_out_images(model_dir):
    """The full table, TF Serving through the in-process stand-in over REST and gRPC."""
    result = _parity_command(model_dir)

    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip() for line in table] == [
        "openvino"] * 5 + ["tensorflow", "tfserving (rest)", "tfserving (grpc)"]
    for line in table:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        assert cells[4] == "180" and cells[-1] == "ok", line
        if cells[1] == "f32":
            assert float(cells[7]) <= 1.0 and cells[8] == "0", line

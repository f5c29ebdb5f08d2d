"""`python -m modelkit parity --images` on imported models (issue 13): the test fails when the spec
is wrong.

Engines are compared with the reference on the same preprocessed pixels, so a wrong spec (RGB
declared for a BGR model, NHWC for an NCHW one, a wrong mean) leaves them agreeing: these tests
show the table still "ok" and the command failing on the reference's own accuracy on labelled
images (--min-accuracy). The models are built here with weights fixed by hand, so their decision
is exact and depends on the spec alone:

    model                         spec it was "trained" with              decides
    ONNX, NCHW [N, 3, 16, 16]     BGR, x/255                              red when mean R > mean B
    ONNX, NCHW, every dim dynamic the same (the importer cannot see       the same (its ops run on any
                                  the layout: NHWC is accepted)           layout, as many graphs do)
    Keras .keras, NHWC 16x16x3    RGB, x/255, mean 0.5, std 0.25          red when mean R is above 0.5
    TFLite (that Keras model)     the same                                the same

The images: solid-ish red and blue PNGs with noise, in class sub-folders (labelled) or flat.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from modelkit import parity
from modelkit.cli import cli
from modelkit.errors import ModelkitError
from modelspec.manifest import verify_manifest
from modelspec.spec import InputSpec, ModelSpec, OutputSpec, PreprocessSpec, spec_from_manifest

PER_CLASS = 12  # the expected output lines below spell it out: "24 labelled images", "blue 12, red 12"
ONNX_LABELS = ("red", "blue")  # output order; not sorted, so the folder-name -> index mapping is exercised
KERAS_LABELS = ("blue", "red")  # one logit: class_names[1] when sigmoid >= 0.5
KERAS_SPEC = ("--scale", "1/255", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")
GAIN = 4.0


# --- Images and models built here -------------------------------------------------------------------

def colour_png(path: Path, colour: str, rng: np.random.Generator) -> None:
    """20x24 RGB: the named channel high (150-255), the other two low (0-99), per-pixel noise."""
    pixels = rng.integers(0, 100, (20, 24, 3))
    pixels[..., {"red": 0, "blue": 2}[colour]] = rng.integers(150, 256, (20, 24))
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def build_colour_onnx(path: Path, dims=("N", 3, 16, 16)) -> None:
    """NCHW BGR input 'input' -> per-channel means (ReduceMean over axes 2, 3) -> [mean R, mean B]
    (channels 2 and 0) -> Gemm: logits 'logits' = GAIN * [R - B, B - R] for (red, blue), named in
    metadata_props. With dims all dynamic, every op runs on an input of any layout."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                    numpy_helper.from_array(np.array([2, 0], np.int64), "r_and_b"),
                    numpy_helper.from_array(np.array([[1, -1], [-1, 1]], np.float32) * GAIN, "W"),
                    numpy_helper.from_array(np.zeros(2, np.float32), "bias")]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["means"], keepdims=0),
             helper.make_node("Gather", ["means", "r_and_b"], ["rb"], axis=1),
             helper.make_node("Gemm", ["rb", "W", "bias"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "red_or_blue", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   list(dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8,
                              producer_name="tests/test_parity_imported.py")
    helper.set_model_props(model, {"labels": json.dumps(list(ONNX_LABELS))})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def build_red_keras():
    """NHWC 16x16x3 'pixels' -> global mean per channel -> Dense(1) 'red' = 3 * mean R: above 0 (red)
    only when R is above the mean the spec subtracts, so the decision relies on mean/std."""
    import keras

    inputs = keras.Input((16, 16, 3), name="pixels")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(1, name="red")(pooled)
    model = keras.Model(inputs, outputs, name="red_or_blue")
    model.get_layer("red").set_weights([np.array([[3.0], [0.0], [0.0]], np.float32), np.zeros(1, np.float32)])
    return model


# --- Running the commands -----------------------------------------------------------------------------

def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def import_model(source: Path, models_root: Path, name: str, *flags) -> Path:
    code, out, err = invoke("import", source, "--name", name, "--version", 1, "--models-root", models_root, *flags)
    assert code == 0, err[-3000:]
    return models_root / name / "1"


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, err
    return lines[0][len("Error: "):]


def parity_command(version_dir: Path, *args) -> tuple[int, str, str]:
    return invoke("parity", "--model-dir", version_dir, *args)


def parity_refused(version_dir: Path, *args) -> str:
    code, _, err = parity_command(version_dir, *args)
    return one_line_error(code, err)


def table(out: str) -> dict[str, list[str]]:
    """"engine:precision" -> the row's cells."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    assert rows and rows[0][0] == "engine"
    return {f"{cells[0]}:{cells[1]}": cells for cells in rows[1:]}


def accuracy_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("accuracy  ")]
    return line


# --- Fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parity-imported")


@pytest.fixture(scope="module")
def labelled(work) -> Path:
    """red/ and blue/ sub-folders, PER_CLASS PNGs each, plus a file no spec can read and a hidden one."""
    folder = work / "labelled"
    rng = np.random.default_rng(7)
    for colour in ("red", "blue"):
        (folder / colour).mkdir(parents=True)
        for index in range(PER_CLASS):
            colour_png(folder / colour / f"{index:02d}.png", colour, rng)
    (folder / "red" / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder


@pytest.fixture(scope="module")
def flat(work, labelled) -> Path:
    folder = work / "flat"
    folder.mkdir()
    for path in sorted(labelled.glob("*/*.png")):
        shutil.copy2(path, folder / f"{path.parent.name}-{path.name}")
    return folder


@pytest.fixture(scope="module")
def onnx_file(work) -> Path:
    build_colour_onnx(work / "red_or_blue.onnx")
    return work / "red_or_blue.onnx"


@pytest.fixture(scope="module")
def onnx_right(work, onnx_file) -> Path:
    return import_model(onnx_file, work / "models", "onnx-bgr", "--color", "bgr", "--scale", "1/255")


@pytest.fixture(scope="module")
def keras_file(work) -> Path:
    build_red_keras().save(work / "red_or_blue.keras")
    return work / "red_or_blue.keras"


# --- The folder and the reference (no engine) -----------------------------------------------------------

def _spec(labels=ONNX_LABELS) -> ModelSpec:
    return ModelSpec(InputSpec(name="input", height=16, width=16, channels=3, layout="NCHW", color="bgr"),
                     PreprocessSpec(), OutputSpec(name="logits", activation="softmax", class_names=labels)).validated()


def test_a_labelled_folder_gives_class_indices_by_sub_folder_name_and_counts_what_it_skips(labelled):
    found = parity.images_from_folder(labelled, _spec())

    assert len(found.data) == 2 * PER_CLASS and found.pixels.shape == (2 * PER_CLASS, 3, 16, 16)
    assert [path.relative_to(labelled).as_posix() for path in found.paths] == sorted(
        path.relative_to(labelled).as_posix() for path in labelled.glob("*/*.png"))
    # red is class 0 and blue class 1 in the model's output order, whatever the folders' sort order
    assert list(found.labels) == [1] * PER_CLASS + [0] * PER_CLASS
    assert [(path.name, reason) for path, reason in found.skipped] == [("notes.txt", "not_an_image")]
    assert found.describe().endswith("labelled by class sub-folder (blue 12, red 12); 1 file(s) skipped, not images "
                                     "the spec can read (first: red/notes.txt: not_an_image)")

    limited = parity.images_from_folder(labelled, _spec(), limit=6)  # evenly spaced: both classes
    assert sorted(set(limited.labels.tolist())) == [0, 1]


def test_a_flat_folder_has_no_labels(flat):
    found = parity.images_from_folder(flat, _spec())

    assert found.labels is None and len(found.data) == 2 * PER_CLASS and not found.skipped
    assert "no labels" in found.describe()


def test_a_folder_whose_sub_folders_are_not_all_classes_is_refused(labelled, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(labelled / "red", mixed / "red")
    shutil.copytree(labelled / "blue", mixed / "Blue")
    with pytest.raises(ModelkitError, match=r"sub-folder\(s\) Blue are not classes of the model \(red, blue\)"):
        parity.images_from_folder(mixed, _spec())
    (mixed / "Blue").rename(mixed / "blue")
    (mixed / "loose.png").write_bytes((labelled / "red" / "00.png").read_bytes())
    with pytest.raises(ModelkitError, match=r"has class sub-folders and 1 file\(s\) beside them \(loose.png\)"):
        parity.images_from_folder(mixed, _spec())


def test_default_cases_follow_the_forms_and_the_threshold_follows_the_output():
    assert parity.default_cases({"onnx": "model.onnx", "openvino_fp32": "a", "openvino_fp16": "b"}) == [
        "openvino:f32", "openvino:bf16", "openvino:f16", "openvino:default", "onnxruntime:f32"]
    assert parity.default_cases({"saved_model": ".", "openvino_fp32": "a", "openvino_fp16": "b",
                                 "openvino_int8": "c"}) == [
        "openvino:f32", "openvino:bf16", "openvino:f16", "openvino:int8", "openvino:default", "tensorflow:f32",
        "tfserving-rest:f32", "tfserving-grpc:f32"]
    logit = OutputSpec(name="p", activation="sigmoid", class_names=("a", "b"), threshold=0.8)
    probability = OutputSpec(name="p", kind="probabilities", activation="none", class_names=("a", "b"), units=1,
                             threshold=0.8)
    assert parity.decision_threshold(logit) == pytest.approx(np.log(4.0))
    assert parity.decision_threshold(probability) == 0.8


def test_the_reference_of_an_onnx_import_is_onnx_runtime_and_decides_as_the_worker(onnx_right, labelled):
    manifest = verify_manifest(onnx_right)
    spec = spec_from_manifest(manifest)
    found = parity.images_from_folder(labelled, spec)

    reference = parity.reference_outputs(onnx_right, manifest, found.pixels, spec=spec)

    assert reference.form == "onnx" and reference.runtime.startswith("onnxruntime ")
    assert reference.outputs.shape == (2 * PER_CLASS, 2)
    assert parity.accuracy(reference.outputs, found.labels, spec.output) == 1.0
    assert parity.accuracy(reference.outputs, 1 - found.labels, spec.output) == 0.0


# --- ONNX: NCHW, BGR -----------------------------------------------------------------------------------

def test_onnx_with_the_right_spec_passes_with_accuracy_1(onnx_right, labelled):
    code, out, err = parity_command(onnx_right, "--images", labelled, "--min-accuracy", 0.9)

    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("parity    onnx-bgr/1 vs the onnx form run by onnxruntime ")
    assert lines[1] == (f"images    24 from {labelled}, labelled by class sub-folder (blue 12, red 12); 1 file(s) "
                        "skipped, not images the spec can read (first: red/notes.txt: not_an_image)")
    assert accuracy_line(out) == "accuracy  reference 1.0000 on 24 labelled images (--min-accuracy 0.9)"
    rows = table(out)
    assert list(rows) == ["openvino:f32", "openvino:bf16", "openvino:f16", "openvino:default", "onnxruntime:f32"]
    for cells in rows.values():
        assert cells[-1] == "ok" and cells[9] == "1.0000" and cells[4] == str(2 * PER_CLASS), cells
    assert rows["onnxruntime:f32"][3] == "onnx" and float(rows["onnxruntime:f32"][5]) == 0.0
    assert out.splitlines()[-1] == "ok        all 5 cases within tolerance, reference accuracy 1.0000 >= 0.9"


def test_onnx_declared_rgb_instead_of_bgr_fails_on_accuracy_while_engines_agree(work, onnx_file, labelled):
    wrong = import_model(onnx_file, work / "models", "onnx-rgb", "--color", "rgb", "--scale", "1/255")

    code, out, err = parity_command(wrong, "--images", labelled, "--min-accuracy", 0.9)

    assert code == 1, out + err
    assert accuracy_line(out).startswith("accuracy  reference 0.0000 on 24 labelled images")
    assert all(cells[-1] == "ok" for cells in table(out).values())  # agreement cannot see the wrong spec
    assert ("FAILED    reference accuracy 0.0000 is below --min-accuracy 0.9: the spec (16x16x3 NCHW rgb) may not be "
            "how the model was trained") in err
    assert "cases outside tolerance" not in err


def test_nhwc_declared_for_the_nchw_model_is_refused_by_the_import(work, onnx_file):
    """The importer reads the layout from where the 3 channels are: NHWC puts 16 there. Refused
    before parity could see it."""
    code, out, err = invoke("import", onnx_file, "--name", "onnx-nhwc", "--version", 1, "--models-root",
                            work / "models", "--color", "bgr", "--layout", "NHWC")

    assert one_line_error(code, err) == (
        "input.layout NHWC (--layout) puts 16 channels in the model's input 'input' [?, 3, 16, 16]; the model's "
        "input reads as NCHW (3 channels): declare NCHW")
    assert not (work / "models" / "onnx-nhwc").exists()


@pytest.mark.parametrize("layout, exit_code", [("NCHW", 0), ("NHWC", 1)])
def test_a_dynamic_input_the_import_cannot_read_a_layout_from_is_caught_by_accuracy(work, labelled, layout, exit_code):
    """[N, C, H, W] all dynamic: the import accepts either layout, and the graph runs on either, so
    only the accuracy on labelled images tells the wrong one."""
    build_colour_onnx(work / "dynamic.onnx", dims=("N", "C", "H", "W"))
    version_dir = import_model(work / "dynamic.onnx", work / "models", f"onnx-dynamic-{layout.lower()}", "--layout",
                               layout, "--size", "16x16", "--color", "bgr", "--scale", "1/255")
    assert verify_manifest(version_dir)["spec"]["input"]["layout"] == layout

    code, out, err = parity_command(version_dir, "--images", labelled, "--min-accuracy", 0.9,
                                    "--engines", "onnxruntime:f32,openvino:f32")

    assert code == exit_code, out + err
    assert all(cells[-1] == "ok" for cells in table(out).values())
    reference_accuracy = float(accuracy_line(out).split()[2])
    if layout == "NCHW":
        assert reference_accuracy == 1.0
    else:
        assert reference_accuracy < 0.9 and "is below --min-accuracy 0.9" in err


def test_an_imported_model_without_images_is_refused_in_one_line(onnx_right):
    message = parity_refused(onnx_right)

    assert message.startswith("model onnx-bgr/1 has no held-out split") and "pass --images FOLDER" in message
    assert "(red, blue)" in message


def test_a_flat_folder_compares_engines_without_accuracy(onnx_right, flat):
    code, out, err = parity_command(onnx_right, "--images", flat, "--engines", "onnxruntime:f32,openvino:f32")

    assert code == 0, out + err
    assert out.splitlines()[1] == f"images    24 from {flat}, no labels (no sub-folder named like a class)"
    assert accuracy_line(out) == "accuracy  - (no labels)"
    rows = table(out)
    assert list(rows) == ["onnxruntime:f32", "openvino:f32"]
    assert all(cells[-1] == "ok" and cells[9] == "-" for cells in rows.values())

    assert parity_refused(onnx_right, "--images", flat, "--min-accuracy", 0.9) == (
        f"--min-accuracy needs labelled images: {flat} has no sub-folder named like a class of the model (red, blue)")


def test_usage_errors_are_one_line(onnx_right, labelled, tmp_path):
    assert parity_refused(onnx_right, "--images", labelled, "--engines", "onnx:f32").startswith(
        "--engines: 'onnx:f32' is not ENGINE:PRECISION with a known engine")
    assert parity_refused(onnx_right, "--images", tmp_path / "none") == f"--images {tmp_path / 'none'} is not a folder"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    assert parity_refused(onnx_right, "--images", tmp_path / "empty") == (
        f"--images {tmp_path / 'empty'} holds no image the spec can read (1 files, 1 skipped)")
    assert parity_refused(onnx_right, "--images", labelled, "--dataset-dir", labelled) == (
        "give --images or --dataset-dir, not both")


# --- Keras (SavedModel reference) and TFLite: NHWC, mean/std ---------------------------------------------

@pytest.mark.slow
def test_keras_with_the_right_mean_and_std_passes_every_engine(work, keras_file, labelled):
    version_dir = import_model(keras_file, work / "models", "keras-right", "--labels", ",".join(KERAS_LABELS),
                               *KERAS_SPEC)

    code, out, err = parity_command(version_dir, "--images", labelled, "--min-accuracy", 0.9)

    assert code == 0, out + err
    assert out.splitlines()[0].startswith("parity    keras-right/1 vs the saved_model form run by tensorflow ")
    assert accuracy_line(out).startswith("accuracy  reference 1.0000 on 24 labelled images")
    rows = table(out)
    assert list(rows) == ["openvino:f32", "openvino:bf16", "openvino:f16", "openvino:default", "tensorflow:f32",
                          "tfserving (rest):f32", "tfserving (grpc):f32"]
    for cells in rows.values():
        assert cells[-1] == "ok" and cells[9] == "1.0000", cells


@pytest.mark.slow
def test_keras_without_its_mean_fails_on_accuracy(work, keras_file, labelled):
    """Mean and std left out (scale 1/255 alone): every blue image's red channel (~0.2) is above 0,
    so everything reads as red."""
    version_dir = import_model(keras_file, work / "models", "keras-no-mean", "--labels", ",".join(KERAS_LABELS),
                               "--scale", "1/255")

    code, out, err = parity_command(version_dir, "--images", labelled, "--min-accuracy", 0.9,
                                    "--engines", "openvino:f32,tensorflow:f32")

    assert code == 1, out + err
    assert accuracy_line(out).startswith("accuracy  reference 0.5000 on 24 labelled images")
    assert all(cells[-1] == "ok" for cells in table(out).values())
    assert "FAILED    reference accuracy 0.5000 is below --min-accuracy 0.9: the spec (16x16x3 NHWC rgb)" in err


@pytest.mark.slow
def test_tflite_reference_is_the_tflite_interpreter(work, labelled):
    import tensorflow as tf

    (work / "red_or_blue.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(build_red_keras()).convert())
    version_dir = import_model(work / "red_or_blue.tflite", work / "models", "tflite-right", "--labels",
                               ",".join(KERAS_LABELS), *KERAS_SPEC)

    code, out, err = parity_command(version_dir, "--images", labelled, "--min-accuracy", 0.9)

    assert code == 0, out + err
    assert out.splitlines()[0].startswith("parity    tflite-right/1 vs the tflite form run by the TFLite interpreter "
                                          "of tensorflow ")
    assert accuracy_line(out).startswith("accuracy  reference 1.0000 on 24 labelled images")
    rows = table(out)
    assert list(rows) == ["openvino:f32", "openvino:bf16", "openvino:f16", "openvino:default"]
    assert all(cells[-1] == "ok" and cells[9] == "1.0000" for cells in rows.values())

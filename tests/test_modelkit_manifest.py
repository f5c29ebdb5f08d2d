"""modelkit.manifest, modelkit.metrics and the build-demo reuse path. No TensorFlow needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelspec.errors import ManifestError
from modelkit.layout import WARMUP_RECORDS
from modelspec.manifest import MANIFEST_NAME, form_path, load_manifest, verify_manifest, write_manifest
from modelkit.metrics import binary_metrics

REPO = Path(__file__).resolve().parents[1]


def _fake_version(version_dir: Path, complete: bool = False) -> dict:
    """A version directory with the manifest contract but tiny stand-in files; complete adds every
    form and file this modelkit builds (FP16/INT8 IRs, TF Serving warm-up records)."""
    (version_dir / "variables").mkdir(parents=True)
    (version_dir / "openvino" / "fp32").mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"graph")
    (version_dir / "variables" / "variables.index").write_bytes(b"index")
    (version_dir / "openvino" / "fp32" / "model.xml").write_text("<net/>")
    (version_dir / "openvino" / "fp32" / "model.bin").write_bytes(b"\0" * 16)
    forms = {"saved_model": ".", "openvino_fp32": "openvino/fp32/model.xml"}
    if complete:
        for precision in ("fp16", "int8"):
            (version_dir / "openvino" / precision).mkdir(parents=True)
            (version_dir / "openvino" / precision / "model.xml").write_text("<net/>")
            (version_dir / "openvino" / precision / "model.bin").write_bytes(b"\0" * 8)
            forms[f"openvino_{precision}"] = f"openvino/{precision}/model.xml"
        (version_dir / WARMUP_RECORDS).parent.mkdir(parents=True)
        (version_dir / WARMUP_RECORDS).write_bytes(b"records")
    manifest = {
        "name": "demo",
        "version": 1,
        "created_at": "2026-01-01T00:00:00+00:00",
        "input": {"name": "image", "shape": [None, 128, 128, 1], "dtype": "float32"},
        "outputs": {"logits": "logits", "probabilities": "probabilities"},
        "preprocessing": {"function": "worker.preprocess.decode_image"},
        "class_names": ["grass", "moon"],
        "threshold": 0.5,
        "forms": forms,
    }
    write_manifest(version_dir, manifest)
    return manifest


def test_write_then_verify_lists_every_file(tmp_path: Path) -> None:
    _fake_version(tmp_path)

    manifest = verify_manifest(tmp_path)

    assert sorted(manifest["files"]) == [
        "openvino/fp32/model.bin",
        "openvino/fp32/model.xml",
        "saved_model.pb",
        "variables/variables.index",
    ]
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert form_path(tmp_path, manifest, "openvino_fp32") == tmp_path / "openvino/fp32/model.xml"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: (d / "openvino/fp32/model.bin").write_bytes(b"\1" * 16), r"model\.bin differs"),
        (lambda d: (d / "variables/variables.index").unlink(), r"variables\.index is listed .* but missing"),
        (lambda d: (d / "variables/extra.data").write_bytes(b"x"), r"extra\.data is not listed"),
    ],
)
def test_verify_names_the_file_that_is_wrong(tmp_path: Path, tamper, message: str) -> None:
    _fake_version(tmp_path)
    tamper(tmp_path)

    with pytest.raises(ManifestError, match=message):
        verify_manifest(tmp_path)


def test_load_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a finished model version"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"name": "x"}))
    with pytest.raises(ManifestError, match="lacks required keys: version"):
        load_manifest(tmp_path)


def test_form_path_lists_available_forms(tmp_path: Path) -> None:
    manifest = _fake_version(tmp_path)

    with pytest.raises(ManifestError, match="no form 'openvino_int8' .*available: openvino_fp32, saved_model"):
        form_path(tmp_path, {**manifest, "files": {}}, "openvino_int8")


def test_build_demo_reuses_a_verified_version_fast_without_tensorflow(tmp_path: Path) -> None:
    _fake_version(tmp_path / "models" / "demo" / "1", complete=True)
    code = (
        "import sys\n"
        "from modelkit.cli import cli\n"
        f"cli.main(['build-demo', '--dataset-dir', {str(tmp_path / 'absent')!r}, "
        f"'--models-root', {str(tmp_path / 'models')!r}], standalone_mode=False)\n"
        "print('heavy:', sorted(m for m in ('tensorflow', 'keras', 'openvino', 'numpy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert "reused" in result.stdout and "heavy: []" in result.stdout
    assert not (tmp_path / "absent").exists()


def test_binary_metrics_known_case() -> None:
    metrics = binary_metrics([0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1])

    assert metrics["confusion_matrix"] == [[2, 1], [1, 3]]
    assert metrics["n"] == 7
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(3 / 4)


def test_binary_metrics_undefined_ratios_are_zero_not_nan() -> None:
    metrics = binary_metrics([0, 0], [0, 0])

    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def test_build_demo_rebuilds_a_version_that_lacks_new_forms(tmp_path: Path) -> None:
    """A version from before INT8 and warm-up records verifies, but is not reused: build-demo goes
    on to build (here it stops at once: the dataset folder cannot be created)."""
    _fake_version(tmp_path / "models" / "demo" / "1")
    (tmp_path / "blocker").write_text("a file where the dataset folder's parent should be")
    code = (
        "from modelkit.cli import cli\n"
        f"cli.main(['build-demo', '--dataset-dir', {str(tmp_path / 'blocker' / 'data')!r}, "
        f"'--models-root', {str(tmp_path / 'models')!r}])\n"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert "reused" not in result.stdout
    assert "built by an older modelkit, it lacks openvino_fp16, openvino_int8, " + WARMUP_RECORDS in result.stderr

"""modelkit.dataset and the CLI's handling of bad datasets. No TensorFlow needed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelkit.dataset import (
    DEMO_CROP_PX,
    DatasetError,
    load_labelled_folder,
    make_demo_dataset,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[1]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_png(path: Path, value: int = 128, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path, format="PNG")


def test_demo_dataset_layout(tmp_path: Path) -> None:
    info = make_demo_dataset(tmp_path / "ds", per_class=6, seed=3)

    root = tmp_path / "ds"
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "grass", "moon"]
    for name in ("grass", "moon"):
        assert sorted(p.name for p in (root / name).iterdir()) == [f"{name}-{i:04d}.png" for i in range(6)]
    sizes = set()
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "L"
            assert image.width == image.height
            assert DEMO_CROP_PX[0] <= image.width <= DEMO_CROP_PX[1]
            sizes.add(image.width)
    assert len(sizes) > 1, "crop sizes should vary so decode_image really resizes"
    assert json.loads((root / "dataset.json").read_text()) == info
    assert "too easy" in info["note"].lower() or "far too easy" in info["note"].lower()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging dir left behind"


def test_demo_dataset_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "a", per_class=5, seed=7)
    make_demo_dataset(tmp_path / "b", per_class=5, seed=7)
    make_demo_dataset(tmp_path / "c", per_class=5, seed=8)

    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    a, c = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "c")
    assert a["moon/moon-0000.png"] != c["moon/moon-0000.png"]


def test_demo_dataset_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")

    with pytest.raises(DatasetError, match="already exists"):
        make_demo_dataset(tmp_path / "ds", per_class=2)
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"


def test_load_demo_dataset_sorted_classes_and_pixels(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "ds", per_class=4, seed=0)

    data = load_labelled_folder(tmp_path / "ds")

    assert data.class_names == ("grass", "moon")  # sorted: index 1 (moon) is the positive class
    assert data.images.shape == (8, 128, 128, 1) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert data.labels.tolist() == [0] * 4 + [1] * 4
    assert all(path.parent.name == data.class_names[label] for path, label in zip(data.paths, data.labels))
    assert data.skipped == () and "satellite" in data.note


def test_unreadable_files_are_skipped_with_a_warning_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("a", "b"):
        for i in range(3):
            _write_png(tmp_path / name / f"{i}.png", value=40 * i)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0")  # hidden files are not candidates

    data = load_labelled_folder(tmp_path)

    assert len(data.labels) == 6
    assert sorted(path.name for path, _ in data.skipped) == ["broken.png", "empty.jpg"]
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text


def _one_class(root: Path) -> None:
    _write_png(root / "only" / "0.png")


def _three_classes(root: Path) -> None:
    for name in ("a", "b", "c"):
        _write_png(root / name / "0.png")


def _empty_class(root: Path) -> None:
    _write_png(root / "a" / "0.png")
    _write_png(root / "a" / "1.png")
    (root / "b").mkdir()


def _all_unreadable(root: Path) -> None:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"garbage")


def _one_readable_image(root: Path) -> None:
    _write_png(root / "a" / "0.png")
    _write_png(root / "a" / "1.png")
    _write_png(root / "b" / "0.png")
    (root / "b" / "1.png").write_bytes(b"garbage")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, r"does not exist"),
        (_one_class, r"exactly 2 class sub-folders .* found 1: only"),
        (_three_classes, r"exactly 2 class sub-folders .* found 3: a, b, c"),
        (_empty_class, r"class folder .*b is empty"),
        (_all_unreadable, r"none of the 2 files .* is a readable image \(e\.g\. .*x\.png"),
        (_one_readable_image, r"b has 1 readable image\(s\) \(1 unreadable\).*at least 2"),
    ],
)
def test_bad_datasets_raise_dataset_error(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "data"
    if make is not None:
        make(root)

    with pytest.raises(DatasetError, match=message) as caught:
        load_labelled_folder(root)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("make", [None, _all_unreadable])
def test_cli_train_on_bad_dataset_prints_one_line_and_exits_2(tmp_path: Path, make) -> None:
    root = tmp_path / "data"
    if make is not None:
        make(root)
    started = time.perf_counter()

    result = subprocess.run(
        [sys.executable, "-m", "modelkit", "train", "--data", str(root), "--out", str(tmp_path / "models"),
         "--name", "demo", "--version", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert time.perf_counter() - started < 10, "bad data must fail before TensorFlow loads"
    assert not (tmp_path / "models").exists()


def test_stratified_split_holds_out_30_percent_of_each_class() -> None:
    labels = np.array([0] * 10 + [1] * 20)

    train, test = stratified_split(labels, 0.3, seed=5)

    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == 30
    assert np.bincount(labels[test]).tolist() == [3, 6]
    again = stratified_split(labels, 0.3, seed=5)
    assert train.tolist() == again[0].tolist() and test.tolist() == again[1].tolist()


def test_stratified_split_keeps_one_image_per_class_on_each_side() -> None:
    train, test = stratified_split(np.array([0, 0, 1, 1]), 0.3, seed=0)

    assert sorted(np.array([0, 0, 1, 1])[test].tolist()) == [0, 1]
    assert sorted(np.array([0, 0, 1, 1])[train].tolist()) == [0, 1]

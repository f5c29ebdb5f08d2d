"""Image folders for training: the offline demo dataset and the loader for any two-class folder.

The loader decodes with `modelspec.preprocess.preprocess_image` and the seed CNN's spec: the
function and spec the worker serves with, so training pixels and serving pixels cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modelkit.errors import DatasetError
from modelspec.preprocess import ImageRejected, preprocess_image
from modelspec.spec import demo_spec

__all__ = [
    "DEMO_NOTE",
    "DatasetError",
    "LabelledImages",
    "held_out_fingerprint",
    "load_labelled_folder",
    "make_demo_dataset",
    "stratified_split",
]

_LOGGER = logging.getLogger(__name__)

DATASET_INFO_NAME = "dataset.json"
# The seed CNN's input and preprocessing (class names come from the folder, later).
TRAINING_SPEC = demo_spec()
# Class folder -> the scikit-image loader of the 512x512 grayscale texture it is cropped from.
# Both images ship inside the scikit-image wheel (skimage/data/*.png): no network needed.
DEMO_SOURCES = {"grass": "grass", "moon": "moon"}
DEMO_CROP_PX = (64, 320)
DEMO_BRIGHTNESS_GAIN = (0.9, 1.1)
DEMO_BRIGHTNESS_OFFSET = (-10.0, 10.0)
DEMO_NOTE = (
    "Demo stand-in for the seed thesis's 268 satellite images (damaged vs undamaged terrain), "
    "which cannot be fetched here: random crops of scikit-image's bundled 'moon' crater field "
    "(class 'moon', index 1, plays 'damaged') and 'grass' texture (class 'grass', index 0). "
    "Far too easy (expect ~1.0 accuracy): it exercises the pipeline, it does not judge models."
)


@dataclass(frozen=True)
class LabelledImages:
    """A decoded two-class folder. images: (n, 128, 128, 1) float32 in [0, 1]; labels: (n,) int."""

    root: Path
    class_names: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    paths: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...]  # (file, why it could not be read)
    note: str  # from <root>/dataset.json when the folder describes itself, else ""


def make_demo_dataset(out: Path, per_class: int = 300, seed: int = 0) -> dict[str, Any]:
    """Write `out/<class>/<class>-NNNN.png` crops and `out/dataset.json`; same seed, same bytes.

    Crops are square, 64..320 px (so decode_image really resizes), rotated by a multiple of 90
    degrees, maybe mirrored, with a small brightness gain/offset. The folder appears complete or
    not at all: it is built in a hidden sibling and renamed into place.
    """
    import skimage  # imported here: only the demo needs it
    import skimage.data

    out = Path(out)
    if per_class < 2:
        raise DatasetError(f"--per-class must be at least 2 (got {per_class}): one image per class is held out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} already exists and is not an empty directory; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        for class_index, (class_name, loader) in enumerate(sorted(DEMO_SOURCES.items())):
            source = np.asarray(getattr(skimage.data, loader)(), dtype=np.uint8)
            # One stream per class, so a class's crops do not depend on the other class's count.
            rng = np.random.default_rng([seed, class_index])
            class_dir = staging / class_name
            class_dir.mkdir()
            for number in range(per_class):
                crop = _random_view(source, rng)
                Image.fromarray(crop).save(class_dir / f"{class_name}-{number:04d}.png", format="PNG")
        info = {
            "source": f"scikit-image {skimage.__version__}: "
            + ", ".join(f"skimage.data.{loader}()" for loader in sorted(DEMO_SOURCES.values())),
            "classes": sorted(DEMO_SOURCES),
            "per_class": per_class,
            "seed": seed,
            "crop_px": list(DEMO_CROP_PX),
            "note": DEMO_NOTE,
        }
        (staging / DATASET_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _random_view(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = int(rng.integers(DEMO_CROP_PX[0], DEMO_CROP_PX[1] + 1))
    top = int(rng.integers(0, source.shape[0] - size + 1))
    left = int(rng.integers(0, source.shape[1] - size + 1))
    crop = np.rot90(source[top : top + size, left : left + size], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(*DEMO_BRIGHTNESS_GAIN)
    offset = rng.uniform(*DEMO_BRIGHTNESS_OFFSET)
    # 2-D uint8 -> Pillow mode "L"; contiguous because rot90/flip return views.
    return np.ascontiguousarray(np.clip(np.rint(crop * gain + offset), 0, 255).astype(np.uint8))


def load_labelled_folder(root: Path) -> LabelledImages:
    """Decode `root/<class>/*` for exactly two class folders (sorted names; index 1 = positive).

    Unreadable files are skipped with a warning and counted; a dataset that cannot train (no such
    folder, not two classes, a class with fewer than two readable images) raises DatasetError with
    a one-line message saying what to fix. Everything is held in memory (64 KiB per image).
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset directory {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is not a directory")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if len(class_dirs) != 2:
        found = ", ".join(p.name for p in class_dirs) or "none"
        raise DatasetError(
            f"{root} must hold exactly 2 class sub-folders (one per class), found {len(class_dirs)}: {found}"
        )

    images: list[np.ndarray] = []
    labels: list[int] = []
    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    readable_per_class: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DatasetError(f"class folder {class_dir} is empty: every class needs images")
        readable = 0
        for path in files:
            try:
                images.append(preprocess_image(path.read_bytes(), TRAINING_SPEC))
            except (ImageRejected, OSError) as exc:
                skipped.append((path, str(exc)))
                continue
            labels.append(label)
            paths.append(path)
            readable += 1
        readable_per_class.append(readable)

    if not images:
        first, why = skipped[0]
        raise DatasetError(f"none of the {len(skipped)} files under {root} is a readable image (e.g. {first}: {why})")
    for class_dir, readable in zip(class_dirs, readable_per_class):
        if readable < 2:
            unreadable = sum(1 for path, _ in skipped if path.parent == class_dir)
            raise DatasetError(
                f"class folder {class_dir} has {readable} readable image(s) ({unreadable} unreadable): "
                "each class needs at least 2, one of them held out for testing"
            )
    # Warn only once the dataset is usable, so a fatal problem stays a single line.
    for path, why in skipped:
        _LOGGER.warning("skipped unreadable file %s: %s", path, why)

    return LabelledImages(
        root=root,
        class_names=tuple(p.name for p in class_dirs),
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        paths=tuple(paths),
        skipped=tuple(skipped),
        note=_read_note(root),
    )


def _read_note(root: Path) -> str:
    try:
        info = json.loads((root / DATASET_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    note = info.get("note", "") if isinstance(info, dict) else ""
    return note if isinstance(note, str) else ""


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays holding out `test_fraction` of each class (at least one
    image per class on each side)."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = min(max(1, round(len(members) * test_fraction)), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def held_out_fingerprint(root: Path, paths: list[Path]) -> str:
    """sha256 over the sorted held-out file paths (relative to root, POSIX): lets a later run
    (the parity check) prove it recomputed the same held-out split from the dataset folder."""
    names = sorted(Path(path).relative_to(root).as_posix() for path in paths)
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()

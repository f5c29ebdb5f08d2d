"""The model spec and the one preprocessing function that executes it (modelspec/).

Each spec feature is checked against an independent reference: Keras `preprocess_input` in its
three modes, geometry worked out by hand for shorter-side crops and letterboxes, and Hugging Face
image-processor configs as published models carry them.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modelspec.errors import SpecError
from modelspec.hf import preprocess_from_hf
from modelspec.preprocess import decode_pixels, normalize, preprocess_image
from modelspec.spec import InputSpec, ModelSpec, OutputSpec, PreprocessSpec, demo_spec, spec_from_manifest
from tests.floats import assert_f32_close

RNG = np.random.default_rng(21)
PHOTO = RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)  # height 240, width 320


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def spec(height=224, width=224, channels=3, color="rgb", layout="NHWC", **preprocess) -> ModelSpec:
    return ModelSpec(
        input=InputSpec(name="x", height=height, width=width, channels=channels, layout=layout, color=color),
        preprocess=PreprocessSpec(**preprocess),
        output=OutputSpec(name="y", activation="softmax", class_names=("a", "b", "c")),
    ).validated()


# Keras preprocess_input, its three modes ------------------------------------------------------

KERAS_MODES = {
    "tf": dict(color="rgb", scale=1 / 127.5, offset=-1.0),
    "torch": dict(color="rgb", scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "caffe": dict(color="bgr", scale=1.0, mean=(103.939, 116.779, 123.68)),
}


@pytest.mark.parametrize("mode", sorted(KERAS_MODES))
def test_keras_preprocess_input_modes_are_spec_instances(mode):
    from keras.applications import imagenet_utils

    options = dict(KERAS_MODES[mode])
    model_spec = spec(color=options.pop("color"), **options)
    rgb = decode_pixels(png(PHOTO), spec(color="rgb").input, model_spec.preprocess)
    expected = imagenet_utils.preprocess_input(rgb.astype(np.float32)[None], mode=mode)[0]

    ours = preprocess_image(png(PHOTO), model_spec)

    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert_f32_close(ours, np.asarray(expected))


def test_nchw_is_the_nhwc_input_with_channels_first():
    nhwc = preprocess_image(png(PHOTO), spec(layout="NHWC"))
    nchw = preprocess_image(png(PHOTO), spec(layout="NCHW"))

    assert nchw.shape == (3, 224, 224)
    assert np.array_equal(nchw, np.transpose(nhwc, (2, 0, 1)))
    assert nchw.flags.c_contiguous


def test_bgr_reverses_the_channels_of_rgb():
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255

    rgb = decode_pixels(png(red), spec(height=8, width=8).input, PreprocessSpec())
    bgr = decode_pixels(png(red), spec(height=8, width=8, color="bgr").input, PreprocessSpec())

    assert (rgb[..., 0] == 255).all() and (rgb[..., 2] == 0).all()
    assert np.array_equal(bgr, rgb[..., ::-1])


# Geometry ------------------------------------------------------------------------------------

def test_shorter_side_to_256_then_centre_crop_224_is_the_torchvision_recipe():
    model_spec = spec(resize="shorter_side_crop", resize_shorter_to=256)
    image = Image.fromarray(PHOTO)  # 320x240: the shorter side 240 -> 256, the longer 320 -> 341
    expected = np.asarray(image.resize((341, 256), Image.Resampling.BILINEAR).crop((58, 16, 282, 240)))

    pixels = decode_pixels(png(PHOTO), model_spec.input, model_spec.preprocess)

    assert np.array_equal(pixels, expected)


def test_a_centred_mark_stays_centred_through_crop_and_letterbox():
    canvas = np.zeros((100, 300, 3), np.uint8)  # wide: 300x100
    canvas[40:60, 140:160] = 255
    for mode in ("shorter_side_crop", "letterbox", "stretch"):
        model_spec = spec(height=64, width=64, resize=mode)
        pixels = decode_pixels(png(canvas), model_spec.input, model_spec.preprocess)[..., 0]
        rows, cols = np.nonzero(pixels > 128)
        assert abs(rows.mean() - 31.5) <= 1 and abs(cols.mean() - 31.5) <= 1, mode


def test_letterbox_fits_the_whole_image_and_pads_with_the_fill():
    model_spec = spec(height=64, width=64, resize="letterbox", letterbox_fill=114)
    white = np.full((100, 200, 3), 255, np.uint8)  # 2:1 -> 64x32 in the middle, 16 rows of padding above and below

    pixels = decode_pixels(png(white), model_spec.input, model_spec.preprocess)

    assert pixels.shape == (64, 64, 3)
    assert (pixels[:16] == 114).all() and (pixels[48:] == 114).all()
    assert (pixels[16:48] == 255).all()


def test_gray_models_get_one_channel_and_rgb_models_three_from_any_upload():
    gray_spec, rgb_spec = demo_spec(), spec(height=32, width=32)
    gray_upload = png(PHOTO[..., 0])

    assert preprocess_image(png(PHOTO), gray_spec).shape == (128, 128, 1)
    from_gray = decode_pixels(gray_upload, rgb_spec.input, rgb_spec.preprocess)
    assert from_gray.shape == (32, 32, 3) and np.array_equal(from_gray[..., 0], from_gray[..., 2])


def test_normalize_is_vectorised_over_a_batch():
    model_spec = spec(**{k: v for k, v in KERAS_MODES["torch"].items() if k != "color"})
    batch = RNG.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)

    together = normalize(batch, model_spec)

    assert together.shape == (5, 224, 224, 3)
    assert np.array_equal(together, np.stack([normalize(image, model_spec) for image in batch]))


# The spec itself -------------------------------------------------------------------------------

def test_a_spec_round_trips_through_the_manifest():
    model_spec = spec(layout="NCHW", color="bgr", resize="letterbox", scale=1.0, mean=(1.0, 2.0, 3.0))

    assert ModelSpec.from_dict(model_spec.to_dict()) == model_spec
    assert spec_from_manifest({"spec": model_spec.to_dict()}) == model_spec
    assert model_spec.summary() == "224x224x3 NCHW bgr"


def test_a_manifest_from_before_specs_is_the_demo_cnn():
    legacy = {"name": "demo", "version": 1, "input": {"shape": [None, 128, 128, 1]},
              "class_names": ["grass", "moon"], "threshold": 0.4}

    assert spec_from_manifest(legacy) == demo_spec(("grass", "moon"), 0.4)
    with pytest.raises(SpecError, match="no 'spec'.*re-import"):
        spec_from_manifest({**legacy, "input": {"shape": [None, 224, 224, 3]}})


@pytest.mark.parametrize("change, message", [
    ({"input": {"channels": 3, "color": "gray"}}, "input.color 'gray' does not fit input.channels 3"),
    ({"input": {"layout": "CHWN"}}, "input.layout is 'CHWN'"),
    ({"preprocess": {"mean": [1.0, 2.0]}}, "preprocess.mean has 2 values for 3 input channel"),
    ({"preprocess": {"std": [0.0]}}, "division by zero"),
    ({"preprocess": {"resize": "shorter_side_crop", "resize_shorter_to": 100}}, "smaller than the 224x224 crop"),
    ({"output": {"activation": "sigmoid"}}, "one output unit scores class_names"),
    ({"output": {"units": 4}}, "output.units 4 does not fit 3 class names"),
    ({"output": {"kind": "probabilities"}}, "probabilities needs activation none"),
    ({"output": {"class_names": ["a", "a", "b"]}}, "repeats a name"),
    ({"output": {"top_k": 0}}, "top_k 0"),
    ({"input": {"colour": "rgb"}}, "unknown key"),
])
def test_an_inconsistent_spec_is_refused_naming_both_sides(change, message):
    raw = spec().to_dict()
    for part, values in change.items():
        raw[part].update(values)

    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(raw)


# Hugging Face preprocessor_config.json ---------------------------------------------------------

def test_a_vit_style_config_stretches_and_normalises_to_minus_one_one():
    config = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True,
              "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}

    preprocess, height, width = preprocess_from_hf(config)

    assert (height, width) == (224, 224)
    assert (preprocess.resize, preprocess.interpolation) == ("stretch", "bilinear")
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.std == (0.5, 0.5, 0.5)


def test_a_resnet_style_config_is_shorter_side_then_centre_crop():
    resnet = {"do_resize": True, "size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
              "crop_size": {"height": 224, "width": 224}, "do_normalize": True,
              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    convnext = {"do_resize": True, "size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3}

    for config in (resnet, convnext):
        preprocess, height, width = preprocess_from_hf(config)
        assert (height, width, preprocess.resize) == (224, 224, "shorter_side_crop")
        assert (preprocess.resize_shorter_to, preprocess.interpolation) == (256, "bicubic")


def test_a_config_the_spec_cannot_express_is_refused_by_key():
    with pytest.raises(SpecError, match="do_pad"):
        preprocess_from_hf({"size": {"height": 32, "width": 32}, "do_pad": True})
    with pytest.raises(SpecError, match="longest_edge"):
        preprocess_from_hf({"size": {"longest_edge": 1333}})


# Outputs -> predictions --------------------------------------------------------------------------

def test_a_binary_logit_gives_each_label_its_own_score():
    from modelspec.outputs import predictions

    out = demo_spec(("grass", "moon"), threshold=0.5).output
    grass, moon = predictions(np.array([[-4.0], [3.0]], np.float32), out)

    assert (grass.label, grass.class_index) == ("grass", 0) and grass.score == pytest.approx(1 - 1 / (1 + np.exp(4)))
    assert (moon.label, moon.class_index) == ("moon", 1) and moon.score == pytest.approx(1 / (1 + np.exp(-3)))
    assert grass.raw == -4.0 and [c[0] for c in grass.top_k] == ["grass", "moon"]


def test_the_threshold_decides_a_binary_model_not_the_larger_score():
    from modelspec.outputs import predictions

    out = OutputSpec(name="p", kind="probabilities", activation="none", class_names=("ok", "defect"),
                     threshold=0.3, units=1)
    (prediction,) = predictions(np.array([[0.35]], np.float32), out)

    assert (prediction.label, prediction.score) == ("defect", pytest.approx(0.35))
    assert prediction.top_k[0][0] == "ok"  # top-k is by score; the decision is by the threshold


def test_softmax_over_n_classes_and_the_top_k_in_order():
    from modelspec.outputs import class_scores, predictions

    out = OutputSpec(name="logits", activation="softmax", class_names=("a", "b", "c", "d"), top_k=3)
    logits = np.array([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 0.0, 5.0]], np.float32)

    first, second = predictions(logits, out)
    scores = class_scores(logits, out)

    assert np.allclose(scores.sum(axis=1), 1.0)
    assert (first.label, first.class_index, first.raw) == ("b", 1, 3.0)
    assert [label for label, _, _ in first.top_k] == ["b", "c", "a"]
    assert first.score == pytest.approx(scores[0, 1]) and second.label == "d"


def test_probabilities_are_taken_as_they_are_and_a_wrong_width_is_named():
    from modelspec.outputs import predictions

    out = OutputSpec(name="probs", kind="probabilities", activation="none", class_names=("x", "y", "z"))
    (prediction,) = predictions(np.array([[0.2, 0.1, 0.7]], np.float32), out)

    assert (prediction.label, prediction.score) == ("z", pytest.approx(0.7))
    with pytest.raises(SpecError, match="gave 2 numbers per image where its spec says 3"):
        predictions(np.zeros((1, 2), np.float32), out)

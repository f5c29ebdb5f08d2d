"""The engines behind worker.engines.create_engine, on the real demo model and real images.

The TF Serving client is tested against the stand-in (modelkit.tfserving_standin), run in this
process: no TF Serving binary exists here. tests/test_engines_stack.py runs each engine in a
worker on the local stack.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import requests

from tests.floats import assert_f32_close
from tests.helpers import demo_images
from worker.engines import ENGINE_PRECISIONS, TFServingOptions, create_engine
from worker.engines.tfserving_engine import TFServingError, encode_json_array
from modelspec.preprocess import preprocess_image


@pytest.fixture(scope="module")
def manifest(model_dir) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def images(manifest) -> np.ndarray:
    """Real decoded demo crops (noise would saturate the sigmoid and hide differences)."""
    from modelspec.spec import spec_from_manifest

    spec = spec_from_manifest(manifest)
    return np.stack([preprocess_image(path.read_bytes(), spec) for _, path in demo_images(per_class=20)])


@pytest.fixture(scope="module")
def reference(model_dir, images) -> np.ndarray:
    from modelkit.parity import reference_logits

    logits = reference_logits(model_dir, images)
    assert logits.std() > 0.5, "degenerate model: logits do not vary across images"
    return logits


@pytest.fixture(scope="module")
def standin(model_dir):
    from modelkit.tfserving_standin import StandIn

    with StandIn("demo", model_dir.parent) as server:
        yield server


def _loaded(engine):
    engine.load()
    engine.warmup()
    return engine


# Registry ------------------------------------------------------------------------------------

def test_unknown_engine_and_inapplicable_precision_are_refused(model_dir, manifest):
    with pytest.raises(ValueError, match="unknown engine 'onnx'"):
        create_engine("onnx", "f32", model_dir, manifest)
    with pytest.raises(ValueError, match="does not run precision 'int8'"):
        create_engine("tensorflow", "int8", model_dir, manifest)
    with pytest.raises(ValueError, match="WORKER_TFSERVING_URL"):
        create_engine("tfserving", "f32", model_dir, manifest)


def test_a_missing_form_is_an_error_not_a_silent_fallback(model_dir, manifest):
    older = {**manifest, "forms": {k: v for k, v in manifest["forms"].items() if k != "openvino_int8"}}

    with pytest.raises(ValueError, match="no form 'openvino_int8' for precision 'int8'"):
        create_engine("openvino", "int8", model_dir, older)


# OpenVINO -------------------------------------------------------------------------------------

def _cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("precision, form", [("f32", "openvino_fp32"), ("bf16", "openvino_fp32"),
                                             ("f16", "openvino_fp16"), ("int8", "openvino_int8"),
                                             ("default", "openvino_fp32")])
def test_openvino_reports_the_precision_it_really_runs(model_dir, manifest, images, reference, precision, form):
    import openvino as ov

    engine = _loaded(create_engine("openvino", precision, model_dir, manifest))
    info = engine.describe()
    logits = engine.infer(images)

    assert (info.name, info.version, info.device, info.model_form) == (
        "openvino", ov.get_version().split("-")[0], "CPU", form)
    reduced = "bf16" if _cpu_has_bf16() else "f32"  # f16 hint: bf16 on CPUs without native f16
    expected = {"f32": "f32", "bf16": reduced, "f16": reduced if reduced == "bf16" else "f16",
                "int8": "int8", "default": reduced}[precision]
    assert info.precision == expected
    assert logits.shape == (len(images), 1) and logits.dtype == np.float32
    if precision == "f32":
        from modelkit.parity import TOLERANCES

        f32 = TOLERANCES["f32"]  # another library: summation order only
        np.testing.assert_allclose(logits, reference, rtol=f32.rtol, atol=f32.atol)


def test_openvino_infer_is_safe_from_several_threads(model_dir, manifest, images):
    from concurrent.futures import ThreadPoolExecutor

    engine = _loaded(create_engine("openvino", "f32", model_dir, manifest))
    expected = engine.infer(images[:8])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: engine.infer(images[:8]), range(16)))

    for result in results:
        assert_f32_close(result, expected)


# TensorFlow ------------------------------------------------------------------------------------

def test_tensorflow_runs_the_serving_signature_in_process(model_dir, manifest, images, reference):
    import tensorflow as tf

    engine = _loaded(create_engine("tensorflow", "f32", model_dir, manifest))
    info = engine.describe()

    assert (info.name, info.version, info.device, info.precision, info.model_form) == (
        "tensorflow", tf.__version__, "CPU", "f32", "saved_model")
    assert_f32_close(engine.infer(images), reference)
    assert engine.infer(images[:1]).shape == (1, 1)


# TF Serving client -----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tfserving_client_matches_the_reference(model_dir, manifest, images, reference, standin, protocol):
    url = standin.rest_url if protocol == "rest" else standin.grpc_target
    engine = _loaded(create_engine("tfserving", "f32", model_dir, manifest,
                                   tfserving=TFServingOptions(url=url, protocol=protocol)))
    info = engine.describe()

    assert (info.name, info.version, info.precision, info.model_form) == ("tfserving", protocol, "f32", "saved_model")
    assert info.device == url.split("://")[-1]
    # The stand-in runs the same SavedModel in another batch and thread layout: equal up to
    # summation order. The wire itself is exact (test_json_encoding_round_trips_float32_exactly).
    assert_f32_close(engine.infer(images), reference)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tfserving_client_refuses_a_server_without_the_manifest_version(model_dir, manifest, standin, protocol):
    url = standin.rest_url if protocol == "rest" else standin.grpc_target
    newer = {**manifest, "version": manifest["version"] + 1}
    engine = create_engine("tfserving", "f32", model_dir, newer, tfserving=TFServingOptions(url=url, protocol=protocol))

    with pytest.raises(Exception, match=r"Servable not found for request: Specific\(demo, 2\)"):
        engine.load()


def test_tfserving_rest_errors_carry_the_server_message(model_dir, manifest, standin):
    engine = create_engine("tfserving", "f32", model_dir, manifest,
                           tfserving=TFServingOptions(url=standin.rest_url, model_name="nope"))
    with pytest.raises(TFServingError, match="HTTP 404: Servable not found"):
        engine.load()


def test_json_encoding_round_trips_float32_exactly():
    rng = np.random.default_rng(3)
    pixels = (rng.integers(0, 256, (2, 5, 4, 1)) / 255.0).astype(np.float32)
    awkward = rng.standard_normal((3, 2)).astype(np.float32) * np.float32(1e-7)

    info = np.finfo(np.float32)
    extremes = np.array([[info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 1 / 3]], np.float32)

    for array in (pixels, awkward, extremes, np.zeros((1, 1), np.float32)):
        decoded = np.asarray(json.loads(encode_json_array(array)), dtype=np.float32)
        assert decoded.shape == array.shape
        assert decoded.tobytes() == array.tobytes()  # bit for bit, sign of zero included
    with pytest.raises(ValueError, match="NaN"):
        encode_json_array(np.array([[math.nan]], np.float32))


# The stand-in speaks TF Serving's documented API ----------------------------------------------

def test_standin_rest_status_and_metadata(standin):
    status = requests.get(f"{standin.rest_url}/v1/models/demo", timeout=5).json()
    metadata = requests.get(f"{standin.rest_url}/v1/models/demo/versions/1/metadata", timeout=5).json()

    assert status == {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                                "status": {"error_code": "OK", "error_message": ""}}]}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert list(signatures) == ["serving_default"]  # __saved_model_init_op hidden, as TF Serving does
    assert signatures["serving_default"]["inputs"]["image"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signatures["serving_default"]["inputs"]["image"]["tensor_shape"]["dim"]] == [
        "-1", "128", "128", "1"]
    assert metadata["model_spec"]["version"] == "1"
    assert standin.model.warmup_requests == 3  # the version's assets.extra records were replayed


def test_standin_rest_predict_row_and_columnar_formats(standin, images, reference):
    url = f"{standin.rest_url}/v1/models/demo:predict"
    batch = images[:2].tolist()

    row = requests.post(url, json={"instances": batch}, timeout=30).json()
    named_rows = requests.post(url, json={"signature_name": "serving_default",
                                          "instances": [{"image": item} for item in batch]}, timeout=30).json()
    columnar = requests.post(url, json={"inputs": {"image": batch}}, timeout=30).json()

    assert_f32_close(np.array([p["logits"] for p in row["predictions"]], np.float32), reference[:2])
    assert named_rows == row
    assert sorted(columnar["outputs"]) == ["logits", "probabilities"]
    assert_f32_close(np.asarray(columnar["outputs"]["logits"], np.float32).reshape(2, -1), reference[:2])


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/other:predict", {"instances": [[0]]}, 404, "Servable not found"),
    ("/v1/models/demo/versions/7:predict", {"instances": [[0]]}, 404, r"Specific\(demo, 7\)"),
    ("/v1/models/demo:predict", "{not json", 400, "JSON Parse error"),
    ("/v1/models/demo:predict", {"instances": [[1.0, 2.0]]}, 400, ""),
    ("/v1/models/demo:predict", {"instances": [], "inputs": []}, 400, "exactly one of"),
    ("/v1/models/demo:predict", {"signature_name": "nope", "inputs": [[0]]}, 400, "nope"),
    ("/v1/models/demo:classify", {"examples": []}, 400, "not implemented"),
])
def test_standin_rest_errors(standin, path, body, status, message):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(f"{standin.rest_url}{path}", data=data, timeout=10)

    assert response.status_code == status
    assert "error" in response.json()
    assert re.search(message, response.json()["error"])


def test_standin_grpc_predict_metadata_and_status(standin, images, reference):
    import grpc
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    from worker.engines.tfserving_engine import ndarray_from_proto, tensor_proto

    channel = grpc.insecure_channel(standin.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest(output_filter=["probabilities"])
    request.model_spec.name = "demo"
    request.inputs["image"].CopyFrom(tensor_proto(images[:3]))
    response = stub.Predict(request, timeout=10)
    metadata = stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": "demo"}, metadata_field=["signature_def"]), timeout=10)
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "demo"}), timeout=10)

    assert list(response.outputs) == ["probabilities"] and response.model_spec.version.value == 1
    expected = 1 / (1 + np.exp(-reference[:3].astype(np.float64)))
    # A probability near 1 moves by at most as much as its logit (the sigmoid's slope is <= 1/4).
    assert_f32_close(ndarray_from_proto(response.outputs["probabilities"]).reshape(3, 1), expected,
                     ulps=int(64 * max(1.0, float(np.abs(reference[:3]).max()))))
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    assert list(signatures.signature_def) == ["serving_default"]
    assert [(v.version, v.state) for v in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    request.model_spec.version.value = 5
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_engine_precision_table_matches_the_settings():
    from worker.settings import ENGINES, PRECISIONS

    assert set(ENGINE_PRECISIONS) == set(ENGINES)
    assert set().union(*ENGINE_PRECISIONS.values()) == set(PRECISIONS)

"""Client of a TensorFlow Serving server (production: the tensorflow/serving image as a sidecar).

Two protocols, chosen by WORKER_TFSERVING_PROTOCOL:

- rest: `POST /v1/models/<name>/versions/<v>:predict` with the columnar body
  `{"signature_name": "serving_default", "inputs": {"image": [[[[0.0039215689], ...]]]}}`.
  JSON is the cost here: one 128x128x1 float32 image (64 KiB as raw bytes) becomes ~200 KiB of
  text. The encoder below formats each distinct value once (its shortest float32 repr, which
  parses back to the same float32, so REST logits match gRPC exactly) and reuses the text:
  measured 68 ms per batch of 32 vs 606 ms (and 358 KiB/image) for `json.dumps(array.tolist())`.
  The server then parses it (the stand-in's Python JSON: ~400 ms per 32 images; TF Serving's C++
  parser is faster but pays the same kind of cost). `python -m modelkit parity` prints the
  batch latency of each path.
- grpc: `tensorflow.serving.PredictionService/Predict` with the image as a TensorProto whose
  `tensor_content` holds the raw float32 bytes (64 KiB per image, no text), and an
  `output_filter` so only the logits come back. The stubs come from tensorflow-serving-api, whose
  protos import the tensorflow package: a gRPC client process pays TensorFlow's import (~2 s,
  ~600 MB RSS) even though it runs no TF op. The REST client needs only `requests`.

The worker always asks for the manifest's version (`versions/<v>`), never "latest": the version
written in each row is then the version that computed it. A server that does not have it
answers 404 / NOT_FOUND and the worker does not start.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import numpy as np

from modelspec.spec import ModelSpec, demo_spec
from worker.engines.base import EngineInfo, in_fixed_batches, warmup_batch

SIGNATURE = "serving_default"
INPUT_NAME = "image"
LOGITS = "logits"
PROTOCOLS = ("rest", "grpc")
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a batch of 32 images is 2 MiB; grpc's default cap is 4 MiB
_DTYPE_NAMES = {"DT_FLOAT": "f32", "DT_HALF": "f16", "DT_BFLOAT16": "bf16", "DT_DOUBLE": "f64"}


class TFServingError(RuntimeError):
    """The server refused or failed a request; the message carries its answer."""


class TFServingEngine:
    # The model runs in another process (or machine): overlapping calls hide the network round trip.
    serialize_calls = False

    def __init__(self, url: str, model_name: str, model_version: int | None, protocol: str = "rest",
                 timeout_s: float = 10.0, model_form: str = "saved_model", spec: ModelSpec | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.model_form = model_form
        self.spec = spec or demo_spec()
        self._client: _RestClient | _GrpcClient | None = None
        self._info: EngineInfo | None = None

    def load(self) -> None:
        client_class = _RestClient if self.protocol == "rest" else _GrpcClient
        self._client = client_class(self.url, self.model_name, self.model_version, self.timeout_s)
        self._client.input_name, self._client.output_name = self.spec.input.name, self.spec.output.name
        self._client.check_available()
        output_dtype = self._client.output_dtype(self.spec.output.name)
        self._info = EngineInfo(
            name="tfserving",
            version=self.protocol,  # TF Serving's API does not expose the server's version
            device=self._client.address,
            precision=_DTYPE_NAMES.get(output_dtype, output_dtype),
            model_form=self.model_form,
        )

    def warmup(self) -> None:
        for batch_size in (1, 8, 32):
            self.infer(warmup_batch(batch_size, spec=self.spec))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return in_fixed_batches(self._infer_once, batch, self.spec.input.batch)

    def _infer_once(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        logits = self._client.predict_logits(batch)
        return np.asarray(logits, dtype=np.float32).reshape(len(batch), -1)

    def describe(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("describe() before load()")
        return self._info


# REST ---------------------------------------------------------------------------------------

class _RestClient:
    input_name, output_name = INPUT_NAME, LOGITS  # the spec's, set by the engine

    def __init__(self, url: str, model_name: str, model_version: int | None, timeout_s: float):
        if not url.startswith(("http://", "https://")):
            url = f"http://{url}"
        self.base = url.rstrip("/")
        self.address = urlsplit(self.base).netloc
        self.model_path = f"{self.base}/v1/models/{model_name}"
        if model_version is not None:
            self.model_path += f"/versions/{model_version}"
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            # A Session per thread: keep-alive connections, and requests.Session is not thread-safe.
            session = self._local.session = requests.Session()
        return session

    def _get(self, url: str) -> dict:
        response = self._session().get(url, timeout=self.timeout_s)
        return _json_or_raise(response, url)

    def check_available(self) -> None:
        status = self._get(self.model_path)
        states = {str(s.get("version")): s.get("state") for s in status.get("model_version_status", [])}
        if not any(state == "AVAILABLE" for state in states.values()):
            raise TFServingError(f"{self.model_path}: no AVAILABLE version (server says {states})")

    def output_dtype(self, output: str) -> str:
        metadata = self._get(f"{self.model_path}/metadata")
        signature = metadata["metadata"]["signature_def"]["signature_def"].get(SIGNATURE)
        if (signature is None or output not in signature.get("outputs", {})
                or self.input_name not in signature["inputs"]):
            raise TFServingError(f"{self.model_path}: signature {SIGNATURE!r} lacks input {self.input_name!r} "
                                 f"or output {output!r} (metadata: {str(metadata)[:300]})")
        return signature["outputs"][output]["dtype"]

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        url = f"{self.model_path}:predict"
        body = f'{{"signature_name":"{SIGNATURE}","inputs":{{"{self.input_name}":{encode_json_array(batch)}}}}}'
        response = self._session().post(url, data=body.encode("ascii"), timeout=self.timeout_s,
                                        headers={"Content-Type": "application/json"})
        outputs = _json_or_raise(response, url)["outputs"]
        # One output comes back bare; several come back as {name: value}.
        return np.asarray(outputs[self.output_name] if isinstance(outputs, dict) else outputs, dtype=np.float32)


def _json_or_raise(response, url: str) -> dict:
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise TFServingError(f"{url}: HTTP {response.status_code}: {message[:500]}")
    return response.json()


def encode_json_array(array: np.ndarray) -> str:
    """A float32 array as nested JSON lists, each value in its shortest float32 form.

    Model inputs repeat few distinct values (a decoded image has at most 256), so each distinct
    value is formatted once; trailing size-1 dimensions are folded into the value's text.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0 or array.size == 0:
        raise ValueError("cannot send an empty or 0-d tensor")
    if not np.all(np.isfinite(array)):
        raise ValueError("JSON cannot carry NaN or infinite values")
    values, inverse = np.unique(array, return_inverse=True)
    shape = array.shape
    keep = len(shape)
    while keep > 1 and shape[keep - 1] == 1:
        keep -= 1
    depth = len(shape) - keep
    table = np.array(["[" * depth + str(value) + "]" * depth for value in values], dtype=object)
    level: list[str] = table[inverse.ravel()].tolist()
    for size in reversed(shape[:keep]):
        level = ["[" + ",".join(level[start : start + size]) + "]" for start in range(0, len(level), size)]
    return level[0]


# gRPC ---------------------------------------------------------------------------------------

class _GrpcClient:
    input_name, output_name = INPUT_NAME, LOGITS  # the spec's, set by the engine

    def __init__(self, url: str, model_name: str, model_version: int | None, timeout_s: float):
        import grpc
        from tensorflow_serving.apis import model_pb2, prediction_service_pb2_grpc

        target = url.split("://", 1)[-1].rstrip("/")
        self.address = target
        self.timeout_s = timeout_s
        options = [("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._spec = model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE)
        if model_version is not None:
            self._spec.version.value = model_version

    def check_available(self) -> None:
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        spec = type(self._spec)()
        spec.CopyFrom(self._spec)
        spec.ClearField("signature_name")
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        status = model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus(request, timeout=self.timeout_s)
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        if not any(version.state == available for version in status.model_version_status):
            raise TFServingError(f"{self.address}: model {spec.name} has no AVAILABLE version ({status})")

    def output_dtype(self, output: str) -> str:
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=self._spec,
                                                                 metadata_field=["signature_def"])
        response = self._stub.GetModelMetadata(request, timeout=self.timeout_s)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        signature = signatures.signature_def.get(SIGNATURE)
        if signature is None or output not in signature.outputs or self.input_name not in signature.inputs:
            raise TFServingError(f"{self.address}: signature {SIGNATURE!r} lacks input {self.input_name!r} "
                                 f"or output {output!r}")
        return types_pb2.DataType.Name(signature.outputs[output].dtype)

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(model_spec=self._spec, output_filter=[self.output_name])
        request.inputs[self.input_name].CopyFrom(tensor_proto(batch))
        response = self._stub.Predict(request, timeout=self.timeout_s)
        return ndarray_from_proto(response.outputs[self.output_name])


def tensor_proto(array: np.ndarray):
    """float32 ndarray -> TensorProto with raw little-endian bytes (what tf.make_tensor_proto makes)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    array = np.ascontiguousarray(array, dtype="<f4")
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=array.tobytes())


def ndarray_from_proto(proto) -> np.ndarray:
    """TensorProto (DT_FLOAT) -> ndarray, from tensor_content or the repeated float_val field."""
    from tensorflow.core.framework import types_pb2

    if proto.dtype != types_pb2.DT_FLOAT:
        raise TFServingError(f"expected a DT_FLOAT tensor, got {types_pb2.DataType.Name(proto.dtype)}")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, dtype="<f4")
    else:
        values = np.asarray(proto.float_val, dtype=np.float32)
        if values.size == 1 and int(np.prod(shape)) > 1:  # a single value means "fill"
            values = np.full(int(np.prod(shape)), values[0], dtype=np.float32)
    return values.astype(np.float32).reshape(shape)

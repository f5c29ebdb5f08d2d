"""A stand-in for TensorFlow Serving's model server, for tests and local runs only.

No TF Serving binary can be installed here, so this serves the real SavedModel (loaded with
tf.saved_model.load, the same graph TF Serving would run) behind the documented parts of TF
Serving's API that the worker's `tfserving` engine uses:

REST (https://www.tensorflow.org/tfx/serving/api_rest):
    GET  /v1/models/<name>[/versions/<v>]               model status
    GET  /v1/models/<name>[/versions/<v>]/metadata      signature defs
    POST /v1/models/<name>[/versions/<v>]:predict       {"instances": [...]} (row) or {"inputs": ...} (columnar)
gRPC:
    tensorflow.serving.PredictionService/Predict, /GetModelMetadata (signature_def)
    tensorflow.serving.ModelService/GetModelStatus

Like tensorflow_model_server with its default version policy, it loads the latest numeric
version under --model-base-path (or the one --model-version pins, like a `specific` policy),
replays that version's assets.extra/tf_serving_warmup_requests, and answers NOT_FOUND for any
other version. Not implemented: classify/regress, version labels,
model config files, batching, hot reload. Production runs the real tensorflow/serving image.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from concurrent import futures
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from modelkit.layout import SIGNATURE, WARMUP_RECORDS

_LOGGER = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF Serving hides it from metadata
_REST_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:predict|:classify|:regress)?$"
)


class ServingError(Exception):
    """An error TF Serving would answer with; maps to an HTTP status and a gRPC code."""

    def __init__(self, message: str, http: HTTPStatus, code: grpc.StatusCode):
        super().__init__(message)
        self.http = http
        self.code = code


def _not_found(message: str) -> ServingError:
    return ServingError(message, HTTPStatus.NOT_FOUND, grpc.StatusCode.NOT_FOUND)


def _invalid(message: str) -> ServingError:
    return ServingError(message, HTTPStatus.BAD_REQUEST, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass
class _Servable:
    version: int
    path: Path
    loaded: Any
    signature_defs: dict  # name -> SignatureDef proto (as TF Serving reads them from saved_model.pb)


class ModelServer:
    """One model name and one version under base_path (the latest unless pinned); thread-safe."""

    def __init__(self, name: str, base_path: Path, version: int | None = None):
        self.name = name
        self.base_path = Path(base_path)
        self.pinned_version = version
        self._servable: _Servable | None = None
        self.warmup_requests = 0

    def load(self) -> None:
        versions = sorted(int(p.name) for p in self.base_path.iterdir()
                          if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file())
        if not versions:
            raise FileNotFoundError(f"no numeric version directory with saved_model.pb under {self.base_path}")
        if self.pinned_version is not None and self.pinned_version not in versions:
            raise FileNotFoundError(f"version {self.pinned_version} not found under {self.base_path} (has {versions})")
        version = self.pinned_version if self.pinned_version is not None else versions[-1]
        path = self.base_path / str(version)
        meta = saved_model_pb2.SavedModel()
        meta.ParseFromString((path / "saved_model.pb").read_bytes())
        signature_defs = {key: value for key, value in meta.meta_graphs[0].signature_def.items()
                          if key != _INIT_OP_SIGNATURE}
        self._servable = _Servable(version, path, tf.saved_model.load(str(path)), signature_defs)
        self.warmup_requests = self._replay_warmup(path / WARMUP_RECORDS)
        _LOGGER.info("serving %s version %d from %s (%d warm-up requests replayed)",
                     self.name, version, path, self.warmup_requests)

    @property
    def version(self) -> int:
        return self._servable.version

    def _replay_warmup(self, records: Path) -> int:
        if not records.is_file():
            return 0
        count = 0
        for raw in tf.data.TFRecordDataset(str(records)):
            log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            if log.WhichOneof("log_type") != "predict_log":
                raise ValueError(f"{records}: only predict_log warm-up records are supported")
            request = log.predict_log.request
            self.predict(None, request.model_spec.signature_name,
                         {k: tf.make_ndarray(v) for k, v in request.inputs.items()}, list(request.output_filter))
            count += 1
        return count

    def servable(self, name: str, version: int | None, label: str | None = None) -> _Servable:
        if name != self.name:
            raise _not_found(f"Servable not found for request: Latest({name})")
        if label is not None:
            raise _invalid(f"version labels are not configured (stand-in): {label!r}")
        if version is not None and version != self._servable.version:
            raise _not_found(f"Servable not found for request: Specific({name}, {version})")
        return self._servable

    def predict(self, version: int | None, signature_name: str, inputs: dict[str, np.ndarray],
                output_filter: list[str] | None = None, name: str | None = None) -> dict[str, np.ndarray]:
        servable = self.servable(name or self.name, version)
        signature_name = signature_name or SIGNATURE
        if signature_name not in servable.loaded.signatures:
            raise _invalid(f"Serving signature key \"{signature_name}\" not found.")
        function = servable.loaded.signatures[signature_name]
        expected = servable.signature_defs[signature_name]
        missing = sorted(set(expected.inputs) - set(inputs))
        extra = sorted(set(inputs) - set(expected.inputs))
        if missing or extra:
            raise _invalid(f"input names do not match the signature: missing {missing}, unexpected {extra}")
        tensors = {}
        for key, value in inputs.items():
            spec = expected.inputs[key]
            dtype = tf.dtypes.as_dtype(spec.dtype)
            try:
                array = np.asarray(value, dtype=dtype.as_numpy_dtype)
            except (TypeError, ValueError) as exc:
                raise _invalid(f"input {key!r} is not a {dtype.name} tensor: {exc}") from None
            # Checked here, as TF Serving does: a mismatched shape can abort the process inside a kernel.
            wanted = [dim.size for dim in spec.tensor_shape.dim]
            if not spec.tensor_shape.unknown_rank and (
                    array.ndim != len(wanted) or any(w >= 0 and w != n for w, n in zip(wanted, array.shape))):
                raise _invalid(f"input {key!r} has shape {list(array.shape)}, the signature wants {wanted} "
                               "(-1: any size)")
            tensors[key] = tf.constant(array, dtype=dtype)
        try:
            outputs = function(**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise _invalid(str(exc).splitlines()[0]) from None
        wanted = output_filter or sorted(outputs)
        unknown = [key for key in wanted if key not in outputs]
        if unknown:
            raise _invalid(f"output_filter names unknown outputs {unknown} (outputs: {sorted(outputs)})")
        return {key: outputs[key].numpy() for key in wanted}

    def status(self, name: str, version: int | None) -> list[dict]:
        servable = self.servable(name, version)
        return [{"version": str(servable.version), "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}}]

    def signature_def_map(self, name: str, version: int | None) -> get_model_metadata_pb2.SignatureDefMap:
        servable = self.servable(name, version)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        return signature_map


# REST -----------------------------------------------------------------------------------------

def _rest_handler(server: ModelServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real server
        server_version = "TFServingStandIn"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

        def log_message(self, fmt: str, *args) -> None:
            _LOGGER.debug("rest %s", fmt % args)

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self):
            match = _REST_PATH.match(self.path.split("?", 1)[0])
            if not match:
                raise _not_found(f"Malformed request: {self.command} {self.path}")
            version = int(match["version"]) if match["version"] else None
            server.servable(match["name"], version, match["label"])  # 404 before any work
            return match["name"], version, match["suffix"]

        def do_GET(self) -> None:
            try:
                name, version, suffix = self._route()
                if suffix is None:
                    self._send(HTTPStatus.OK, {"model_version_status": server.status(name, version)})
                elif suffix == "/metadata":
                    signatures = json_format.MessageToDict(server.signature_def_map(name, version),
                                                           preserving_proto_field_name=True)
                    spec = {"name": name, "signature_name": "", "version": str(server.version)}
                    self._send(HTTPStatus.OK, {"model_spec": spec, "metadata": {"signature_def": signatures}})
                else:
                    raise _not_found(f"Malformed request: GET {self.path}")
            except ServingError as exc:
                self._send(exc.http, {"error": str(exc)})

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                name, version, suffix = self._route()
                if suffix != ":predict":
                    raise _invalid(f"{suffix or 'this path'} is not implemented by the stand-in (predict only)")
                self._send(HTTPStatus.OK, _rest_predict(server, name, version, raw))
            except ServingError as exc:
                self._send(exc.http, {"error": str(exc)})

    return Handler


def _rest_predict(server: ModelServer, name: str, version: int | None, raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _invalid(f"JSON Parse error: {exc}") from None
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object")
    signature_name = body.get("signature_name") or SIGNATURE
    servable = server.servable(name, version)
    if signature_name not in servable.signature_defs:
        raise _invalid(f"Serving signature key \"{signature_name}\" not found.")
    input_names = list(servable.signature_defs[signature_name].inputs)
    if ("instances" in body) == ("inputs" in body):
        raise _invalid("the request must have exactly one of \"instances\" (row) or \"inputs\" (columnar)")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise _invalid("\"instances\" must be a non-empty list")
        if all(isinstance(item, dict) for item in instances):
            inputs = {key: [item.get(key) for item in instances] for key in input_names}
        elif len(input_names) == 1:
            inputs = {input_names[0]: instances}
        else:
            raise _invalid(f"the signature has inputs {input_names}: each instance must be an object")
    else:
        value = body["inputs"]
        inputs = value if isinstance(value, dict) else ({input_names[0]: value} if len(input_names) == 1 else None)
        if inputs is None:
            raise _invalid(f"the signature has inputs {input_names}: \"inputs\" must be an object")
    outputs = server.predict(version, signature_name, inputs, name=name)
    if "instances" in body:
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values())).tolist()}
        count = len(next(iter(outputs.values())))
        return {"predictions": [{key: value[i].tolist() for key, value in outputs.items()} for i in range(count)]}
    if len(outputs) == 1:
        return {"outputs": next(iter(outputs.values())).tolist()}
    return {"outputs": {key: value.tolist() for key, value in outputs.items()}}


# gRPC -----------------------------------------------------------------------------------------

def _version_of(model_spec) -> int | None:
    if model_spec.HasField("version"):
        return model_spec.version.value
    if model_spec.version_label:
        raise _invalid(f"version labels are not configured (stand-in): {model_spec.version_label!r}")
    return None


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer):
        self._server = server

    def Predict(self, request, context):
        try:
            version = _version_of(request.model_spec)
            inputs = {key: tf.make_ndarray(value) for key, value in request.inputs.items()}
            outputs = self._server.predict(version, request.model_spec.signature_name, inputs,
                                           list(request.output_filter), name=request.model_spec.name)
        except ServingError as exc:
            context.abort(exc.code, str(exc))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self._server.name
        response.model_spec.version.value = self._server.version
        response.model_spec.signature_name = request.model_spec.signature_name or SIGNATURE
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metadata_field must be exactly ['signature_def']")
        try:
            signatures = self._server.signature_def_map(request.model_spec.name, _version_of(request.model_spec))
        except ServingError as exc:
            context.abort(exc.code, str(exc))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self._server.name
        response.model_spec.version.value = self._server.version
        response.metadata["signature_def"].Pack(signatures)
        return response

    def Classify(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Classify is not implemented by the stand-in")

    def Regress(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Regress is not implemented by the stand-in")

    def MultiInference(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not implemented by the stand-in")


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: ModelServer):
        self._server = server

    def GetModelStatus(self, request, context):
        try:
            statuses = self._server.status(request.model_spec.name, _version_of(request.model_spec))
        except ServingError as exc:
            context.abort(exc.code, str(exc))
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in statuses:
            response.model_version_status.add(version=int(status["version"]),
                                              state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "model config reload is not implemented by the stand-in")


# Both servers ---------------------------------------------------------------------------------

class StandIn:
    """The model server plus its REST and gRPC front ends on 127.0.0.1 (port 0 = any free port)."""

    def __init__(self, name: str, base_path: Path, grpc_port: int = 0, rest_port: int = 0, host: str = "127.0.0.1",
                 version: int | None = None):
        self.model = ModelServer(name, base_path, version)
        self.host = host
        self._grpc_port = grpc_port
        self._rest_port = rest_port
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.rest_port = 0

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self) -> "StandIn":
        self.model.load()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"),
                                 options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(self.model), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self.model), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:{self._grpc_port}")
        if not self.grpc_port:
            raise OSError(f"cannot bind gRPC to {self.host}:{self._grpc_port}")
        self._grpc.start()
        self._http = ThreadingHTTPServer((self.host, self._rest_port), _rest_handler(self.model))
        self._http.daemon_threads = True
        self.rest_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="rest", daemon=True).start()
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc:
            self._grpc.stop(grace_s).wait()

    def __enter__(self) -> "StandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

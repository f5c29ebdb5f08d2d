"""The HTTP face with in-memory fakes (a fake engine, fetcher and sink), for both web frameworks:
the Flask app through Flask's test client, the FastAPI app under uvicorn for real on a free port
(in a thread of this process). Both serve the same endpoints (worker/http/endpoints.py), so every
endpoint test runs against each. Both under their servers on the real local stack are in
test_http_stack.py."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.helpers import png_bytes
from tests.http_helpers import (FRAMEWORKS, PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNT, AsgiServer, FakeTransport,
                                HttpClient, push_token, schema_problems)
from tests.test_batch import MANIFEST, FakeEngine, FakeFetcher, FakeSink
from worker.batch import BatchRunner, Tables
from worker.http.app import AppOptions, create_app
from worker.http.asgi import create_app as create_asgi_app
from worker.http.batcher import MicroBatcher
from worker.http.health import CachedProbe
from worker.http.metrics import Metrics
from worker.http.oidc import PushAuthError, PushTokenVerifier, google_token_decoder
from worker.http.push import PushEnvelopeError, envelope_for, parse_push_envelope
from worker.http.service import InferenceService, LoadedModel, ServiceOptions
from modelspec.preprocess import DecodeLimits
from worker.settings import HttpSettings, SettingsError, StartupError, WorkerSettings
from worker.sysinfo import SystemSampler, machine_facts

RESULTS, ERRORS = "p.d.results", "p.d.errors"
MAX_BYTES = 200_000
FRAMEWORK = "flask 3/gunicorn 27"


def job(name: str, generation: int = 1, run_id: str = "r") -> bytes:
    return json.dumps({"event_key": f"b/{name}#{generation}", "bucket": "b", "name": name,
                       "generation": str(generation), "size": 100, "metadata": {"run_id": run_id}}).encode()


class FakePuller:
    def __init__(self):
        self.healthy, self.started, self.stopped = True, False, False

    def start(self):
        self.started = True

    def stop(self, timeout_s):
        self.stopped = True


class Harness:
    """A service over a real BatchRunner with fakes; the app of `framework` in front of it."""

    def __init__(self, framework: str = "flask", *, load=None, sink_check=lambda: "ok", puller=None, verifier=None,
                 engine=None, gate: threading.Event | None = None, tables: bool = True):
        self.engine, self.sink = engine or FakeEngine(), FakeSink()
        self.fetcher = FakeFetcher({})
        self.pool = ThreadPoolExecutor(4)
        self.runner = BatchRunner(engine=self.engine, manifest=MANIFEST, fetcher=self.fetcher, sink=self.sink,
                                  tables=Tables(RESULTS, ERRORS), limits=DecodeLimits(max_bytes=MAX_BYTES),
                                  machine_row=machine_facts().as_row(), sample_system=SystemSampler().sample,
                                  io_pool=self.pool, web_framework=FRAMEWORK)
        self.pull_ended, self.load_failed = [], []

        def load_model():
            if gate is not None:
                gate.wait(10)
            return LoadedModel(self.runner)

        self.service = InferenceService(
            load or load_model,
            ServiceOptions(limits=DecodeLimits(max_bytes=MAX_BYTES, max_pixels=4_000_000),
                           results_table=RESULTS if tables else "", batch_size=8, batch_wait_s=0.005, pipelines=1,
                           web_framework=FRAMEWORK),
            record_sink=self.sink if tables else None, sink_check=sink_check if tables else None,
            machine_row=machine_facts().as_row(),
            sample_system=SystemSampler().sample, make_puller=(lambda runner: puller) if puller else None,
            on_pull_ended=lambda: self.pull_ended.append(True), on_load_failed=self.load_failed.append)
        self.metrics = Metrics()
        options = AppOptions(max_image_bytes=MAX_BYTES, push_wait_s=5, push_verifier=verifier)
        self.server = None
        if framework == "flask":
            self.app = create_app(self.service, self.metrics, options)
            self.client = self.app.test_client()
        else:
            self.app = create_asgi_app(self.service, self.metrics, options)
            self.server = AsgiServer(self.app)
            self.client = HttpClient(self.server.url)
        self.loading = self.service.start()

    def ready(self) -> "Harness":
        self.loading.join(10)
        assert self.service.ready
        return self

    def push(self, data: bytes, message_id: str, **headers):
        return self.client.post("/pubsub/push", json=envelope_for(data, message_id, "projects/p/subscriptions/s"),
                                headers=headers)

    def close(self):
        if self.server is not None:
            self.server.close()
        self.service.stop(2)
        self.pool.shutdown()


@pytest.fixture(params=FRAMEWORKS)
def framework(request) -> str:
    return request.param


@pytest.fixture
def harness(framework):
    harness = Harness(framework).ready()
    yield harness
    harness.close()


def image_bytes(fmt: str = "PNG", size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, format=fmt)
    return buffer.getvalue()


# --- health ------------------------------------------------------------------------------------

def test_healthz_answers_while_the_model_loads_and_readyz_waits_for_it(framework):
    gate = threading.Event()
    harness = Harness(framework, gate=gate)
    try:
        assert harness.client.get("/healthz").status_code == 200
        loading = harness.client.get("/readyz")
        assert loading.status_code == 503 and loading.json["checks"]["model"] == "loading"
        refused = harness.client.post("/classify", data=png_bytes(1))
        assert refused.status_code == 503 and refused.headers["Retry-After"] and refused.json["error"] == "not_ready"
        gate.set()
        harness.ready()
        ready = harness.client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json == {"ready": True, "checks": {"model": "ok", "pull": "disabled", "sink": "ok"}}
    finally:
        gate.set()
        harness.close()


def test_readyz_is_503_with_the_reason_when_the_sink_is_unreachable(framework):
    harness = Harness(framework, sink_check=lambda: "unreachable: ConnectionError").ready()
    response = harness.client.get("/readyz")
    assert response.status_code == 503 and response.json["checks"]["sink"].startswith("unreachable")
    assert harness.client.get("/healthz").status_code == 200  # alive: not a reason to recreate the VM
    harness.close()


def test_readyz_reports_the_pull_subscriber_and_its_end_stops_the_process(framework):
    puller = FakePuller()
    harness = Harness(framework, puller=puller).ready()
    assert puller.started
    assert harness.client.get("/readyz").json["checks"]["pull"] == "ok"
    puller.healthy = False
    response = harness.client.get("/readyz")
    assert response.status_code == 503 and response.json["checks"]["pull"] == "the pull stream ended"
    deadline = time.monotonic() + 5
    while not harness.pull_ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness.pull_ended
    harness.close()
    assert puller.stopped


def test_a_model_that_does_not_load_fails_health_and_tells_the_process(framework):
    def broken():
        raise FileNotFoundError("no IR")

    harness = Harness(framework, load=broken)
    harness.loading.join(5)
    assert harness.client.get("/healthz").status_code == 500
    assert "no IR" in harness.client.get("/readyz").json["checks"]["model"]
    assert [str(e) for e in harness.load_failed] == ["no IR"]
    harness.close()


def test_a_failed_start_names_its_step_not_the_model(caplog):
    def no_credentials():
        raise StartupError("Google clients", "the BigQuery client needs Google credentials and found none")

    harness = Harness(load=no_credentials)
    harness.loading.join(5)
    harness.close()
    [failed] = harness.load_failed
    assert failed.step == "Google clients"
    assert "cannot start: Google clients: the BigQuery client needs Google credentials" in caplog.text
    assert "did not load" not in caplog.text and "Traceback" not in caplog.text


# --- no tables (WORKER_PULL=false, neither table set) ----------------------------------------------

@pytest.fixture
def no_tables(framework):
    harness = Harness(framework, tables=False).ready()
    yield harness
    harness.close()


def test_without_tables_classify_answers_and_readiness_says_the_sink_is_disabled(no_tables):
    ready = no_tables.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"model": "ok", "pull": "disabled", "sink": "disabled"}
    response = no_tables.client.post("/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 200 and response.json["label"] == "moon" and response.json["recorded"] is False
    assert no_tables.sink.tables == {}


def test_without_tables_a_push_is_503_no_tables_and_never_acked(no_tables):
    no_tables.fetcher.objects["a.png"] = png_bytes(4)
    response = no_tables.push(job("a.png"), "m-1")
    assert response.status_code == 503 and response.json["error"] == "no_tables"
    assert "WORKER_RESULTS_TABLE" in response.json["message"] and "not acked" in response.json["message"]
    assert no_tables.fetcher.fetched == [] and no_tables.sink.tables == {} and no_tables.engine.batches == []
    text = no_tables.client.get("/metrics").get_data(as_text=True)
    assert 'worker_http_requests_total{endpoint="/pubsub/push",method="POST",status="503"} 1.0' in text


def test_without_tables_record_is_refused_before_the_engine_call(no_tables):
    response = no_tables.client.post("/classify?record=true", data=png_bytes(2))
    assert response.status_code == 503 and response.json["error"] == "no_tables"
    assert "?record=true" in response.json["message"] and no_tables.engine.batches == []


def test_without_tables_an_unauthenticated_push_is_still_401(framework):
    verifier = PushTokenVerifier(PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNT, decode=fake_decode)
    harness = Harness(framework, tables=False, verifier=verifier).ready()
    assert harness.push(job("a.png"), "m-1").status_code == 401
    harness.close()


# --- /classify ---------------------------------------------------------------------------------

def test_classify_returns_label_model_engine_and_stage_timings(harness):
    response = harness.client.post("/classify", data=image_bytes(), content_type="image/png")

    assert response.status_code == 200, response.json
    body = response.json
    assert body["label"] == "moon" and body["score"] > 0.99  # white image -> logit +5 in the fake engine
    assert body["class_index"] == 1 and body["input_spec"] == "128x128x1 NHWC gray"
    assert [(c["label"], c["class_index"]) for c in body["top_k"]] == [("moon", 1), ("grass", 0)]
    assert body["top_k"][0]["score"] == body["score"] and body["logit"] == pytest.approx(5.0)
    assert body["model_name"] == "demo" and body["model_version"] == "7"
    assert (body["engine"], body["precision"], body["web_framework"]) == ("fake", "f32", FRAMEWORK)
    timings = body["timings_ms"]
    assert set(timings) == {"receive", "decode", "queue", "inference", "batch_inference", "total"}
    assert timings["total"] >= timings["decode"] > 0 and body["recorded"] is False
    stages = timings["receive"] + timings["decode"] + timings["queue"] + timings["batch_inference"]
    assert stages == pytest.approx(timings["total"], rel=0.05, abs=0.5)
    assert RESULTS not in harness.sink.tables  # nothing written without ?record=true


def test_classify_takes_multipart_uploads(harness):
    response = harness.client.post("/classify", data={"image": (io.BytesIO(image_bytes("JPEG")), "x.jpg",
                                                                "image/jpeg")})
    assert response.status_code == 200 and response.json["label"] == "moon"


@pytest.mark.parametrize("data, status, reason", [
    (b"%PDF-1.4 not an image", 415, "not_an_image"),
    (b"8BPS" + bytes(40), 415, "unsupported_format"),
    (png_bytes(1)[:-30], 400, "corrupt_image"),
    (b"", 400, "empty_object"),
    (bytes(MAX_BYTES + 10), 413, "too_many_bytes"),  # over the decode limit, under the body limit
    (bytes(MAX_BYTES + 100_000), 413, "too_many_bytes"),  # over the body limit: refused before reading
])
def test_bad_input_gets_a_status_and_a_reason(harness, data, status, reason):
    response = harness.client.post("/classify", data=data, content_type="application/octet-stream")
    assert response.status_code == status and response.json["error"] == reason and response.json["message"]


def test_a_pixel_bomb_is_413(harness):
    response = harness.client.post("/classify", data=image_bytes(size=(2100, 2000)))
    assert response.status_code == 413 and response.json["error"] == "too_many_pixels"


def test_a_multipart_body_without_a_file_is_400(harness):
    response = harness.client.post("/classify", data={"note": "no file"}, content_type="multipart/form-data")
    assert response.status_code == 400 and "image" in response.json["message"]


def test_record_writes_a_schema_valid_results_row_with_the_web_framework(harness):
    response = harness.client.post("/classify?record=true&run_id=r-http&name=cat.png", data=png_bytes(2),
                                   content_type="image/png")

    assert response.status_code == 200 and response.json["recorded"] is True
    [row] = harness.sink.tables[RESULTS]
    assert schema_problems(row) == []
    assert row["event_key"] == response.json["event_key"] and row["event_key"].startswith("classify:")
    assert (row["run_id"], row["object_name"], row["web_framework"]) == ("r-http", "cat.png", FRAMEWORK)
    assert row["label"] == response.json["label"] and row["total_ms"] > 0 and row["batch_size"] == 1
    stages = row["queue_ms"] + row["preprocess_ms"] + row["batch_wait_ms"] + row["batch_inference_ms"]
    assert stages == pytest.approx(row["total_ms"], rel=0.05, abs=0.5)  # like a pipeline row


def test_a_record_the_sink_refuses_is_503_with_the_result(harness):
    harness.sink.down = True
    response = harness.client.post("/classify?record=1", data=png_bytes(3))
    assert response.status_code == 503 and response.json["error"] == "not_recorded" and response.json["label"]


def test_a_bad_record_flag_is_400(harness):
    assert harness.client.post("/classify?record=maybe", data=png_bytes(3)).status_code == 400


def test_concurrent_requests_share_engine_calls(framework):
    engine = SlowEngine()
    harness = Harness(framework, engine=engine).ready()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: harness.client.post("/classify", data=png_bytes(i)).status_code,
                                 range(16)))
    harness.close()
    assert statuses == [200] * 16
    assert sum(engine.batches) == 16 and len(engine.batches) < 16


class SlowEngine(FakeEngine):
    def infer(self, batch):
        time.sleep(0.02)
        return super().infer(batch)


# --- /pubsub/push ------------------------------------------------------------------------------

def test_a_push_is_answered_204_only_after_its_row_and_a_duplicate_adds_none(harness):
    harness.fetcher.objects["a.png"] = png_bytes(4)

    first = harness.push(job("a.png"), "m-1")
    again = harness.push(job("a.png"), "m-1")  # Pub/Sub delivers the same message again

    assert (first.status_code, again.status_code) == (204, 204)
    rows = harness.sink.tables[RESULTS]
    assert [r["event_key"] for r in rows] == ["b/a.png#1"]
    assert rows[0]["message_id"] == "m-1" and rows[0]["web_framework"] == FRAMEWORK
    assert harness.fetcher.fetched == ["a.png"]


def test_a_malformed_job_becomes_an_error_row_and_is_acked(harness):
    response = harness.push(b'{"bucket": "b"}', "m-bad")
    assert response.status_code == 204
    [row] = harness.sink.tables[ERRORS]
    assert row["reason"] == "malformed_job" and row["message_id"] == "m-bad"


def test_a_push_that_cannot_be_written_is_503_so_pubsub_redelivers(harness):
    harness.fetcher.objects["b.png"] = png_bytes(5)
    harness.sink.down = True
    assert harness.push(job("b.png"), "m-2").status_code == 503
    harness.sink.down = False
    assert harness.push(job("b.png"), "m-2").status_code == 204
    assert len(harness.sink.tables[RESULTS]) == 1


def test_a_body_that_is_not_an_envelope_is_400(harness):
    for body in (b"not json", b"{}", json.dumps({"message": {"data": "***", "messageId": "m"}}).encode()):
        response = harness.client.post("/pubsub/push", data=body, content_type="application/json")
        assert response.status_code == 400 and response.json["error"] == "bad_envelope"


def test_concurrent_pushes_are_batched_into_one_runner_call(framework):
    engine = SlowEngine()
    harness = Harness(framework, engine=engine).ready()
    for index in range(12):
        harness.fetcher.objects[f"c{index}.png"] = png_bytes(index)
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: harness.push(job(f"c{i}.png"), f"m-c{i}").status_code, range(12)))
    harness.close()
    assert statuses == [204] * 12 and len(harness.sink.tables[RESULTS]) == 12
    assert len(engine.batches) < 12


def test_envelope_parsing():
    message = parse_push_envelope(json.dumps({
        "message": {"data": "eyJhIjogMX0=", "messageId": "42", "attributes": {"k": "v"},
                    "publishTime": "2026-11-22T22:00:00.5Z"},
        "subscription": "projects/p/subscriptions/s", "deliveryAttempt": 3}).encode())
    assert (message.data, message.message_id, message.delivery_attempt) == (b'{"a": 1}', "42", 3)
    assert message.attributes == {"k": "v"} and message.subscription.endswith("/s")
    assert message.publish_time.isoformat() == "2026-11-22T22:00:00.500000+00:00"
    assert parse_push_envelope(b'{"message": {"message_id": "7"}}').data == b""
    for body in (b"[]", b'{"message": {"data": "eA=="}}', b'{"message": {"messageId": "1"}, "deliveryAttempt": 0}'):
        with pytest.raises(PushEnvelopeError):
            parse_push_envelope(body)


# --- push authentication -----------------------------------------------------------------------

def fake_decode(token: str, audience: str) -> dict:
    if token == "garbage":
        raise ValueError("Wrong number of segments")
    return json.loads(token)


def test_push_with_an_audience_needs_a_token_of_the_push_service_account(framework):
    verifier = PushTokenVerifier(PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNT, decode=fake_decode)
    harness = Harness(framework, verifier=verifier).ready()
    harness.fetcher.objects["d.png"] = png_bytes(6)
    good = json.dumps({"iss": "https://accounts.google.com", "email": PUSH_SERVICE_ACCOUNT, "email_verified": True})
    other = json.dumps({"iss": "https://accounts.google.com", "email": "someone@x.test", "email_verified": True})

    assert harness.push(job("d.png"), "m-d").status_code == 401
    assert harness.push(job("d.png"), "m-d", Authorization="Bearer garbage").status_code == 401
    assert harness.push(job("d.png"), "m-d", Authorization=f"Bearer {other}").status_code == 403
    assert RESULTS not in harness.sink.tables
    assert harness.push(job("d.png"), "m-d", Authorization=f"Bearer {good}").status_code == 204
    harness.close()


def test_google_id_token_verification_with_a_test_signing_key():
    transport = FakeTransport()
    verifier = PushTokenVerifier(PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNT,
                                 decode=google_token_decoder("https://certs.test/", transport=transport))

    claims = verifier.verify(f"Bearer {push_token()}")
    verifier.verify(f"Bearer {push_token()}")

    assert claims["email"] == PUSH_SERVICE_ACCOUNT and transport.calls == 1  # certificates cached
    cases = [(push_token(audience="https://elsewhere.test"), 401), (push_token(issuer="https://evil.test"), 401),
             (push_token(expires_in_s=-3600), 401), (push_token(email="other@x.test"), 403)]
    for token, status in cases:
        with pytest.raises(PushAuthError) as refused:
            verifier.verify(f"Bearer {token}")
        assert refused.value.status == status


# --- /metrics ----------------------------------------------------------------------------------

def test_metrics_count_classify_push_errors_and_model(harness):
    harness.fetcher.objects["e.png"] = png_bytes(7)
    harness.client.post("/classify", data=png_bytes(8))
    harness.client.post("/classify", data=b"text")
    harness.push(job("e.png"), "m-e")
    harness.push(b"{}", "m-f")

    response = harness.client.get("/metrics")

    text = response.get_data(as_text=True)
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    for line in ('worker_images_total{source="classify"} 1.0', 'worker_images_total{source="pipeline"} 1.0',
                 'worker_errors_total{reason="not_an_image",source="classify"} 1.0',
                 'worker_errors_total{reason="malformed_job",source="pipeline"} 1.0',
                 'worker_deliveries_total{outcome="result"} 1.0', 'worker_ready 1.0',
                 'worker_batch_size_count{source="classify"} 1.0',
                 'worker_http_requests_total{endpoint="/pubsub/push",method="POST",status="204"} 2.0'):
        assert line in text, line
    assert 'worker_stage_seconds_count{source="pipeline",stage="download"} 1.0' in text
    assert 'worker_stage_seconds_count{source="classify",stage="decode"} 1.0' in text
    assert 'worker_model_info{device="CPU",engine="fake"' in text


def test_each_app_has_its_own_registry():
    assert Metrics().registry is not Metrics().registry


# --- the two frameworks --------------------------------------------------------------------------

def _on_an_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_fastapi_runs_the_blocking_work_in_threads_not_on_the_event_loop():
    seen = []

    def decode(token: str, audience: str) -> dict:  # the OIDC check: certificates fetched here
        seen.append(("push token", _on_an_event_loop()))
        return fake_decode(token, audience)

    verifier = PushTokenVerifier(PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNT, decode=decode)
    harness = Harness("fastapi", verifier=verifier).ready()
    insert = harness.sink.insert

    def recorded_insert(table, rows):  # the BigQuery insert of ?record=true
        seen.append(("record", _on_an_event_loop()))
        return insert(table, rows)

    harness.sink.insert = recorded_insert
    harness.fetcher.objects["t.png"] = png_bytes(9)
    good = json.dumps({"iss": "https://accounts.google.com", "email": PUSH_SERVICE_ACCOUNT, "email_verified": True})
    try:
        assert harness.client.post("/classify?record=true", data=png_bytes(8)).status_code == 200
        assert harness.push(job("t.png"), "m-t", Authorization=f"Bearer {good}").status_code == 204
    finally:
        harness.close()
    # (the pushed job's row goes through the same fake sink, from the push batcher's thread)
    assert {what for what, _ in seen} == {"record", "push token"}
    assert not any(on_loop for _, on_loop in seen), seen


def comparable(response) -> tuple:
    """Status, reason and the body's keys, without what varies between two requests."""
    body = response.json
    if not isinstance(body, dict):
        return response.status_code, response.get_data()
    return response.status_code, body.get("error"), sorted(body), body.get("label"), body.get("checks")


def contract_requests() -> list[tuple[str, str, dict]]:
    """(method, path, client arguments); afresh for each client: Flask's closes the files it sends."""
    return [
        ("get", "/healthz", {}), ("get", "/readyz", {}), ("get", "/nowhere", {}), ("post", "/healthz", {}),
        ("get", "/classify", {}), ("get", "/healthz/", {}),
        ("post", "/classify", {"data": image_bytes(), "content_type": "image/png"}),
        ("post", "/classify", {"data": {"file": (io.BytesIO(image_bytes("JPEG")), "x.jpg", "image/jpeg")}}),
        ("post", "/classify", {"data": b"text", "content_type": "text/plain"}),
        ("post", "/classify", {"data": bytes(MAX_BYTES + 100_000)}),
        ("post", "/classify?record=maybe", {"data": png_bytes(1)}),
        ("post", "/classify?record=true&name=n.png", {"data": png_bytes(1)}),
        ("post", "/pubsub/push", {"data": b"[]", "content_type": "application/json"}),
        ("post", "/pubsub/push", {"json": envelope_for(job("s.png"), "m-s")}),
        ("post", "/pubsub/push", {"json": envelope_for(job("s.png"), "m-s")}),
    ]


def test_both_frameworks_answer_every_request_alike():
    harnesses = {framework: Harness(framework).ready() for framework in FRAMEWORKS}
    try:
        for harness in harnesses.values():
            harness.fetcher.objects["s.png"] = png_bytes(4)
        answers = {framework: [comparable(getattr(h.client, method)(path, **kwargs))
                               for method, path, kwargs in contract_requests()]
                   for framework, h in harnesses.items()}
        assert answers["fastapi"] == answers["flask"]
        assert [answer[0] for answer in answers["flask"]] == [200, 200, 404, 405, 405, 404, 200, 200, 415, 413, 400,
                                                               200, 400, 204, 204]
        metrics = {framework: h.client.get("/metrics").get_data(as_text=True) for framework, h in harnesses.items()}
        for line in ('worker_http_requests_total{endpoint="other",method="GET",status="404"} 2.0',
                     'worker_http_requests_total{endpoint="/classify",method="POST",status="413"} 1.0',
                     'worker_errors_total{reason="too_many_bytes",source="classify"} 1.0',
                     'worker_deliveries_total{outcome="duplicate"} 1.0'):
            assert line in metrics["flask"] and line in metrics["fastapi"], line
    finally:
        for harness in harnesses.values():
            harness.close()


UVICORN_SERVE_SCRIPT = """
import contextlib, os, signal, sys, threading
from fastapi import FastAPI
from worker.http import asgi, uvicorn_server

def app_from_env(on_pull_ended=None):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        end = on_pull_ended if sys.argv[1] == "pull-ended" else lambda: os.kill(os.getpid(), signal.SIGTERM)
        threading.Timer(0.5, end).start()
        yield
        print("service stopped", flush=True)
    return FastAPI(lifespan=lifespan)

asgi.create_app_from_env = app_from_env
sys.exit(uvicorn_server.run_uvicorn())
"""


@pytest.mark.parametrize("how, exit_code", [("sigterm", 0), ("pull-ended", 1)])
def test_serve_under_uvicorn_stops_gracefully_and_says_why_in_its_exit_code(how, exit_code):
    """SIGTERM: drained, lifespan shutdown run, exit 0. The pull stream ended: the same graceful stop,
    then exit 1 so the supervisor starts a fresh process (gunicorn's master forks a new worker)."""
    import subprocess
    import sys

    from localcloud.config import free_ports

    env = {**os.environ, "WORKER_HTTP_PORT": str(free_ports(1)[0]), "WORKER_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", UVICORN_SERVE_SCRIPT, how], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == exit_code, done.stderr
    assert "service stopped" in done.stdout


def test_web_framework_names_the_framework_and_its_server_with_versions():
    import importlib.metadata

    from worker.http.wiring import web_framework

    version = importlib.metadata.version
    assert web_framework("flask") == f"flask {version('flask')}/gunicorn {version('gunicorn')}"
    assert web_framework("fastapi") == f"fastapi {version('fastapi')}/uvicorn {version('uvicorn')}"


def test_the_framework_comes_from_worker_web_framework():
    assert HttpSettings.from_env({}).web_framework == "flask"
    assert HttpSettings.from_env({"WORKER_WEB_FRAMEWORK": " FastAPI "}).web_framework == "fastapi"
    with pytest.raises(SettingsError, match="WORKER_WEB_FRAMEWORK='django'"):
        HttpSettings.from_env({"WORKER_WEB_FRAMEWORK": "django"})


def test_uvicorn_settings_drain_requests_then_stop_the_service_within_the_graceful_timeout():
    from worker.http import uvicorn_conf

    http = HttpSettings.from_env({"WORKER_HTTP_THREADS": "4"})
    settings = uvicorn_conf.config_kwargs(http)
    assert (settings["loop"], settings["http"], settings["workers"]) == ("uvloop", "httptools", None)
    assert settings["lifespan"] == "on" and settings["limit_max_requests"] is None
    assert settings["timeout_graceful_shutdown"] + uvicorn_conf.service_stop_s(http) == http.graceful_timeout_s < 30


# --- building blocks ---------------------------------------------------------------------------

def test_micro_batcher_groups_waiting_items_and_fails_a_whole_batch_together():
    seen = []
    started = threading.Event()

    def process(items):
        seen.append(list(items))
        if items == [0]:
            started.set()
            time.sleep(0.3)
        if "boom" in items:
            raise RuntimeError("boom")
        return [item * 2 for item in items]

    batcher = MicroBatcher(process, max_batch=4)
    first = batcher.submit(0)
    started.wait(1)
    rest = [batcher.submit(i) for i in range(1, 6)]
    assert first.result(1) == 0 and [f.result(1) for f in rest] == [2, 4, 6, 8, 10]
    assert seen == [[0], [1, 2, 3, 4], [5]]
    with pytest.raises(RuntimeError):
        batcher.submit("boom").result(1)
    batcher.stop()


def test_cached_probe_calls_the_dependency_rarely():
    now, calls = [0.0], []

    def probe():
        calls.append(now[0])
        if now[0] >= 100:
            raise ConnectionError("refused")

    cached = CachedProbe(probe, ok_ttl_s=30, fail_ttl_s=5, clock=lambda: now[0])
    assert [cached.check() for _ in range(3)] == ["ok"] * 3 and len(calls) == 1
    now[0] = 100
    assert cached.check().startswith("unreachable: ConnectionError") and len(calls) == 2
    now[0] = 103
    cached.check()
    assert len(calls) == 2


def test_http_settings_from_the_environment():
    settings = HttpSettings.from_env({"WORKER_HTTP_PORT": "9000", "WORKER_HTTP_THREADS": "4",
                                      "WORKER_HTTP_PUSH_AUDIENCE": "https://x"})
    assert (settings.port, settings.threads, settings.push_audience) == (9000, 4, "https://x")
    assert HttpSettings.from_env({}).port == 8080


@pytest.mark.parametrize("env, named", [
    ({"WORKER_HTTP_PORT": "http"}, "WORKER_HTTP_PORT"),
    ({"WORKER_HTTP_PORT": "70000"}, "WORKER_HTTP_PORT"),
    ({"WORKER_HTTP_THREADS": "0"}, "WORKER_HTTP_THREADS"),
    ({"WORKER_HTTP_PUSH_SERVICE_ACCOUNT": "a@b"}, "WORKER_HTTP_PUSH_AUDIENCE"),
    ({"WORKER_HTTP_PUSH_CERTS_URL": "file:///etc/passwd"}, "WORKER_HTTP_PUSH_CERTS_URL"),
])
def test_bad_http_settings_name_the_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        HttpSettings.from_env(env)


def test_push_only_needs_no_subscription_and_pull_is_a_boolean(model_dir):
    base = {"GOOGLE_CLOUD_PROJECT": "p", "WORKER_RESULTS_TABLE": "p.d.r", "WORKER_ERRORS_TABLE": "p.d.e",
            "WORKER_MODEL_DIR": str(model_dir)}
    assert WorkerSettings.from_env({**base, "WORKER_PULL": "false"}).pull is False
    with pytest.raises(SettingsError, match="WORKER_SUBSCRIPTION"):
        WorkerSettings.from_env(base)
    with pytest.raises(SettingsError, match="WORKER_PULL"):
        WorkerSettings.from_env({**base, "WORKER_PULL": "sometimes"})

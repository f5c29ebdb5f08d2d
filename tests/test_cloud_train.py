"""`modelkit cloud-train`: the Vertex AI CustomJob spec against the API's own types, and the submit
and follow path up to the wire, through the real JobServiceClient on a fake gRPC channel.

Nothing here reaches Google: no credentials or network to Vertex AI exist on this machine, so the
job itself never runs in these tests (README: what was and was not run).
"""

from __future__ import annotations

import json

import grpc
import pytest
from click.testing import CliRunner

pytest.importorskip("google.cloud.aiplatform_v1", reason="google-cloud-aiplatform (make install) is not installed")

from google.cloud.aiplatform_v1 import types  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from modelkit import cloud_train as vertex  # noqa: E402
from modelkit.cli import cli  # noqa: E402

IMAGE = "us-central1-docker.pkg.dev/proj/inference/train:abc123"
ACCOUNT = "inference-trainer@proj.iam.gserviceaccount.com"
ARGS = ["cloud-train", "--project", "proj", "--region", "us-central1", "--image", IMAGE, "--service-account", ACCOUNT,
        "--data", "gs://proj-training/datasets/demo", "--out", "gs://proj-models/models", "--name", "demo",
        "--machine-type", "n1-standard-4", "--epochs", "3", "--label", "team=vision", "--display-name", "train-demo-1"]


def request(**changes) -> vertex.CloudTrainRequest:
    values = dict(project="proj", region="us-central1", image_uri=IMAGE, service_account=ACCOUNT,
                  dataset_uri="gs://proj-training/datasets/demo", models_uri="gs://proj-models/models", name="demo",
                  base_output_uri="gs://proj-models/vertex-jobs/x", display_name="x")
    return vertex.CloudTrainRequest(**{**values, **changes})


def test_dry_run_prints_a_custom_job_the_api_schema_accepts_strictly():
    result = CliRunner().invoke(cli, ARGS + ["--dry-run"])

    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)
    # Strict: an unknown or misspelled field fails the parse (ParseError), as the API would refuse it.
    job = types.CustomJob.from_json(result.stdout, ignore_unknown_fields=False)
    message = json_format.ParseDict(spec, types.CustomJob.pb(types.CustomJob()), ignore_unknown_fields=False)
    assert types.CustomJob.serialize(job) == message.SerializeToString()
    (pool,) = job.job_spec.worker_pool_specs
    assert (pool.machine_spec.machine_type, pool.replica_count) == ("n1-standard-4", 1)
    assert pool.container_spec.image_uri == IMAGE
    assert list(pool.container_spec.command) == ["python", "-m", "modelkit"]
    assert list(pool.container_spec.args) == ["train", "--data", "gs://proj-training/datasets/demo", "--out",
                                              "gs://proj-models/models", "--name", "demo", "--seed", "0",
                                              "--log-format", "json", "--epochs", "3"]
    assert job.job_spec.service_account == ACCOUNT
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://proj-models/vertex-jobs/train-demo-1"
    assert dict(job.labels) == {"app": "gcs-inference-pipeline", "job": "train", "model": "demo", "team": "vision"}
    assert job.display_name == "train-demo-1"
    assert job.job_spec.scheduling.timeout.total_seconds() == 7200


def test_the_strict_parse_catches_a_field_the_api_does_not_have():
    spec = json.loads(vertex.job_json(vertex.custom_job(request())))
    spec["jobSpec"]["workerPoolSpecs"][0]["machineSpec"]["machineTyp"] = "e2-standard-4"

    with pytest.raises(json_format.ParseError, match="machineTyp"):
        json_format.ParseDict(spec, types.CustomJob.pb(types.CustomJob()), ignore_unknown_fields=False)


@pytest.mark.parametrize(("changes", "message"), [
    ({"image_uri": "docker.io/library/python:3.11"}, "not an Artifact Registry image"),
    ({"dataset_uri": "/data/demo"}, "--data '/data/demo' must be a gs:// URI"),
    ({"models_uri": "gs://"}, "--out 'gs://' must be a gs:// URI"),
    ({"replica_count": 2}, "runs on one replica"),
    ({"service_account": "trainer"}, "is not a service account e-mail"),
    ({"labels": {"Team": "x"}}, "--label Team=x"),
])
def test_what_the_api_or_the_trainer_would_refuse_is_refused_before_any_call(changes, message):
    with pytest.raises(vertex.CloudTrainError, match=message):
        vertex.custom_job(request(**changes))


# The submit path: the real client library over a fake gRPC channel ------------------------------

class FakeChannel(grpc.Channel):
    """Stands in for a gRPC channel under JobServiceGrpcTransport: records each call's method and the
    request bytes the library serialized, and answers with the next scripted response."""

    def __init__(self, responses: dict[str, list]):
        self.responses = responses
        self.calls: list[tuple[str, bytes]] = []

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, *_args, **_kwargs):
        channel = self

        class Call(grpc.UnaryUnaryMultiCallable):
            def __call__(self, request, *args, **kwargs):
                return self.with_call(request)[0]

            def with_call(self, request, *args, **kwargs):
                channel.calls.append((method, request_serializer(request)))
                response = channel.responses[method.rsplit("/", 1)[-1]].pop(0)
                return response_deserializer(type(response).serialize(response)), None

            def future(self, *args, **kwargs):
                raise NotImplementedError

        return Call()

    def close(self):
        pass

    def subscribe(self, callback, try_to_connect=False):
        pass

    def unsubscribe(self, callback):
        pass

    def unary_stream(self, *args, **kwargs):
        raise NotImplementedError

    def stream_unary(self, *args, **kwargs):
        raise NotImplementedError

    def stream_stream(self, *args, **kwargs):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_client(channel: FakeChannel):
    from google.cloud.aiplatform_v1 import JobServiceClient
    from google.cloud.aiplatform_v1.services.job_service.transports import JobServiceGrpcTransport

    # A channel given to the transport means no credentials are looked up (none exist here).
    return JobServiceClient(transport=JobServiceGrpcTransport(channel=channel))


def job(state: str, **fields) -> types.CustomJob:
    return types.CustomJob(name="projects/proj/locations/us-central1/customJobs/42", display_name="x",
                           state=types.JobState[state], **fields)


def test_submit_sends_the_spec_as_a_create_request_and_follow_returns_when_the_job_succeeds():
    channel = FakeChannel({"CreateCustomJob": [job("JOB_STATE_QUEUED")],
                           "GetCustomJob": [job("JOB_STATE_PENDING"), job("JOB_STATE_RUNNING"),
                                            job("JOB_STATE_SUCCEEDED")]})
    client = fake_client(channel)
    seen = []

    created = vertex.submit(request(), client)
    finished = vertex.follow(client, created.name, poll_s=0, on_state=lambda s, _: seen.append(s), sleep=lambda _: None)

    method, sent = channel.calls[0]
    assert method == "/google.cloud.aiplatform.v1.JobService/CreateCustomJob"
    create = types.CreateCustomJobRequest.deserialize(sent)
    assert create.parent == "projects/proj/locations/us-central1"
    assert create.custom_job == vertex.custom_job(request())
    assert [m for m, _ in channel.calls[1:]] == ["/google.cloud.aiplatform.v1.JobService/GetCustomJob"] * 3
    assert types.GetCustomJobRequest.deserialize(channel.calls[1][1]).name == created.name
    assert seen == ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert finished.state == types.JobState.JOB_STATE_SUCCEEDED


def test_a_failed_job_ends_the_command_with_exit_1_and_the_jobs_own_error(monkeypatch):
    from google.rpc import status_pb2

    error = status_pb2.Status(code=3, message="The replica workerpool0-0 exited with a non-zero status of 2")
    channel = FakeChannel({"CreateCustomJob": [job("JOB_STATE_QUEUED")],
                           "GetCustomJob": [job("JOB_STATE_RUNNING"), job("JOB_STATE_FAILED", error=error)]})
    monkeypatch.setattr(vertex, "job_service_client", lambda region: fake_client(channel))
    monkeypatch.setattr(vertex.time, "sleep", lambda _: None)

    result = CliRunner().invoke(cli, ARGS + ["--poll-s", "1"])

    assert result.exit_code == 1, result.output
    assert "submitted projects/proj/locations/us-central1/customJobs/42" in result.stdout
    assert "ended JOB_STATE_FAILED: The replica workerpool0-0 exited with a non-zero status of 2 (code 3)" in result.stderr
    assert 'resource.labels.job_id="42"' in result.stderr  # where its logs are


def test_a_job_that_succeeds_ends_the_command_with_exit_0_and_its_run_time(monkeypatch):
    import datetime as dt

    started = dt.datetime(2026, 12, 2, 4, 0, tzinfo=dt.timezone.utc)
    done = job("JOB_STATE_SUCCEEDED", start_time=started, end_time=started + dt.timedelta(seconds=95))
    channel = FakeChannel({"CreateCustomJob": [job("JOB_STATE_QUEUED")],
                           "GetCustomJob": [job("JOB_STATE_PENDING"), done]})
    monkeypatch.setattr(vertex, "job_service_client", lambda region: fake_client(channel))
    monkeypatch.setattr(vertex.time, "sleep", lambda _: None)

    result = CliRunner().invoke(cli, ARGS)

    assert result.exit_code == 0, result.output
    assert ("succeeded projects/proj/locations/us-central1/customJobs/42 in 95 s; the version is under "
            "gs://proj-models/models/demo/") in result.stdout
    assert "https://console.cloud.google.com/vertex-ai/locations/us-central1/training/42/cpu?project=proj" in result.stdout

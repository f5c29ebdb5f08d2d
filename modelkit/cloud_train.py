"""`python -m modelkit cloud-train`: train in a Vertex AI custom job that publishes a model version.

The job runs the training image (docker/train.Dockerfile, pushed to Artifact Registry) as
`python -m modelkit train --data gs://... --out gs://BUCKET/models --name NAME`: it reads the
dataset through Cloud Storage FUSE (/gcs/...), trains on the machine type's cores and publishes
gs://BUCKET/models/NAME/VERSION/ with the manifest last, where workers with
WORKER_MODEL_URI=gs://BUCKET/models/NAME pick it up (worker/rollout.py).

The spec is built with the client library's own types (google.cloud.aiplatform_v1.types), so a
field the API does not have fails here, before any call. Submission and polling go through
aiplatform_v1.JobServiceClient; tests drive them through a fake gRPC channel.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from modelkit.errors import ModelkitError

TERMINAL_OK = "JOB_STATE_SUCCEEDED"
TERMINAL_FAILED = ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED", "JOB_STATE_PARTIALLY_SUCCEEDED")
# Artifact Registry docker images: LOCATION-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE[:TAG|@sha256:...]
_ARTIFACT_REGISTRY = re.compile(r"^[a-z0-9-]+-docker\.pkg\.dev/[^/]+/[^/]+/.+")
# Vertex AI (and Google Cloud) labels: lower-case keys starting with a letter, <= 63 characters.
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
DEFAULT_LABELS = {"app": "gcs-inference-pipeline", "job": "train"}


class CloudTrainError(ModelkitError):
    """The job cannot be submitted as asked, or it ended without success (the message says why)."""


@dataclass(frozen=True)
class CloudTrainRequest:
    project: str
    region: str
    image_uri: str
    service_account: str
    dataset_uri: str  # gs://BUCKET/PREFIX with one sub-folder per class
    models_uri: str  # gs://BUCKET/models: the version lands in NAME/VERSION under it
    name: str
    machine_type: str = "n1-standard-4"
    replica_count: int = 1
    version: int | None = None  # None: the next version after the highest published
    epochs: int | None = None
    seed: int = 0
    base_output_uri: str = ""  # the job's base_output_directory (AIP_MODEL_DIR = it + "/model/")
    display_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 7200

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"


def validate(request: CloudTrainRequest) -> None:
    """Refuse, in one line naming the option, what the API or this trainer would refuse later."""
    if not _ARTIFACT_REGISTRY.match(request.image_uri):
        raise CloudTrainError(f"--image {request.image_uri!r} is not an Artifact Registry image "
                              "(REGION-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE:TAG); push the training image there")
    for option, uri in (("--data", request.dataset_uri), ("--out", request.models_uri),
                        ("--base-output-uri", request.base_output_uri or "gs://x")):
        if not uri.startswith("gs://") or len(uri) <= len("gs://"):
            raise CloudTrainError(f"{option} {uri!r} must be a gs:// URI: the job reads and writes Cloud Storage")
    if request.replica_count != 1:
        raise CloudTrainError(f"--replica-count {request.replica_count}: this trainer (Keras fit on one machine) runs "
                              "on one replica; more would train copies that race to publish the same version. "
                              "Pick a bigger --machine-type instead")
    if "@" not in request.service_account or not request.service_account.endswith(".iam.gserviceaccount.com"):
        raise CloudTrainError(f"--service-account {request.service_account!r} is not a service account e-mail "
                              "(NAME@PROJECT.iam.gserviceaccount.com; infra/ outputs training_service_account)")
    for key, value in request.labels.items():
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise CloudTrainError(f"--label {key}={value}: keys start with a lower-case letter; keys and values are "
                                  "lower-case letters, digits, '_' and '-', at most 63 characters")


def trainer_args(request: CloudTrainRequest) -> list[str]:
    """What the container runs after `python -m modelkit`."""
    args = ["train", "--data", request.dataset_uri, "--out", request.models_uri, "--name", request.name,
            "--seed", str(request.seed), "--log-format", "json"]
    if request.version is not None:
        args += ["--version", str(request.version)]
    if request.epochs is not None:
        args += ["--epochs", str(request.epochs)]
    return args


def custom_job(request: CloudTrainRequest):
    """The CustomJob message (google.cloud.aiplatform_v1.types.CustomJob) for the request."""
    from google.cloud.aiplatform_v1 import types
    from google.protobuf import duration_pb2

    validate(request)
    labels = {**DEFAULT_LABELS, "model": _label_value(request.name), **request.labels}
    spec = types.CustomJobSpec(
        worker_pool_specs=[types.WorkerPoolSpec(
            machine_spec=types.MachineSpec(machine_type=request.machine_type),
            replica_count=request.replica_count,
            container_spec=types.ContainerSpec(
                image_uri=request.image_uri,
                command=["python", "-m", "modelkit"],
                args=trainer_args(request),
            ),
            disk_spec=types.DiskSpec(boot_disk_type="pd-ssd", boot_disk_size_gb=100),
        )],
        service_account=request.service_account,
        base_output_directory=types.GcsDestination(output_uri_prefix=request.base_output_uri),
        scheduling=types.Scheduling(timeout=duration_pb2.Duration(seconds=request.timeout_s)),
    )
    return types.CustomJob(display_name=request.display_name, job_spec=spec, labels=labels)


def job_json(job) -> str:
    """The job as the REST API's JSON (camelCase field names), for --dry-run."""
    from google.cloud.aiplatform_v1 import types

    return types.CustomJob.to_json(job, indent=2, use_integers_for_enums=False,
                                   always_print_fields_with_no_presence=False)


def job_service_client(region: str):
    from google.cloud import aiplatform_v1

    return aiplatform_v1.JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})


def submit(request: CloudTrainRequest, client) -> Any:
    """Create the job; returns the created CustomJob (with its name and state)."""
    return client.create_custom_job(parent=request.parent, custom_job=custom_job(request))


def follow(client, job_name: str, poll_s: float = 15.0, on_state: Callable[[str, float], None] | None = None,
           sleep: Callable[[float], None] = time.sleep) -> Any:
    """Poll the job until it ends; on_state(state, elapsed_s) after every look. Returns the finished
    job; raises CloudTrainError with the job's own error when it did not succeed."""
    started = time.monotonic()
    while True:
        job = client.get_custom_job(name=job_name)
        state = job.state.name
        if on_state is not None:
            on_state(state, time.monotonic() - started)
        if state == TERMINAL_OK:
            return job
        if state in TERMINAL_FAILED:
            error = f"{job.error.message} (code {job.error.code})" if job.error.message else "no error message"
            raise CloudTrainError(f"Vertex AI job {job_name} ended {state}: {error}; its logs: "
                                  f"{logs_command(job_name)}")
        sleep(poll_s)


def logs_command(job_name: str) -> str:
    job_id = job_name.rsplit("/", 1)[-1]
    project = job_name.split("/")[1] if job_name.startswith("projects/") else "PROJECT"
    return (f"gcloud logging read 'resource.type=\"ml_job\" AND resource.labels.job_id=\"{job_id}\"' "
            f"--project={project} --format='value(jsonPayload.message)'")


def console_url(job_name: str, region: str, project: str) -> str:
    return (f"https://console.cloud.google.com/vertex-ai/locations/{region}/training/"
            f"{job_name.rsplit('/', 1)[-1]}/cpu?project={project}")


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CloudTrainError(f"--label {pair!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def _label_value(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]

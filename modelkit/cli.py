"""`python -m modelkit ...`: demo-dataset, train, cloud-train, build-demo, import, verify, parity, publish, tfserving-standin.

Results go to stdout, progress and warnings to stderr. A ModelkitError (bad dataset, bad model
directory) ends the command with one line on stderr and exit code 2, never a traceback.
TensorFlow is imported only by the commands that train or import a Keras, SavedModel or TFLite
model, so the others start in well under 2 s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import click

from modelkit.errors import ContractError, ManifestError, ModelkitError
from modelspec import spec as spec_values

_LOGGER = logging.getLogger("modelkit")
DEMO_PER_CLASS = 300


class _Failure(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ModelkitError, ContractError) as exc:
            raise _Failure(str(exc)) from None


class _ClickHandler(logging.Handler):
    """Writes through click so the stream is looked up per record (works under CliRunner)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@click.group(cls=_Group)
def cli() -> None:
    """Build, train and check the image classifier's model versions."""
    if not _LOGGER.handlers:
        handler = _ClickHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        _LOGGER.addHandler(handler)
        _LOGGER.setLevel(logging.INFO)
        # TensorFlow/absl install a root handler on import; without this every line prints twice.
        _LOGGER.propagate = False


@cli.command("demo-dataset")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Folder to create.")
@click.option("--per-class", type=click.IntRange(min=2), default=DEMO_PER_CLASS, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_dataset(out: Path, per_class: int, seed: int) -> None:
    """Write the offline moon-vs-grass demo dataset (stands in for satellite images)."""
    from modelkit.dataset import make_demo_dataset

    started = time.perf_counter()
    make_demo_dataset(out, per_class=per_class, seed=seed)
    click.echo(f"dataset   {out} ({per_class} per class, seed {seed}) in {time.perf_counter() - started:.1f} s")


@cli.command()
@click.option("--data", "data", required=True,
              help="Folder with exactly two class sub-folders (sorted names, the second is positive): a local "
                   "path, a /gcs/BUCKET/... FUSE path or gs://BUCKET/PREFIX (read through /gcs when mounted, "
                   "else downloaded).")
@click.option("--out", "out", default=None,
              help="Models root: the version lands in OUT/NAME/VERSION. A local folder, or gs://BUCKET/models "
                   "(published with the manifest last, as `publish` does). Default: $AIP_MODEL_DIR (Vertex AI).")
@click.option("--name", required=True)
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Default: one above the highest version of NAME at --out.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Most epochs; training stops once converged. Default: modelkit.train.DEFAULT_EPOCHS (12).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="TensorFlow intra-op threads. Default: the cores this process may use (affinity and cgroup "
                   "quota: a container sees the machine type's vCPUs); 0: TensorFlow's own default.")
@click.option("--log-format", type=click.Choice(["auto", "text", "json"]), default="auto", show_default=True,
              help="json: one JSON object a line (severity, message, step, metrics) that Cloud Logging parses; "
                   "auto: json inside a Vertex AI job, else text.")
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", default=None,
              help="Project of the storage client for gs:// paths [env GOOGLE_CLOUD_PROJECT].")
@click.option("--overwrite", is_flag=True, help="Replace an existing version.")
def train(data: str, out: str | None, name: str, version: int | None, epochs: int | None, seed: int,
          threads: int | None, log_format: str, project: str | None, overwrite: bool) -> None:
    """Train the CNN on DATA and export SavedModel + OpenVINO IRs + manifest, locally or to a bucket."""
    import functools
    import tempfile

    from modelkit import cloud_paths

    json_logs = log_format == "json" or (log_format == "auto" and cloud_paths.on_vertex())
    if json_logs:
        _use_json_logs()
    location = cloud_paths.output_location(out)
    client = functools.cache(lambda: _storage_client(project))
    if version is None:
        version = cloud_paths.next_version(location, name, client)
    elif location.startswith("gs://") and not overwrite and cloud_paths.published_manifest_exists(
            location, name, version, client()):
        raise ModelkitError(f"{location}/{name}/{version} is already published: versions are immutable; pick "
                            "another --version (or leave it out for the next one)")
    threads = cloud_paths.available_cores() if threads is None else threads
    with tempfile.TemporaryDirectory(prefix="modelkit-train-") as scratch:
        data_dir = cloud_paths.dataset_folder(data, Path(scratch), client)
        models_root = Path(scratch) / "models" if location.startswith("gs://") else Path(location)
        version_dir, _ = _train(data_dir, models_root, name, version, epochs, seed, overwrite, threads=threads,
                                dataset_uri=data if data.startswith("gs://") else "", json_logs=json_logs)
        if location.startswith("gs://"):
            from modelkit.publish import publish_version

            published = publish_version(version_dir, location, client(), overwrite=overwrite)
            click.echo(f"published {published.uri} ({published.files} files + manifest.json, manifest last)")
            _LOGGER.info("published %s", published.uri, extra={"model_version": version, "uri": published.uri})


@cli.command("cloud-train")
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", required=True, help="[env GOOGLE_CLOUD_PROJECT]")
@click.option("--region", envvar="GOOGLE_CLOUD_REGION", default="us-central1", show_default=True,
              help="Vertex AI region of the job [env GOOGLE_CLOUD_REGION].")
@click.option("--image", required=True,
              help="The training image in Artifact Registry: REGION-docker.pkg.dev/PROJECT/REPOSITORY/train:TAG.")
@click.option("--service-account", required=True,
              help="The job's identity (terraform output training_service_account): reads the dataset, publishes.")
@click.option("--data", "dataset_uri", required=True, help="gs://BUCKET/PREFIX: one sub-folder per class.")
@click.option("--out", "models_uri", required=True, help="gs://BUCKET/models: the version lands in NAME/VERSION.")
@click.option("--name", required=True)
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Default: the next version after the highest published (decided in the job).")
@click.option("--machine-type", default="n1-standard-4", show_default=True,
              help="Vertex AI machine type; the trainer uses every vCPU it has.")
@click.option("--replica-count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable; added to app, job and model.")
@click.option("--base-output-uri", default=None,
              help="The job's base_output_directory. Default: gs://<--out's bucket>/vertex-jobs/<display name>.")
@click.option("--display-name", default=None, help="Default: train-NAME-<UTC time>.")
@click.option("--timeout-s", type=click.IntRange(min=60), default=7200, show_default=True)
@click.option("--poll-s", type=click.FloatRange(min=1), default=15, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the CustomJob (the API's JSON) and submit nothing.")
def cloud_train(project: str, region: str, image: str, service_account: str, dataset_uri: str, models_uri: str,
                name: str, version: int | None, machine_type: str, replica_count: int, epochs: int | None, seed: int,
                labels: tuple[str, ...], base_output_uri: str | None, display_name: str | None, timeout_s: int,
                poll_s: float, dry_run: bool) -> None:
    """Train in a Vertex AI custom job that publishes gs://.../models/NAME/VERSION (workers with
    WORKER_MODEL_URI=gs://.../models/NAME switch to it). Follows the job until it ends; exits 1 with
    the job's error when it fails."""
    from datetime import datetime, timezone

    from modelkit import cloud_train as vertex

    display_name = display_name or f"train-{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    bucket = models_uri[len("gs://"):].split("/", 1)[0] if models_uri.startswith("gs://") else ""
    request = vertex.CloudTrainRequest(
        project=project, region=region, image_uri=image, service_account=service_account, dataset_uri=dataset_uri,
        models_uri=models_uri.rstrip("/"), name=name, machine_type=machine_type, replica_count=replica_count,
        version=version, epochs=epochs, seed=seed,
        base_output_uri=base_output_uri or f"gs://{bucket}/vertex-jobs/{display_name}",
        display_name=display_name, labels=vertex.parse_labels(labels), timeout_s=timeout_s)
    job = vertex.custom_job(request)
    if dry_run:
        click.echo(vertex.job_json(job))
        return
    client = vertex.job_service_client(region)
    _follow_cloud_job(vertex, request, client, poll_s)


def _follow_cloud_job(vertex, request, client, poll_s: float) -> None:
    """Submit, then show the job's state until it ends (a spinner on a terminal, a line per change else)."""
    from rich.console import Console

    created = vertex.submit(request, client)
    click.echo(f"submitted {created.name}")
    click.echo(f"console   {vertex.console_url(created.name, request.region, request.project)}")
    console = Console(stderr=True)
    last = {"state": None}
    with console.status(f"{created.name}: {created.state.name}") as status:
        def on_state(state: str, elapsed_s: float) -> None:
            status.update(f"{request.display_name}: {state} ({elapsed_s:.0f} s)")
            if state != last["state"] and not console.is_terminal:
                _LOGGER.info("job %s: %s after %.0f s", created.name, state, elapsed_s)
            last["state"] = state

        try:
            finished = vertex.follow(client, created.name, poll_s, on_state)
        except vertex.CloudTrainError as exc:
            click.echo(f"FAILED    {exc}", err=True)
            raise click.exceptions.Exit(1)
    ran = (f" in {(finished.end_time - finished.start_time).total_seconds():.0f} s"
           if finished.start_time and finished.end_time else "")
    click.echo(f"succeeded {created.name}{ran}; the version is under {request.models_uri}/{request.name}/")


def _use_json_logs() -> None:
    """The worker's JSON formatter (worker/logs.py) on modelkit's handler: severity, message and the
    record's extra fields (step, metrics), which Cloud Logging turns into jsonPayload."""
    from worker.logs import JsonFormatter

    for handler in _LOGGER.handlers:
        handler.setFormatter(JsonFormatter())


def _storage_client(project: str | None):
    from google.auth.exceptions import DefaultCredentialsError

    from worker.clients import storage_client

    try:
        return storage_client(project)
    except DefaultCredentialsError:
        raise ModelkitError("no Google credentials for gs:// paths: run `gcloud auth application-default login`, "
                            "or set STORAGE_EMULATOR_HOST to use the local emulator") from None


@cli.command("build-demo")
@click.option("--dataset-dir", type=click.Path(path_type=Path), default=Path("build/demo-dataset"), show_default=True)
@click.option("--models-root", type=click.Path(path_type=Path), default=Path("build/models"), show_default=True)
@click.option("--name", default="demo", show_default=True)
@click.option("--version", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, envvar="MODEL_SEED", default=0, show_default=True,
              help="training seed (env MODEL_SEED); a version built with another seed is rebuilt")
def build_demo(dataset_dir: Path, models_root: Path, name: str, version: int, seed: int) -> None:
    """Reuse MODELS_ROOT/NAME/VERSION if it verifies and was trained with SEED; else build the demo
    dataset (if missing), train and export it."""
    from modelkit.layout import FORMS, REQUIRED_FILES
    from modelspec.manifest import verify_manifest

    version_dir = models_root / name / str(version)
    overwrite = False
    if version_dir.exists():
        try:
            manifest = verify_manifest(version_dir)
        except ManifestError as exc:
            _LOGGER.warning("rebuilding %s: %s", version_dir, exc)
            overwrite = True
        else:
            missing = [form for form in FORMS if form not in manifest["forms"]]
            missing += [path for path in REQUIRED_FILES if path not in manifest["files"]]
            built_seed = manifest.get("training", {}).get("seed", seed)  # not recorded: take it as asked
            if not missing and built_seed != seed:
                _LOGGER.warning("rebuilding %s: trained with seed %s, asked for %s", version_dir, built_seed, seed)
                overwrite = True
            elif not missing:
                click.echo(f"reused    {version_dir} (verified, created {manifest.get('created_at', '?')})")
                _echo_forms(version_dir, manifest)
                return
            else:
                _LOGGER.warning("rebuilding %s: built by an older modelkit, it lacks %s", version_dir,
                                ", ".join(missing))
                overwrite = True
    if not dataset_dir.exists():
        from modelkit.dataset import make_demo_dataset

        _LOGGER.info("building demo dataset in %s", dataset_dir)
        make_demo_dataset(dataset_dir, per_class=DEMO_PER_CLASS, seed=0)
    click.echo(f"dataset   {dataset_dir}")
    _train(dataset_dir, models_root, name, version, None, seed, overwrite)


@cli.command()
@click.argument("version_dir", type=click.Path(path_type=Path))
def verify(version_dir: Path) -> None:
    """Check VERSION_DIR against its manifest (every file's sha256)."""
    from modelspec.manifest import verify_manifest

    manifest = verify_manifest(version_dir)
    click.echo(
        f"ok        {manifest['name']}/{manifest['version']}: "
        f"{len(manifest['files'])} files match {version_dir}/manifest.json"
    )


@cli.command()
@click.option("--model-dir", type=click.Path(path_type=Path), required=True, help="A model version directory.")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Images to compare on, read recursively: in sub-folders named like the model's classes "
                   "(accuracy is measured) or flat (no labels). Needed for an imported model. Default: the "
                   "held-out split of the dataset in the manifest.")
@click.option("--dataset-dir", type=click.Path(path_type=Path), default=None,
              help="The folder the model was trained on. Default: the path in its manifest.")
@click.option("--engines", "engine_specs", default=None,
              help="Comma-separated ENGINE:PRECISION cases; engines: openvino, tensorflow, tfserving-rest, "
                   "tfserving-grpc, onnxruntime. Default: every case the model's forms allow (openvino "
                   "f32/bf16/f16/int8/default, tensorflow:f32 and tfserving-rest/grpc:f32 with a SavedModel, "
                   "onnxruntime:f32 with an ONNX file).")
@click.option("--min-accuracy", type=click.FloatRange(0.0, 1.0), default=None,
              help="Exit 1 when the reference's accuracy on the labelled images is below this: a spec that is "
                   "not how the model was trained (colour order, layout, mean/std) shows here, not between engines.")
@click.option("--tfserving-url", default=None,
              help="REST URL of a running TF Serving (http://host:8501). Default: the stand-in, in process.")
@click.option("--tfserving-grpc", default=None, help="gRPC address of a running TF Serving (host:8500).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only N images: the first N held-out ones, or N evenly spaced over the sorted --images files.")
def parity(model_dir: Path, images_dir: Path | None, dataset_dir: Path | None, engine_specs: str | None,
           min_accuracy: float | None, tfserving_url: str | None, tfserving_grpc: str | None, batch_size: int,
           limit: int | None) -> None:
    """Compare every engine x precision with the model's reference (its source framework: TensorFlow for a
    SavedModel, else ONNX Runtime, else the TFLite interpreter) on held-out or given images: max |d logit|,
    label flips, accuracy, latency. Exits 1 when any case is outside its tolerance or the reference's
    accuracy is below --min-accuracy."""
    from modelkit import parity as checks
    from modelspec.manifest import verify_manifest

    cases_asked = [case.strip() for case in (engine_specs or "").split(",") if case.strip()]
    for case in cases_asked:
        engine, _, precision = case.partition(":")
        if engine not in checks.ENGINES or not precision:
            raise ModelkitError(f"--engines: {case!r} is not ENGINE:PRECISION with a known engine "
                                f"({', '.join(checks.ENGINES)})")
    if images_dir is not None and dataset_dir is not None:
        raise ModelkitError("give --images or --dataset-dir, not both")
    manifest = verify_manifest(model_dir)
    model = f"{manifest['name']}/{manifest['version']}"
    if images_dir is None and not manifest.get("dataset"):
        raise ModelkitError(f"model {model} has no held-out split (its manifest names no training dataset, as "
                            "for an imported model): pass --images FOLDER, in sub-folders named like its classes "
                            f"({', '.join(manifest['class_names'])}) to measure accuracy too")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from modelspec.preprocess import preprocess_image
    from modelspec.spec import spec_from_manifest

    spec = spec_from_manifest(manifest)
    if images_dir is not None:
        found = checks.images_from_folder(images_dir, spec, limit)
        data, labels, pixels, where = found.data, found.labels, found.pixels, found.describe()
    else:
        held_out = checks.held_out_images(manifest, dataset_dir)
        data, labels = held_out.data[:limit], held_out.labels[:limit]
        pixels = np.stack([preprocess_image(item, spec) for item in data])
        where = f"{len(data)} held-out from {held_out.paths[0].parent.parent if held_out.paths else '?'}"
    if min_accuracy is not None and labels is None:
        raise ModelkitError(f"--min-accuracy needs labelled images: {images_dir} has no sub-folder named like a "
                            f"class of the model ({', '.join(spec.output.class_names)})")
    cases_run = cases_asked or checks.default_cases(manifest["forms"])
    reference = checks.reference_outputs(model_dir, manifest, pixels, batch_size, spec)
    accuracy = checks.accuracy(reference.outputs, labels, spec.output) if labels is not None else None
    standin = None
    needs_standin = (any(case.startswith("tfserving") for case in cases_run)
                     and not (tfserving_url and tfserving_grpc))
    if needs_standin:
        from modelkit.tfserving_standin import StandIn

        standin = StandIn(manifest["name"], model_dir.parent, version=int(manifest["version"])).start()
        _LOGGER.info("TF Serving stand-in in process: REST %s, gRPC %s", standin.rest_url, standin.grpc_target)
    try:
        cases = [_parity_case(case, model_dir, manifest, tfserving_url or (standin and standin.rest_url),
                              tfserving_grpc or (standin and standin.grpc_target)) for case in cases_run]
        threshold = checks.decision_threshold(spec.output)
        rows = [checks.run_case(case, data, labels, reference.outputs, threshold, spec, batch_size) for case in cases]
    finally:
        if standin:
            standin.stop()
    floor = f" (--min-accuracy {min_accuracy:g})" if min_accuracy is not None else ""
    click.echo(f"parity    {model} vs {reference.describe()}")
    click.echo(f"images    {where}")
    click.echo(f"accuracy  reference {accuracy:.4f} on {len(data)} labelled images{floor}" if accuracy is not None
               else "accuracy  - (no labels)")
    click.echo(checks.format_table(rows, batch_size))
    failed = [row for row in rows if not row.passed]
    too_low = min_accuracy is not None and accuracy is not None and accuracy < min_accuracy
    if failed:
        click.echo(f"FAILED    {len(failed)} of {len(rows)} cases outside tolerance: "
                   + ", ".join(f"{row.engine}:{row.precision}" for row in failed), err=True)
    if too_low:
        click.echo(f"FAILED    reference accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy:g}: the spec "
                   f"({spec.summary()}) may not be how the model was trained (colour order, layout, mean/std, "
                   "resize); engines agreeing cannot show it, they get the same pixels as the reference", err=True)
    if failed or too_low:
        raise click.exceptions.Exit(1)
    click.echo(f"ok        all {len(rows)} cases within tolerance"
               + (f", reference accuracy {accuracy:.4f} >= {min_accuracy:g}" if min_accuracy is not None else ""))


def _parity_case(case: str, model_dir: Path, manifest: dict[str, Any], rest_url: str | None,
                 grpc_target: str | None):
    from modelkit.parity import Case
    from worker.engines import TFServingOptions, create_engine

    engine, _, precision = case.partition(":")
    if engine.startswith("tfserving"):
        protocol = engine.split("-", 1)[1]
        options = TFServingOptions(url=(rest_url if protocol == "rest" else grpc_target) or "", protocol=protocol)
        return Case("tfserving", precision, lambda: create_engine("tfserving", precision, model_dir, manifest,
                                                                   tfserving=options), label=protocol)
    return Case(engine, precision, lambda: create_engine(engine, precision, model_dir, manifest))


@cli.command()
@click.argument("version_dir", type=click.Path(path_type=Path))
@click.argument("destination")
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", default=None,
              help="Project for the storage client [env GOOGLE_CLOUD_PROJECT].")
@click.option("--overwrite", is_flag=True, help="Replace a published version whose manifest differs.")
def publish(version_dir: Path, destination: str, project: str | None, overwrite: bool) -> None:
    """Upload VERSION_DIR to DESTINATION (gs://BUCKET[/path], path default "models") as
    <path>/<name>/<version>/, manifest last. Honours STORAGE_EMULATOR_HOST."""
    from google.auth.exceptions import DefaultCredentialsError

    from modelspec.manifest import verify_manifest
    from modelkit.publish import parse_destination, publish_version
    from worker.clients import storage_client

    parse_destination(destination)
    verify_manifest(version_dir)
    try:
        client = storage_client(project)
    except DefaultCredentialsError:
        raise ModelkitError("no Google credentials: run `gcloud auth application-default login`, "
                            "or set STORAGE_EMULATOR_HOST to publish to the local emulator") from None
    published = publish_version(version_dir, destination, client, overwrite=overwrite)
    verb = "published" if published.uploaded else "unchanged"
    click.echo(f"{verb:<9} {published.uri} ({published.files} files + manifest.json)")


_SPEC_CHOICES = {"layout": spec_values.LAYOUTS, "color": spec_values.COLORS, "resize": spec_values.RESIZE_MODES,
                 "interpolation": spec_values.INTERPOLATIONS, "kind": spec_values.OUTPUT_KINDS,
                 "activation": spec_values.ACTIVATIONS}


@cli.command("import")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--name", required=True, help="Model name: the version lands in MODELS_ROOT/NAME/VERSION.")
@click.option("--version", type=click.IntRange(min=1), required=True)
@click.option("--models-root", type=click.Path(path_type=Path), default=Path("build/models"), show_default=True)
@click.option("--spec", "spec_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="JSON or YAML with any part of the spec (input, preprocess, output); flags override it.")
@click.option("--hf-preprocessor", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A Hugging Face preprocessor_config.json: resize, crop, rescale, mean/std and size.")
@click.option("--input-name", default=None, help="Default: the model's only input.")
@click.option("--layout", type=click.Choice(_SPEC_CHOICES["layout"]), default=None,
              help="Default: read from the input shape (where the 1 or 3 channels are).")
@click.option("--color", type=click.Choice(_SPEC_CHOICES["color"]), default=None,
              help="Default: gray for 1 channel, rgb for 3.")
@click.option("--size", default=None, help="HEIGHTxWIDTH, for a model whose input size is dynamic.")
@click.option("--resize", type=click.Choice(_SPEC_CHOICES["resize"]), default=None, help="Default: stretch.")
@click.option("--resize-shorter-to", type=click.IntRange(min=1), default=None,
              help="shorter_side_crop: resize the shorter side to this, then cut the centre.")
@click.option("--interpolation", type=click.Choice(_SPEC_CHOICES["interpolation"]), default=None,
              help="Default: bilinear (Pillow).")
@click.option("--letterbox-fill", type=click.IntRange(0, 255), default=None, help="letterbox: padding pixel value.")
@click.option("--scale", default=None, help="Pixels (0-255) are multiplied by this; a fraction like 1/255 is fine.")
@click.option("--offset", default=None, help="Added after scaling, e.g. -1 for [-1, 1].")
@click.option("--mean", default=None, help="Per channel, in the spec's colour order: 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Per channel: 0.229,0.224,0.225.")
@click.option("--output-name", default=None, help="Default: the model's only output.")
@click.option("--kind", type=click.Choice(_SPEC_CHOICES["kind"]), default=None, help="Default: logits.")
@click.option("--activation", type=click.Choice(_SPEC_CHOICES["activation"]), default=None,
              help="Default: softmax over N outputs, sigmoid over one; none for probabilities.")
@click.option("--labels", default=None, help="Class names in output order, comma-separated.")
@click.option("--labels-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Class names, one a line (or a JSON list).")
@click.option("--threshold", type=float, default=None, help="One-output binary models: class 1 at or above it.")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--calibration-dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Images like the ones the model will see: INT8 is calibrated on them (skipped without).")
@click.option("--overwrite", is_flag=True, help="Replace an existing version directory.")
def import_(source: Path, name: str, version: int, models_root: Path, spec_file: Path | None,
            hf_preprocessor: Path | None, labels_file: Path | None, calibration_dir: Path | None, overwrite: bool,
            **flags: Any) -> None:
    """Import a classifier trained elsewhere: SOURCE is a .keras/.h5 file, a SavedModel folder, an
    .onnx or a .tflite file. Writes every form it allows, checked against the spec, with parity."""
    from modelkit import import_spec as specs
    from modelspec.hf import preprocess_from_hf

    started = time.perf_counter()
    layers, origin = [], {}
    if hf_preprocessor:
        layer = specs.declared_from_hf(*preprocess_from_hf(_read_json(hf_preprocessor)))
        layers.append(layer)
        origin.update({f"{s}.{k}": f"--hf-preprocessor {hf_preprocessor.name}" for s in layer for k in layer[s]})
    if spec_file:
        layer = specs.declared_from_file(_read_spec_file(spec_file), f"spec file {spec_file}")
        layers.append(layer)
        origin.update({f"{s}.{k}": f"spec file {spec_file.name}" for s in layer for k in layer[s]})
    if labels_file:
        flags["labels_text"] = specs.parse_labels_text(labels_file.read_text(encoding="utf-8"), str(labels_file))
    layer, flag_origin = specs.declared_from_flags(flags)
    layers.append(layer)
    origin.update(flag_origin)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from modelkit.importer import ImportRequest, import_model

    imported = import_model(ImportRequest(
        source=source, models_root=models_root, name=name, version=version, declared=specs.merge_declared(*layers),
        origin=origin, calibration_dir=calibration_dir, overwrite=overwrite))
    manifest, version_dir = imported.manifest, imported.version_dir
    undeclared = [key for key, said in imported.origins.items() if key.startswith("preprocess.") and said == "default"]
    if len(undeclared) == len([k for k in imported.origins if k.startswith("preprocess.")]):
        _LOGGER.warning("no preprocessing was declared: the defaults (stretch, bilinear, scale 1/255, no mean/std) "
                        "are used; pass --scale/--offset/--mean/--std/--resize or --spec if the model was trained "
                        "otherwise")
    source_info = manifest["source"]
    click.echo(f"source    {source_info['format']} {source} (sha256 {source_info['sha256'][:12]})")
    click.echo(f"spec      {specs.describe_spec(imported.spec, imported.origins)}")
    click.echo(f"model     {version_dir} (imported in {time.perf_counter() - started:.1f} s)")
    _echo_forms(version_dir, manifest)
    for form, row in manifest["parity"]["forms"].items():
        click.echo(f"parity    {form:<14} max |d| {row['max_abs_diff']:.3g} ({row['worst_ratio']:.3g}x the "
                   f"{row['tolerance']} tolerance), top-1 agreement {row['top1_agreement']:.3f}, {row['engine']} "
                   f"{row['precision']}")
    for form, reason in manifest.get("skipped_forms", {}).items():
        click.echo(f"skipped   {form:<14} {reason}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelkitError(f"cannot read {path} as JSON: {exc}") from None


def _read_spec_file(path: Path) -> Any:
    """JSON (.json) or YAML (.yaml, .yml; PyYAML's safe loader)."""
    if path.suffix.lower() == ".json":
        return _read_json(path)
    try:
        import yaml
    except ImportError:
        raise ModelkitError(f"{path}: reading YAML needs PyYAML (pip install pyyaml==6.0.3); or give the spec "
                            "as JSON") from None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelkitError(f"cannot read {path} as YAML: {' '.join(str(exc).split())}") from None


@cli.command("zoo")
@click.option("--networks", default=None, help="Comma-separated (default: the seeds' seven; also tiny, the tests' network).")
@click.option("--root", type=click.Path(path_type=Path), default=Path("build/zoo"), show_default=True)
@click.option("--dataset-dir", type=click.Path(path_type=Path), default=Path("build/demo-dataset"), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even when a cached build matches.")
@click.option("--in-process", is_flag=True, hidden=True, help="Build here, not in a process per network.")
@click.option("--train-only", is_flag=True, hidden=True, help="With --in-process: fit and save, do not import.")
def zoo(networks: str | None, root: Path, dataset_dir: Path, seed: int, force: bool, in_process: bool,
        train_only: bool) -> None:
    """The seeds' networks from keras.applications (no weights downloaded), trained briefly (or
    their classifier only), each imported with `modelkit import` (modelkit.zoo), each in a process
    of its own."""
    from modelkit import zoo as zoo_module

    names = networks.split(",") if networks else list(zoo_module.DEFAULT_NETWORKS)
    failed = []
    for name in names:
        try:
            record = zoo_module.build_network(name, root, dataset_dir, seed, force, log=click.echo,
                                              in_process=in_process, train_only=train_only)
        except zoo_module.ZooError as exc:  # the next network does not depend on this one
            click.echo(f"{name}: FAILED: {exc}", err=True)
            failed.append(name)
            continue
        if in_process:
            continue  # the parent prints the summary line
        training = record.get("training")
        if not training:
            done = f"not trained ({record.get('not_trained_why')})"
        elif training.get("mode") == "head":
            done = f"classifier fitted on the random body's features of {training['images']} images in {training['train_s']} s"
        else:
            done = f"trained {training['images']} images x {training['epochs']} in {training['train_s']} s"
        click.echo(f"{name:<15} {done}; held-out accuracy (Keras) {record['keras_held_out_accuracy']:.3f}")
    if failed:
        raise click.ClickException(f"not built: {', '.join(failed)} (the reasons are above)")


@cli.command("tfserving-standin")
@click.option("--model-name", required=True)
@click.option("--model-base-path", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder of numeric version directories, as for tensorflow_model_server.")
@click.option("--model-version", type=click.IntRange(min=1), default=None, help="Serve this version, not the latest.")
@click.option("--port", "grpc_port", type=click.IntRange(min=0), default=8500, show_default=True,
              help="gRPC port (0: any free port).")
@click.option("--rest-api-port", "rest_port", type=click.IntRange(min=0), default=8501, show_default=True,
              help="REST port (0: any free port).")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="Written once both ports listen: JSON with grpc_port and rest_port.")
def tfserving_standin(model_name: str, model_base_path: Path, model_version: int | None, grpc_port: int,
                      rest_port: int, ready_file: Path | None) -> None:
    """Serve a SavedModel on 127.0.0.1 with TF Serving's REST and gRPC predict API (a stand-in for
    tests: no TF Serving binary here; production runs the tensorflow/serving image)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from modelkit.tfserving_standin import StandIn

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = StandIn(model_name, model_base_path, grpc_port=grpc_port, rest_port=rest_port, version=model_version)
    try:
        server.start()
    except (FileNotFoundError, OSError) as exc:
        raise ModelkitError(f"tfserving-standin: {exc}") from None
    click.echo(f"serving   {model_name} version {server.model.version}: REST {server.rest_url}, "
               f"gRPC {server.grpc_target} ({server.model.warmup_requests} warm-up requests replayed)")
    if ready_file:
        partial = ready_file.with_name(ready_file.name + ".partial")
        partial.write_text(json.dumps({"grpc_port": server.grpc_port, "rest_port": server.rest_port,
                                       "version": server.model.version}))
        os.replace(partial, ready_file)
    stop.wait()
    server.stop()
    click.echo("stopped")


def _train(
    data_dir: Path, models_root: Path, name: str, version: int, epochs: int | None, seed: int, overwrite: bool,
    threads: int = 0, dataset_uri: str = "", json_logs: bool = False,
) -> tuple[Path, dict[str, Any]]:
    from modelkit.dataset import load_labelled_folder

    started = time.perf_counter()
    data = load_labelled_folder(data_dir)  # before importing TensorFlow: bad data fails in a second
    if threads:
        _LOGGER.info("training %s/%d on %d TensorFlow threads", name, version, threads,
                     extra={"model_version": version, "threads": threads})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off stderr
    from modelkit import train as training

    settings = training.TrainSettings(
        models_root=models_root,
        name=name,
        version=version,
        epochs=epochs or training.DEFAULT_EPOCHS,
        seed=seed,
        overwrite=overwrite,
        threads=threads,
        dataset_uri=dataset_uri,
        json_logs=json_logs,
    )
    version_dir, manifest = training.train_and_export(data, settings)
    click.echo(f"model     {version_dir} (built in {time.perf_counter() - started:.1f} s)")
    _echo_forms(version_dir, manifest)
    return version_dir, manifest


def _echo_forms(version_dir: Path, manifest: dict[str, Any]) -> None:
    for form, relative in manifest["forms"].items():
        click.echo(f"form      {form:<14} {version_dir / relative}")
    for form, values in manifest.get("metrics", {}).items():
        click.echo(
            f"held-out  {form:<14} accuracy {values['accuracy']:.4f}  precision {values['precision']:.4f}  "
            f"recall {values['recall']:.4f}  f1 {values['f1']:.4f}  n {values['n']}  "
            f"confusion {values['confusion_matrix']}"
        )


def main() -> None:
    cli(prog_name="python -m modelkit")

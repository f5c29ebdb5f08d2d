"""`python -m modelkit ...`: demo-dataset, train, build-demo, verify.

Results go to stdout, progress and warnings to stderr. A ModelkitError (bad dataset, bad model
directory) ends the command with one line on stderr and exit code 2, never a traceback.
TensorFlow is imported only by the commands that train, so the others start in well under 2 s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import click

from modelkit.errors import ManifestError, ModelkitError

_LOGGER = logging.getLogger("modelkit")
DEMO_PER_CLASS = 300


class _Failure(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelkitError as exc:
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
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Folder with exactly two class sub-folders; sorted names, the second is positive.")
@click.option("--out", "models_root", type=click.Path(path_type=Path), required=True,
              help="Models root; the version lands in OUT/NAME/VERSION.")
@click.option("--name", required=True)
@click.option("--version", type=click.IntRange(min=1), required=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: modelkit.train.DEFAULT_EPOCHS (4).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing version directory.")
def train(
    data_dir: Path, models_root: Path, name: str, version: int, epochs: int | None, seed: int, overwrite: bool
) -> None:
    """Train the CNN on DATA and export SavedModel + OpenVINO IRs + manifest."""
    _train(data_dir, models_root, name, version, epochs, seed, overwrite)


@cli.command("build-demo")
@click.option("--dataset-dir", type=click.Path(path_type=Path), default=Path("build/demo-dataset"), show_default=True)
@click.option("--models-root", type=click.Path(path_type=Path), default=Path("build/models"), show_default=True)
@click.option("--name", default="demo", show_default=True)
@click.option("--version", type=click.IntRange(min=1), default=1, show_default=True)
def build_demo(dataset_dir: Path, models_root: Path, name: str, version: int) -> None:
    """Reuse MODELS_ROOT/NAME/VERSION if it verifies; else build the demo dataset (if missing),
    train and export it."""
    from modelkit.manifest import verify_manifest

    version_dir = models_root / name / str(version)
    overwrite = False
    if version_dir.exists():
        try:
            manifest = verify_manifest(version_dir)
        except ManifestError as exc:
            _LOGGER.warning("rebuilding %s: %s", version_dir, exc)
            overwrite = True
        else:
            click.echo(f"reused    {version_dir} (verified, created {manifest.get('created_at', '?')})")
            _echo_forms(version_dir, manifest)
            return
    if not dataset_dir.exists():
        from modelkit.dataset import make_demo_dataset

        _LOGGER.info("building demo dataset in %s", dataset_dir)
        make_demo_dataset(dataset_dir, per_class=DEMO_PER_CLASS, seed=0)
    click.echo(f"dataset   {dataset_dir}")
    _train(dataset_dir, models_root, name, version, None, 0, overwrite)


@cli.command()
@click.argument("version_dir", type=click.Path(path_type=Path))
def verify(version_dir: Path) -> None:
    """Check VERSION_DIR against its manifest (every file's sha256)."""
    from modelkit.manifest import verify_manifest

    manifest = verify_manifest(version_dir)
    click.echo(
        f"ok        {manifest['name']}/{manifest['version']}: "
        f"{len(manifest['files'])} files match {version_dir}/manifest.json"
    )


def _train(
    data_dir: Path, models_root: Path, name: str, version: int, epochs: int | None, seed: int, overwrite: bool
) -> None:
    from modelkit.dataset import load_labelled_folder

    started = time.perf_counter()
    data = load_labelled_folder(data_dir)  # before importing TensorFlow: bad data fails in a second
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off stderr
    from modelkit import train as training

    settings = training.TrainSettings(
        models_root=models_root,
        name=name,
        version=version,
        epochs=epochs or training.DEFAULT_EPOCHS,
        seed=seed,
        overwrite=overwrite,
    )
    version_dir, manifest = training.train_and_export(data, settings)
    click.echo(f"model     {version_dir} (built in {time.perf_counter() - started:.1f} s)")
    _echo_forms(version_dir, manifest)


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

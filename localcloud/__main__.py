"""`python -m localcloud up|down|status|demo`: the local stack on 127.0.0.1."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from localcloud.config import StackConfig
from localcloud.processes import StackError
from localcloud.stack import Stack

# Wide enough for the result tables when output goes to a file or CI log rather than a terminal.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def _stack() -> Stack:
    return Stack(StackConfig.from_env())


@click.group()
def cli() -> None:
    """Local Google Cloud stand-ins and the pipeline on top of them."""


@cli.command()
@click.option("--no-worker", is_flag=True, help="leave the worker out (run it yourself)")
def up(no_worker: bool) -> None:
    """Start the stack and leave it running."""
    stack = _stack()
    config = stack.config
    try:
        with console.status("starting") as status:
            stack.up(with_worker=not no_worker, on_step=lambda step: status.update(f"starting {step}"))
    except StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    console.print(f"[green]stack is up[/green] (logs in {config.run_dir / 'logs'})")
    console.print(f"""
Point the CLIs at it:
  source {config.run_dir / 'env.sh'}
  gcloud storage cp IMAGE.png gs://{config.bucket}/{config.prefix}
  gsutil cp IMAGE.png gs://{config.bucket}/{config.prefix}
  bq query --nouse_legacy_sql 'SELECT label, score, object_name FROM {config.dataset}.results_dedup'
Stop it with `make down`.""")


@cli.command()
def down() -> None:
    """Stop every process of the stack."""
    config = StackConfig.load(StackConfig.from_env().run_dir) or StackConfig.from_env()
    stopped = Stack(config).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@cli.command()
def status() -> None:
    """Which processes of the stack are running."""
    stack = _stack()
    running = stack.processes.running()
    console.print(f"running: {', '.join(running) if running else 'nothing'}")


@cli.command()
@click.option("--images", default=300, show_default=True, help="demo images to upload")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="seconds to wait for all rows")
def demo(images: int, timeout_s: float) -> None:
    """Start the stack, upload demo images with `gcloud storage cp`, wait for every row, report, stop."""
    from localcloud.demo import run_demo

    sys.exit(run_demo(StackConfig.from_env(), images=images, timeout_s=timeout_s, console=console))


if __name__ == "__main__":
    cli()

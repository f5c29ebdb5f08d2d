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
    console.print(f"[green]stack is up[/green] (logs in {config.run_dir / 'logs'}); a process that exits is "
                  "restarted by the supervisor, and `make status` reports it")
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
    """Which processes of the stack run; loud about any that died or was restarted (exit 1 if down)."""
    from localcloud.stack import stack_health

    config = StackConfig.load(StackConfig.from_env().run_dir) or StackConfig.from_env()
    health = stack_health(Stack(config))
    if not health:
        console.print("running: nothing")
        return
    for item in health:
        if item.running and not item.restarts:
            console.print(f"[green]running[/green]  {item.name} (pid {item.pid})")
        elif item.running:
            console.print(f"[yellow]RESTARTED[/yellow] {item.name} (pid {item.pid}): exited unasked "
                          f"{item.restarts} time(s), restarted by the supervisor; its log before the last exit:",
                          soft_wrap=True)
            console.print(item.log_tail, markup=False, highlight=False)
        else:
            console.print(f"[bold red]DOWN[/bold red]     {item.name}: exited unasked and is not running"
                          f"{' (' + item.supervisor_state + ')' if item.supervisor_state else ''}. "
                          f"Last lines of {item.log_file}:", soft_wrap=True)
            console.print(item.log_tail, markup=False, highlight=False)
    if any(not item.running for item in health):
        console.print("[bold red]the stack is degraded[/bold red]: uploads may get no row until the service is back; "
                      "`make down && make up` restarts everything, then `python -m worker reconcile --republish` "
                      "recovers uploads whose events were lost", soft_wrap=True)
        sys.exit(1)


@cli.command()
@click.option("--images", default=300, show_default=True, help="demo images to upload")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="seconds to wait for all rows")
def demo(images: int, timeout_s: float) -> None:
    """Start the stack, upload demo images with `gcloud storage cp`, wait for every row, report, stop."""
    from localcloud.demo import run_demo

    sys.exit(run_demo(StackConfig.from_env(), images=images, timeout_s=timeout_s, console=console))


if __name__ == "__main__":
    cli()

"""`python -m report`: run sql/queries/ for a selection of runs; print tables, write the HTML report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from localcloud.config import REPO_ROOT, StackConfig
from report import models as report_models
from report.build import collect, terminal_tables, write_html
from report.queries import ReportError, Selection
from report.target import bigquery_warehouse, local_warehouse

DEFAULT_OUT = REPO_ROOT / "build" / "report" / "index.html"
DEFAULT_DATASET = "inference"


def default_run_dir(run_dir: Path, say) -> Path:
    """The stack's run directory; `make bench` keeps its own stack in run_dir/bench, so when only
    a bench has run (a fresh clone: `make bench` then `make report`), that is the one to read."""
    bench_dir = run_dir / "bench"
    if not (run_dir / "stack.json").is_file() and (bench_dir / "stack.json").is_file():
        say(f"no stack in {run_dir}; reading the last bench's in {bench_dir}")
        return bench_dir
    return run_dir


@click.command()
@click.option("--run-id", envvar="REPORT_RUN_ID", help="one run (default: every run)")
@click.option("--run-prefix", envvar="REPORT_RUN_PREFIX", help="runs whose id starts with this, e.g. bench-")
@click.option("--project", envvar="REPORT_PROJECT",
              help="BigQuery project; without it, the local stack's emulator (.run/stack.json)")
@click.option("--dataset", envvar="REPORT_DATASET", default=DEFAULT_DATASET, show_default=True,
              help="dataset with --project")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), envvar="REPORT_OUT", default=DEFAULT_OUT,
              show_default=True, help="the HTML report")
@click.option("--bucket-s", type=click.IntRange(min=1), envvar="REPORT_BUCKET_S",
              help="throughput-over-time bucket in seconds (default: 1 for runs up to 15 min, else 60)")
@click.option("--screenshot", type=click.Path(dir_okay=False, path_type=Path), envvar="REPORT_SCREENSHOT",
              help="also render the report with headless Chromium into this PNG")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="the local stack's run directory (default .run; `make bench` keeps its data in .run/bench)")
@click.option("--quiet", is_flag=True, help="no terminal tables")
@click.option("--bench-models", "bench_models", type=click.Path(dir_okay=False, path_type=Path),
              envvar="REPORT_BENCH_MODELS", default=None,
              help="make bench-models' JSON: per-network tables and the speed-up/fidelity plot (left out if the "
                   "file is missing; `make report` passes build/bench-models/latest.json)")
def main(run_id, run_prefix, project, dataset, out, bucket_s, screenshot, run_dir, quiet, bench_models) -> None:
    """Query the results for a selection of runs and write an HTML report with plots."""
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    selection = Selection(run_id, run_prefix)
    try:
        if project:
            target = bigquery_warehouse(project, dataset, os.environ)
        else:
            target = local_warehouse(run_dir or default_run_dir(StackConfig.from_env().run_dir, console.print),
                                     on_start=console.print)
        with target as warehouse:
            warehouse.check()
            with console.status("running queries") as status:
                data = collect(warehouse, selection, bucket_s,
                               on_query=lambda index, total, name: status.update(f"query {index}/{total}: {name}"))
        data.bench_models = report_models.load(bench_models)
        data.bench_models_source = str(bench_models) if data.bench_models else ""
        if not quiet:
            for table in terminal_tables(data):
                console.print(table)
        write_html(data, out)
        console.print(f"{data.images:,} result rows, {data.errors:,} error rows for {selection.describe()} "
                      f"from {data.source}")
        console.print(f"report: {out.resolve()}")
        if screenshot:
            from report.browser import screenshot as render

            console.print(f"screenshot: {render(out, screenshot)}")
        if data.errors_by_query:
            for message in data.errors_by_query.values():
                console.print(f"[red]error:[/red] {escape(message)}")
            console.print(f"[red]{len(data.errors_by_query)} of {len(data.results)} queries failed[/red]; "
                          "the report shows the others")
            sys.exit(1)
    except ReportError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`make demo`: the whole pipeline on the local stack, driven the way a user drives it."""

from __future__ import annotations

import datetime as dt
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from localcloud.config import REPO_ROOT, StackConfig
from localcloud.processes import StackError
from localcloud.resources import SQL_DIR, render_sql
from localcloud.stack import Stack, cli_env

DEMO_DATASET = REPO_ROOT / "build" / "demo-dataset"


def pick_demo_images(dataset_dir: Path, count: int, seed: int = 0) -> list[Path]:
    images = sorted(p for p in dataset_dir.glob("*/*") if p.is_file())
    if not images:
        raise StackError(f"no demo images under {dataset_dir}: run `make model` first")
    return random.Random(seed).sample(images, min(count, len(images)))


def upload_with_gcloud(config: StackConfig, files: list[Path], destination: str, run_id: str) -> None:
    """`gcloud storage cp` as a user types it, pointed at the local stack by its config dir."""
    command = ["gcloud", "storage", "cp", f"--custom-metadata=run_id={run_id}", *map(str, files), destination]
    completed = subprocess.run(command, env={**os.environ, **cli_env(config)}, capture_output=True, text=True)
    if completed.returncode != 0:
        raise StackError(f"gcloud storage cp failed ({completed.returncode}):\n{completed.stderr[-2000:]}")


def bigquery_rows(config: StackConfig, sql: str, params: dict[str, str]) -> list[dict]:
    from google.cloud import bigquery

    from worker.clients import bigquery_client

    client = bigquery_client(config.project, config.client_env())
    job_config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter(k, "STRING", v) for k, v in params.items()])
    job = client.query(render_sql(sql, config), job_config=job_config, job_retry=None)
    return [dict(row.items()) for row in job.result(timeout=60)]


COUNT_SQL = """
SELECT
  (SELECT COUNT(*) FROM `${project}.${dataset}.results_dedup` WHERE run_id = @run_id) AS results,
  (SELECT COUNT(*) FROM `${project}.${dataset}.errors_dedup` WHERE run_id = @run_id) AS errors
"""


# Raw counts are cheap; the de-duplicated views scan and rank every row (on the local emulator
# ~0.9 s of CPU at 40k rows), so they are asked only to confirm.
RAW_COUNT_SQL = """
SELECT
  (SELECT COUNT(*) FROM `${project}.${dataset}.results` WHERE run_id = @run_id) AS results,
  (SELECT COUNT(*) FROM `${project}.${dataset}.errors` WHERE run_id = @run_id) AS errors
"""


def wait_for_rows(config: StackConfig, run_id: str, expected: int, timeout_s: float, console: Console,
                  poll_s: float = 0.5) -> dict:
    """Distinct uploads of the run with a row ({"results": n, "errors": m}), once all are there or at the timeout."""
    deadline = time.monotonic() + timeout_s
    counts = {"results": 0, "errors": 0}
    with Progress(TextColumn("rows in BigQuery"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("rows", total=expected)
        while time.monotonic() < deadline:
            raw = bigquery_rows(config, RAW_COUNT_SQL, {"run_id": run_id})[0]
            progress.update(task, completed=min(expected, raw["results"] + raw["errors"]))
            if raw["results"] + raw["errors"] >= expected:
                counts = bigquery_rows(config, COUNT_SQL, {"run_id": run_id})[0]
                if counts["results"] + counts["errors"] >= expected:
                    return counts
            time.sleep(poll_s)
    return bigquery_rows(config, COUNT_SQL, {"run_id": run_id})[0]


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    if not rows:
        return table
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "label" else "right")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    return table


def run_demo(config: StackConfig, images: int, timeout_s: float, console: Console) -> int:
    stack = Stack(config)
    run_id = f"demo-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    try:
        files = pick_demo_images(DEMO_DATASET, images)
        started = time.monotonic()
        with console.status("starting the local stack") as status:
            stack.up(on_step=lambda step: status.update(f"starting {step}"))
        console.print(f"stack up in {time.monotonic() - started:.1f} s; run id {run_id}")
        destination = f"gs://{config.bucket}/{config.prefix}{run_id}/"
        with console.status(f"gcloud storage cp {len(files)} images to {destination}"):
            upload_started = time.monotonic()
            upload_with_gcloud(config, files, destination, run_id)
        console.print(f"uploaded {len(files)} images in {time.monotonic() - upload_started:.1f} s")
        counts = wait_for_rows(config, run_id, len(files), timeout_s, console)
        elapsed = time.monotonic() - upload_started
        done = counts["results"] + counts["errors"]
        if done != len(files):
            console.print(f"[red]error:[/red] {done} of {len(files)} uploads have a row after {timeout_s:.0f} s "
                          f"({counts['results']} results, {counts['errors']} errors). "
                          f"Look at the logs in {config.run_dir / 'logs'} (worker.log, function.log, eventarc.log).")
            return 1
        rows = bigquery_rows(config, (SQL_DIR / "queries" / "run_summary.sql").read_text(), {"run_id": run_id})
        console.print(summary_table(rows, f"Run {run_id}: results per label (times in ms)"))
        console.print(f"{len(files)} uploaded, {counts['results']} result rows, {counts['errors']} error rows; "
                      f"upload start -> last row {elapsed:.1f} s ({len(files) / elapsed:.0f} images/s)")
        return 0
    except StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        with console.status("stopping the local stack"):
            stack.down()

"""Where the report reads from: the local stack's BigQuery emulator, or a BigQuery dataset."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from report.queries import ReportError, Warehouse


@contextlib.contextmanager
def local_warehouse(run_dir: Path, on_start: Callable[[str], None] = lambda message: None) -> Iterator[Warehouse]:
    """The local stack's dataset. When the stack is down (`make demo` and `make bench` stop it), its
    BigQuery emulator is started alone on the data they left in the run directory, and stopped after."""
    from localcloud import services
    from localcloud.config import StackConfig
    from localcloud.processes import ProcessManager, StackError
    from worker.clients import bigquery_client

    config = StackConfig.load(run_dir)
    if config is None:
        raise ReportError(f"no local stack in {run_dir} (no stack.json): run `make up` and upload images, or "
                          "`make demo` / `make bench` first; or pass --project and --dataset to read BigQuery")
    processes = ProcessManager(config.run_dir)
    started = False
    if processes.process("bigquery") is None:
        data_dir = config.run_dir / "bigquery"
        if not data_dir.is_dir() or not any(data_dir.iterdir()):
            raise ReportError(f"the local stack is not up and {data_dir} holds no BigQuery data: run `make up` "
                              "and upload images, or `make demo` / `make bench` first")
        on_start(f"the local stack is down: starting its BigQuery emulator on {data_dir} for the report")
        try:
            processes.start(services.bigquery(config))
        except StackError as exc:
            raise ReportError(f"could not start the BigQuery emulator: {exc}") from exc
        started = True
    try:
        # Data left by an older version lacks newer columns (cpu_flags, migration 003) and views: the
        # same idempotent migration `make up` applies, so every query runs on old runs too.
        from localcloud.resources import create_bigquery

        create_bigquery(config)
        yield Warehouse(bigquery_client(config.project, config.client_env()), config.project, config.dataset,
                        f"local BigQuery emulator at {config.bigquery_url}: {config.project}.{config.dataset}")
    finally:
        if started:
            processes.stop("bigquery")


@contextlib.contextmanager
def bigquery_warehouse(project: str, dataset: str, env) -> Iterator[Warehouse]:
    """A BigQuery dataset (the emulator instead when env has BIGQUERY_EMULATOR_HOST)."""
    yield Warehouse.connect(project, dataset, env)

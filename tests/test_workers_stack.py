"""Many workers on one subscription, on the real local stack: the instance group's and KEDA's
picture, where VMs or pods come and go while the backlog drains. Every upload still ends as
exactly one row."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from localcloud.bench import worker_shares
from localcloud.demo import bigquery_rows
from localcloud.resources import SQL_DIR, render_sql
from tests.helpers import IsolatedWorker, new_run_id, png_bytes, upload_many, wait_for_keys
from tests.test_faults_stack import report

pytestmark = [pytest.mark.stack, pytest.mark.slow]

IMAGES = 1200
SHUTDOWN_TIMEOUT_S = 15


class WorkerGroup:
    """Worker processes that share one IsolatedWorker's subscription and tables (the group's own,
    so the session's main worker is not disturbed), with the *_dedup views over those tables."""

    def __init__(self, stack, name: str, **env: str):
        self.stack = stack
        self.first = IsolatedWorker(stack, name, **env)
        self.names: list[str] = []
        self.results_view, self.errors_view = self._create_dedup_views()

    def _create_dedup_views(self) -> tuple[str, str]:
        """The project's own view SQL (sql/views/), pointed at the group's tables."""
        from google.cloud import bigquery

        from worker.clients import bigquery_client

        config = self.stack.config
        client = bigquery_client(config.project, config.client_env())
        views = []
        for table, view_file in ((self.first.results_table, "results_dedup.sql"),
                                 (self.first.errors_table, "errors_dedup.sql")):
            source = view_file.split("_")[0]
            sql = render_sql((SQL_DIR / "views" / view_file).read_text(), config)
            sql = sql.replace(f"{config.dataset}.{source}`", f"{config.dataset}.{table}`")
            assert table in sql, f"sql/views/{view_file} no longer reads `${{dataset}}.{source}`"
            view = bigquery.Table(config.table_id(f"{table}_dedup"))
            view.view_query = sql
            client.create_table(view)
            views.append(f"{table}_dedup")
        return views[0], views[1]

    def start(self, name: str) -> None:
        """One more worker process (named worker-..., so `Stack.down` stops it too)."""
        config, first = self.stack.config, self.first
        self.stack.start_worker(name, WORKER_SUBSCRIPTION=first.subscription,
                                WORKER_RESULTS_TABLE=config.table_id(first.results_table),
                                WORKER_ERRORS_TABLE=config.table_id(first.errors_table), **first.env)
        self.names.append(name)

    def process(self, name: str):
        return self.stack.processes.process(name)

    def pids(self) -> dict[str, int]:
        """Pid of every running worker of the group (a row records its worker's pid)."""
        records = {name: self.stack.processes.record(name) for name in self.names}
        return {name: record["pid"] for name, record in records.items() if record}

    def dedup_counts(self, run_id: str) -> dict:
        sql = f"""
        SELECT
          (SELECT COUNT(*) FROM `${{project}}.${{dataset}}.{self.results_view}` WHERE run_id = @run_id) AS results,
          (SELECT COUNT(*) FROM `${{project}}.${{dataset}}.{self.errors_view}` WHERE run_id = @run_id) AS errors
        """
        return bigquery_rows(self.stack.config, sql, {"run_id": run_id})[0]

    def shares(self, run_id: str, pids: dict[str, int]) -> dict[str, int]:
        sql = f"""SELECT worker_host, worker_pid, COUNT(*) AS rows FROM `${{project}}.${{dataset}}.{self.results_view}`
                  WHERE run_id = @run_id GROUP BY worker_host, worker_pid"""
        return worker_shares(pids, bigquery_rows(self.stack.config, sql, {"run_id": run_id}))

    def close(self) -> None:
        for name in self.names:
            self.stack.stop_worker(name)
        self.first.close()


@pytest.mark.timeout(600)
def test_three_workers_one_killed_one_stopped_one_added_every_upload_is_one_row(stack):
    group = WorkerGroup(stack, "many", WORKER_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S))
    run_id = new_run_id()
    items = [(f"{stack.config.prefix}{run_id}/{i}.png", png_bytes(7000 + i, size=64)) for i in range(IMAGES)]
    first_half, second_half = items[:IMAGES // 2], items[IMAGES // 2:]
    tables = {"results_table": group.first.results_table, "errors_table": group.first.errors_table}
    try:
        for name in ("worker-many-a", "worker-many-b", "worker-many-c"):
            group.start(name)
        pids = group.pids()  # before the stops: the rows of every worker, gone or not, get its name
        uploader = threading.Thread(target=upload_many, args=(stack, first_half, run_id))
        uploader.start()
        before_faults = wait_for_keys(stack, run_id, 100, timeout_s=120, **tables)

        killed = group.process("worker-many-a")
        os.killpg(killed.pid, signal.SIGKILL)  # a VM lost, or a pod OOM-killed: nothing acked after this
        killed.wait(10)
        stack.processes.pid_file("worker-many-a").unlink(missing_ok=True)

        stopped = group.process("worker-many-b")
        stopped.send_signal(signal.SIGTERM)  # scale-in, or a pod evicted: drain within the grace period
        exit_code = stopped.wait(SHUTDOWN_TIMEOUT_S + 10)
        stack.processes.pid_file("worker-many-b").unlink(missing_ok=True)

        group.start("worker-many-d")  # scale-out: a new worker joins mid-drain
        pids.update(group.pids())
        uploader.join()
        upload_many(stack, second_half, run_id)  # the rest of the load arrives with d ready
        raw = group.first.wait(run_id, IMAGES, timeout_s=300)  # distinct keys and raw row counts
        dedup = group.dedup_counts(run_id)
        shares = group.shares(run_id, pids)
        duplicated = raw["result_rows"] + raw["error_rows"] - raw["results"] - raw["errors"]
        report(f"3 workers; after {before_faults['results']} rows one SIGKILLed, one SIGTERMed (exit {exit_code}), "
               f"one added; rows per worker {shares}", IMAGES, raw)

        assert before_faults["results"] + before_faults["errors"] < IMAGES, "the faults did not land mid-load"
        assert exit_code == 0, "SIGTERM must drain and exit 0 (see worker/subscriber.py PullWorker.stop)"
        assert dedup["results"] + dedup["errors"] == IMAGES, f"dedup views: {dedup}"
        assert raw["results"] + raw["errors"] == IMAGES and raw["in_both"] == 0, f"raw tables: {raw}"
        assert duplicated == 0, f"{duplicated} extra raw rows: {raw}"
        assert raw["errors"] == 0
        assert shares.get("worker-many-d", 0) > 0, f"the added worker wrote no row: {shares}"
        assert sum(shares.values()) == IMAGES
        assert set(shares) <= {"worker-many-a", "worker-many-b", "worker-many-c", "worker-many-d"}, shares
        assert group.process("worker-many-c") is not None and group.process("worker-many-d") is not None
    finally:
        group.close()

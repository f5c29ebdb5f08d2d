"""`python -m worker reconcile`: the pure parts with fakes at the edges, and on the real local stack
the CLI as a subprocess (uploads without a row are found, republished once, and rowed once)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import Future

import pytest
from click.testing import CliRunner
from google.api_core import exceptions

from localcloud.config import REPO_ROOT
from localcloud.demo import bigquery_rows
from tests.helpers import key_counts, load_json, new_run_id, png_bytes, upload, wait_for_keys
from worker import job_contract, reconcile
from worker.jobs import parse_job
from worker.logs import JsonFormatter
from worker.settings import SettingsError

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)
GOLDEN = load_json("gcs_notification_finalize.json")


def function_main():
    """functions/main.py as functions-framework loads it (its directory on sys.path)."""
    if str(REPO_ROOT / "functions") not in sys.path:
        sys.path.append(str(REPO_ROOT / "functions"))
    name = "function_main_for_reconcile_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "functions" / "main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while being defined
        spec.loader.exec_module(module)
    return sys.modules[name]


def blob(resource: dict):
    """A google.cloud.storage Blob holding an object resource, as the client makes listed items."""
    from google.cloud.storage import Blob, Bucket

    made = Blob(resource["name"], bucket=Bucket(client=None, name=resource["bucket"]))
    made._set_properties(resource)
    return made


def resource(name: str, created: dt.datetime, generation: int = 1, bucket: str = "uploads") -> dict:
    return {"bucket": bucket, "name": name, "generation": str(generation), "size": "10", "contentType": "image/png",
            "timeCreated": reconcile.rfc3339(created), "metadata": {"run_id": "r"}}


class FakeStorage:
    def __init__(self, resources: list[dict], error: Exception | None = None):
        self.resources, self.error, self.calls = resources, error, []

    def list_blobs(self, bucket, **kwargs):
        self.calls.append((bucket, kwargs))
        if self.error:
            raise self.error
        return iter([blob(r) for r in self.resources])


class FakeBigQuery:
    def __init__(self, pages: list[list[str]], error: Exception | None = None):
        self.pages, self.error, self.queries = pages, error, []

    def query(self, sql, job_config=None, **kwargs):
        self.queries.append((sql, job_config, kwargs))
        if self.error:
            raise self.error
        pages = self.pages

        class Job:
            def result(self, **kwargs):
                class Rows:
                    @property
                    def pages(self):
                        return iter([[(key,) for key in page] for page in pages])
                return Rows()
        return Job()


class FakePublisher:
    def __init__(self, fail_on: str | None = None):
        self.messages, self.fail_on = [], fail_on

    def publish(self, topic, data, **attributes):
        self.messages.append((topic, json.loads(data), attributes))
        future = Future()
        if self.fail_on and self.fail_on in json.loads(data)["name"]:
            future.set_exception(exceptions.NotFound("Topic not found"))
        else:
            future.set_result(str(len(self.messages)))
        return future


# --- Window parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("24h", 86400), ("1h30m", 5400), ("2d", 172800),
                                           ("45s", 45), ("300", 300), ("0", 0), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert reconcile.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["3x", "h", "", "24 h", "1h-5m", "m30"])
def test_bad_durations_say_what_a_duration_looks_like(text):
    with pytest.raises(ValueError, match="duration like"):
        reconcile.parse_duration(text)


def test_times_are_iso_or_a_duration_before_now():
    assert reconcile.parse_time("24h", NOW) == NOW - dt.timedelta(hours=24)
    assert reconcile.parse_time("2026-11-22T10:00:00Z", NOW) == dt.datetime(2026, 11, 22, 10, tzinfo=dt.timezone.utc)
    assert reconcile.parse_time("2026-11-22T10:00:00", NOW).tzinfo == dt.timezone.utc  # no zone: UTC
    assert reconcile.parse_time("2026-11-22T11:00:00+01:00", NOW) == dt.datetime(2026, 11, 22, 10,
                                                                                 tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="neither an ISO 8601 time"):
        reconcile.parse_time("yesterday", NOW)


def options(**changes) -> dict:
    values = dict(bucket="uploads", prefix="incoming/", since="24h", until=None, min_age="5m",
                  results_table="p.inference.results", errors_table="p.inference.errors", jobs_topic=None,
                  republish=False, project=None)
    values.update(changes)
    return values


def test_settings_from_options():
    settings = reconcile.ReconcileSettings.from_options(**options(jobs_topic="jobs", republish=True), now=NOW)
    assert (settings.since, settings.until) == (NOW - dt.timedelta(hours=24), NOW)
    assert settings.min_age_s == 300
    assert settings.project == "p" and settings.jobs_topic == "projects/p/topics/jobs"
    dry = reconcile.ReconcileSettings.from_options(**options(project="q", jobs_topic="projects/x/topics/t"), now=NOW)
    assert dry.jobs_topic == "projects/x/topics/t" and dry.project == "q" and not dry.republish


@pytest.mark.parametrize("changes, named", [
    ({"bucket": None}, "--bucket (RECONCILE_BUCKET)"),
    ({"results_table": None}, "--results-table (WORKER_RESULTS_TABLE)"),
    ({"errors_table": "inference.errors"}, "--errors-table (WORKER_ERRORS_TABLE)='inference.errors'"),
    ({"results_table": "p.d.t` WHERE TRUE --"}, "--results-table"),
    ({"since": "soon"}, "--since"),
    ({"since": "1h", "until": "2h"}, "is not before --until"),
    ({"min_age": "a while"}, "--min-age"),
    ({"republish": True}, "--republish needs --jobs-topic (JOBS_TOPIC)"),
    ({"jobs_topic": "projects/p/subscriptions/s"}, "--jobs-topic (JOBS_TOPIC)"),
])
def test_bad_settings_name_the_option_and_its_variable(changes, named):
    with pytest.raises(SettingsError) as raised:
        reconcile.ReconcileSettings.from_options(**options(**changes), now=NOW)
    assert named in str(raised.value)


def test_cli_exits_2_on_bad_settings_with_the_message(monkeypatch):
    from worker.__main__ import cli

    for name in ("RECONCILE_BUCKET", "JOBS_TOPIC", "WORKER_RESULTS_TABLE", "WORKER_ERRORS_TABLE",
                 "RECONCILE_REPUBLISH"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["reconcile", "--results-table", "p.d.r", "--errors-table", "p.d.e"])
    assert result.exit_code == 2 and "--bucket (RECONCILE_BUCKET)" in result.output
    result = CliRunner().invoke(cli, ["reconcile", "--bucket", "b", "--results-table", "p.d.r",
                                      "--errors-table", "p.d.e"], env={"RECONCILE_REPUBLISH": "true"})
    assert result.exit_code == 2 and "--republish needs --jobs-topic" in result.output


# --- Comparison and the job ---------------------------------------------------------------------

def test_missing_yields_the_objects_without_a_row_in_order():
    objects = [resource(f"incoming/{i}.png", NOW, generation=i + 1) for i in range(5)]
    # The last key is another generation of incoming/4.png: a re-upload is a new upload.
    keys = {"uploads/incoming/1.png#2", "uploads/incoming/3.png#4", "uploads/incoming/4.png#1"}
    assert [o["name"] for o in reconcile.missing(objects, keys)] == ["incoming/0.png", "incoming/2.png",
                                                                     "incoming/4.png"]
    assert list(reconcile.missing([], keys)) == []


def test_the_republished_job_is_the_functions_job_for_the_same_object():
    main = function_main()
    from cloudevents.http import CloudEvent

    event = CloudEvent({"id": "42", "source": "//storage.googleapis.com/projects/_/buckets/uploads",
                        "type": main.FINALIZED_EVENT_TYPE, "time": "2026-11-22T22:27:04Z"}, GOLDEN["data"])
    by_function = main.build_job(event, NOW)
    # The reconcile path: the listed Blob -> its resource -> storage_job, as republish builds it.
    listed = reconcile.blob_resource(blob(GOLDEN["data"]))
    by_reconcile = reconcile.job_for(listed, NOW + dt.timedelta(hours=3))

    event_fields = {"event_id", "event_time", "function_received_at"}
    assert set(by_reconcile) == set(by_function) | {"republished_by"}
    assert {k: v for k, v in by_reconcile.items() if k not in event_fields | {"republished_by"}} == \
        {k: v for k, v in by_function.items() if k not in event_fields}
    assert by_reconcile["event_id"].startswith("reconcile-") and by_reconcile["republished_by"] == "reconcile"
    assert by_reconcile["event_time"] == GOLDEN["data"]["timeCreated"]
    assert by_reconcile["event_type"] == by_function["event_type"] == job_contract.FINALIZED_EVENT_TYPE
    # Same Pub/Sub attributes but the event id; and the worker reads both as the same job.
    assert {**job_contract.job_attributes(by_reconcile), "event_id": "x"} == \
        {**job_contract.job_attributes(by_function), "event_id": "x"}
    parsed_function, parsed_reconcile = (parse_job(json.dumps(j).encode()) for j in (by_function, by_reconcile))
    assert parsed_reconcile == parsed_function.__class__(**{**parsed_function.__dict__,
                                                           "function_received_at": NOW + dt.timedelta(hours=3)})


def test_the_worker_loads_the_functions_contract_file():
    assert job_contract.SOURCE == REPO_ROOT / "functions" / "storage_job.py"
    assert job_contract.JOB_SCHEMA_VERSION == function_main().job_from_object.__globals__["JOB_SCHEMA_VERSION"]


# --- The edges, with fakes ----------------------------------------------------------------------

def test_list_uploads_pages_and_keeps_the_window_and_the_minimum_age():
    since, until = NOW - dt.timedelta(hours=24), NOW
    storage = FakeStorage([
        resource("incoming/too-old.png", since - dt.timedelta(seconds=1)),
        resource("incoming/first.png", since),
        resource("incoming/middle.png", NOW - dt.timedelta(hours=2)),
        resource("incoming/too-young.png", NOW - dt.timedelta(seconds=299)),
        resource("incoming/at-min-age.png", NOW - dt.timedelta(seconds=300)),
    ])
    tally = reconcile.Tally()
    listed = list(reconcile.list_uploads(storage, "uploads", "incoming/", since, until, 300, NOW, tally))
    assert [r["name"] for r in listed] == ["incoming/first.png", "incoming/middle.png"]
    assert (tally.scanned, tally.listed) == (5, 2)
    assert listed[0] == resource("incoming/first.png", since)  # the resource form the function receives
    bucket, kwargs = storage.calls[0]
    assert bucket == "uploads" and kwargs["prefix"] == "incoming/" and kwargs["page_size"] == 1000
    assert kwargs["fields"].startswith("items(") and "nextPageToken" in kwargs["fields"]
    earlier = list(reconcile.list_uploads(storage, "uploads", "", since, NOW - dt.timedelta(hours=1), 0, NOW))
    assert [r["name"] for r in earlier] == ["incoming/first.png", "incoming/middle.png"]
    assert storage.calls[1][1]["prefix"] is None


@pytest.mark.parametrize("error, says", [(exceptions.NotFound("no bucket"), "gs://uploads does not exist"),
                                         (exceptions.Forbidden("denied"), "roles/storage.objectViewer")])
def test_list_errors_name_the_bucket_and_what_to_do(error, says):
    with pytest.raises(reconcile.ReconcileError, match=says):
        list(reconcile.list_uploads(FakeStorage([], error), "uploads", "incoming/", NOW, NOW, 0, NOW))


def test_rowed_keys_is_one_parameterized_query_bounded_by_the_partition_columns():
    bq = FakeBigQuery([["uploads/incoming/a.png#1", "uploads/incoming/b.png#2"], ["uploads/incoming/c.png#3"]])
    keys = reconcile.rowed_keys(bq, "p.inference.results", "p.inference.errors", "uploads", "incoming/",
                                NOW - dt.timedelta(hours=24))
    assert keys == {"uploads/incoming/a.png#1", "uploads/incoming/b.png#2", "uploads/incoming/c.png#3"}
    [(sql, config, _)] = bq.queries
    assert "processed_at >= @rows_since" in sql and "failed_at >= @rows_since" in sql
    assert "`p.inference.results`" in sql and "`p.inference.errors`" in sql
    assert "uploads" not in sql.replace("p.inference", "")  # values only as parameters
    params = {p.name: (p.type_, p.value) for p in config.query_parameters}
    assert params == {"rows_since": ("TIMESTAMP", NOW - dt.timedelta(hours=25)),
                      "key_prefix": ("STRING", "uploads/incoming/")}
    with pytest.raises(ValueError):
        reconcile.rowed_keys(bq, "p.d.t`; DROP TABLE x; --", "p.d.e", "uploads", "", NOW)


@pytest.mark.parametrize("error, says", [(exceptions.NotFound("no table"), "WORKER_RESULTS_TABLE"),
                                         (exceptions.Forbidden("denied"), "roles/bigquery.jobUser")])
def test_query_errors_name_the_tables_and_what_to_do(error, says):
    with pytest.raises(reconcile.ReconcileError, match=says) as raised:
        reconcile.rowed_keys(FakeBigQuery([], error), "p.d.results", "p.d.errors", "uploads", "", NOW)
    assert "p.d.results" in str(raised.value)


def test_republish_sends_data_and_attributes_as_the_function_does_and_waits_for_all():
    publisher = FakePublisher()
    objects = [resource(f"incoming/{i}.png", NOW, generation=i + 1) for i in range(5)]
    tally = reconcile.Tally()
    count = reconcile.republish(publisher, "projects/p/topics/jobs", objects, now=lambda: NOW, max_in_flight=2,
                                tally=tally)
    assert count == tally.republished == 5
    topics = {topic for topic, _, _ in publisher.messages}
    assert topics == {"projects/p/topics/jobs"}
    for (_, job, attributes), sent in zip(publisher.messages, objects):
        assert job == reconcile.job_for(sent, NOW) | {"event_id": job["event_id"]}
        assert attributes == job_contract.job_attributes(job)


def test_a_publish_failure_names_the_object_and_the_topic():
    publisher = FakePublisher(fail_on="2.png")
    objects = [resource(f"incoming/{i}.png", NOW, generation=i + 1) for i in range(4)]
    with pytest.raises(reconcile.ReconcileError, match=r"gs://uploads/incoming/2\.png to projects/p/topics/jobs "
                                                       r"failed: the topic does not exist"):
        reconcile.republish(publisher, "projects/p/topics/jobs", objects)


# --- One run, and the log line the alert matches ------------------------------------------------

def test_a_run_reports_the_missing_and_logs_one_line_for_the_alert(monkeypatch, capsys, caplog):
    an_hour_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    objects = [resource(f"incoming/{i}.png", an_hour_ago, generation=i + 1) for i in range(4)]
    storage, bq, publisher = FakeStorage(objects), FakeBigQuery([["uploads/incoming/0.png#1"]]), FakePublisher()
    from worker import clients

    monkeypatch.setattr(clients, "storage_client", lambda project: storage)
    monkeypatch.setattr(clients, "bigquery_client", lambda project: bq)
    monkeypatch.setattr(clients, "publisher_client", lambda: publisher)
    publisher.stop = lambda: None
    settings = reconcile.ReconcileSettings.from_options(
        **options(jobs_topic="projects/p/topics/jobs", republish=True, since="1d", min_age="0"),
        now=dt.datetime.now(dt.timezone.utc))
    with caplog.at_level(logging.INFO, logger="worker.reconcile"):
        assert reconcile.main(settings, json_output=False, progress=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines[:-1]] == [f"uploads/incoming/{i}.png#{i + 1}" for i in (1, 2, 3)]
    assert lines[0].split("\t")[1:] == [objects[1]["timeCreated"], "10"]
    assert lines[-1].startswith("reconcile: 3 of 4 uploads in gs://uploads/incoming/") and "3 jobs republished" in \
        lines[-1]
    assert len(publisher.messages) == 3
    [record] = [r for r in caplog.records if r.name == "worker.reconcile"]
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "WARNING" and entry["message"] == "reconcile: 3 uploads without a row"
    assert (entry["reconcile_missing"], entry["reconcile_listed"], entry["reconcile_republished"]) == (3, 4, 3)
    assert entry["reconcile_dry_run"] is False and entry["reconcile_bucket"] == "uploads"


def test_a_clean_dry_run_logs_info_with_zero_and_json_output(monkeypatch, capsys, caplog):
    objects = [resource("incoming/0.png", dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))]
    from worker import clients

    monkeypatch.setattr(clients, "storage_client", lambda project: FakeStorage(objects))
    monkeypatch.setattr(clients, "bigquery_client", lambda project: FakeBigQuery([["uploads/incoming/0.png#1"]]))
    settings = reconcile.ReconcileSettings.from_options(**options(since="1d", min_age="0"),
                                                        now=dt.datetime.now(dt.timezone.utc))
    with caplog.at_level(logging.INFO, logger="worker.reconcile"):
        assert reconcile.main(settings, json_output=True, progress=False) == 0
    [summary] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["record"] == "summary" and (summary["missing"], summary["listed"]) == (0, 1)
    [record] = [r for r in caplog.records if r.name == "worker.reconcile"]
    assert record.levelname == "INFO" and record.reconcile_missing == 0 and record.reconcile_dry_run is True


def test_a_failing_resource_exits_1_with_the_reason(monkeypatch, capsys):
    from worker import clients

    monkeypatch.setattr(clients, "storage_client", lambda project: FakeStorage([], exceptions.NotFound("gone")))
    monkeypatch.setattr(clients, "bigquery_client", lambda project: FakeBigQuery([]))
    settings = reconcile.ReconcileSettings.from_options(**options(), now=NOW)
    assert reconcile.main(settings, json_output=False, progress=False) == 1
    assert "gs://uploads does not exist" in capsys.readouterr().err


def test_missing_credentials_exit_2_saying_what_to_do(monkeypatch, capsys):
    from google.auth.exceptions import DefaultCredentialsError

    from worker import clients

    def no_credentials(project):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(clients, "storage_client", no_credentials)
    settings = reconcile.ReconcileSettings.from_options(**options(), now=NOW)
    assert reconcile.main(settings, json_output=False, progress=False) == 2
    assert "gcloud auth application-default login" in capsys.readouterr().err


# --- On the local stack -------------------------------------------------------------------------

def run_cli(stack, *args: str) -> tuple[list[dict], dict, dict]:
    """`python -m worker reconcile --json ARGS` against the stack -> (missing records, summary, log line)."""
    config = stack.config
    env = {**os.environ, **config.client_env(),
           "RECONCILE_BUCKET": config.bucket, "RECONCILE_PREFIX": "", "RECONCILE_REPUBLISH": "false",
           "WORKER_RESULTS_TABLE": config.table_id(config.results_table),
           "WORKER_ERRORS_TABLE": config.table_id(config.errors_table),
           "JOBS_TOPIC": config.jobs_topic}
    result = subprocess.run([sys.executable, "-m", "worker", "reconcile", "--json", "--min-age", "0", *args],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[-1]["record"] == "summary"
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [log_line] = [entry for entry in logged if "reconcile_missing" in entry]
    return records[:-1], records[-1], log_line


@pytest.mark.stack
def test_reconcile_finds_uploads_without_a_row_and_republishes_them_once(stack):
    config = stack.config
    run_id = new_run_id()
    # Only this test's uploads are in the window: the rest of the session's bucket is older.
    since = reconcile.rfc3339(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
    # One normal upload (under the notified prefix: it gets its row) and three outside the prefix,
    # which fake-gcs-server does not notify: uploads whose event was lost.
    rowed = f"{config.prefix}{run_id}/normal.png"
    generation = upload(stack, rowed, png_bytes(1), run_id)
    assert wait_for_keys(stack, run_id, 1, timeout_s=60)["results"] == 1
    lost = {f"lost-{run_id}/{i}.png": upload(stack, f"lost-{run_id}/{i}.png", png_bytes(10 + i), run_id)
            for i in range(3)}
    lost_keys = {f"{config.bucket}/{name}#{gen}" for name, gen in lost.items()}

    found, summary, log_line = run_cli(stack, "--since", since)
    assert {r["event_key"] for r in found} == lost_keys
    assert f"{config.bucket}/{rowed}#{generation}" not in {r["event_key"] for r in found}
    assert (summary["listed"], summary["missing"], summary["republished"]) == (4, 3, 0)
    assert log_line["severity"] == "WARNING" and log_line["reconcile_missing"] == 3
    assert key_counts(stack, run_id)["results"] == 1  # a dry run publishes nothing

    found, summary, log_line = run_cli(stack, "--since", since, "--republish")
    assert {r["event_key"] for r in found} == lost_keys and summary["republished"] == 3
    counts = wait_for_keys(stack, run_id, 4, timeout_s=60)
    assert counts["results"] + counts["errors"] == 4
    assert counts["result_rows"] + counts["error_rows"] == 4 and counts["in_both"] == 0
    rows = bigquery_rows(config, "SELECT event_key FROM `${project}.${dataset}.results` WHERE run_id = @run_id",
                         {"run_id": run_id})
    assert {row["event_key"] for row in rows} == lost_keys | {f"{config.bucket}/{rowed}#{generation}"}

    # Again: nothing is missing, nothing is published.
    found, summary, log_line = run_cli(stack, "--since", since, "--republish")
    assert found == [] and (summary["missing"], summary["republished"]) == (0, 0)
    assert log_line["severity"] == "INFO" and log_line["reconcile_missing"] == 0

    # A repeat of jobs whose rows exist (a row that landed between query and listing) adds no row.
    from worker.clients import publisher_client, storage_client

    listed = reconcile.list_uploads(storage_client(config.project, config.client_env()), config.bucket,
                                    f"lost-{run_id}/", dt.datetime.fromisoformat(since.replace("Z", "+00:00")),
                                    dt.datetime.now(dt.timezone.utc), 0, dt.datetime.now(dt.timezone.utc))
    publisher = publisher_client(config.client_env())
    assert reconcile.republish(publisher, config.topic_path(config.jobs_topic), listed) == 3
    # A fresh upload behind the repeats: once its row is in, the worker has taken the repeats too.
    upload(stack, f"{config.prefix}{run_id}/sentinel.png", png_bytes(2), run_id)
    counts = wait_for_keys(stack, run_id, 5, timeout_s=60)
    time.sleep(1.0)
    counts = key_counts(stack, run_id)
    assert counts["results"] + counts["errors"] == 5
    assert counts["result_rows"] + counts["error_rows"] == 5, f"duplicate rows: {counts}"
    found, summary, _ = run_cli(stack, "--since", since)
    assert found == [] and (summary["listed"], summary["missing"]) == (5, 0)

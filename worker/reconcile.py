"""`python -m worker reconcile`: uploads that have no row, found and (with --republish) sent again.

An upload that never got its results or errors row was lost on its way: an Eventarc delivery the
function dropped as too old (MAX_EVENT_AGE_S), a notification that never came, a job that expired
on the topic. This command lists the objects under the upload prefix created in a time window,
compares their event keys (`bucket/object#generation`, the rows' insertId) with the keys that have
a row in either table, and reports the rest. `--republish` publishes the same job the Cloud
Function would have published (built by the same module, functions/storage_job.py). Repeating it
is harmless: the worker acks keys it wrote lately, BigQuery drops a repeated insertId (the event
key) for about a minute, and the *_dedup views fold any later copy.

Built to run over millions of objects with bounded work and memory:
- the listing is paged and streamed (one page of 1000 objects in memory at a time);
- one query over both tables, bounded by their partition columns (`processed_at`, `failed_at`) at
  the window's start minus a clock margin, and by the key prefix: no full-table scan;
- the rowed keys are held in a set: about 90 bytes plus the key's length per row in the window
  (measured: 165 bytes for a 73-character key, so a million uploads in the window take ~170 MB).
  For more, reconcile narrower windows (--since/--until) or narrower prefixes.

Pure core (window parsing, `missing`, job building) with the I/O at the edges (`list_uploads`,
`rowed_keys`, `republish`), so the same code runs on the local stack and in Google Cloud.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

from worker import job_contract
from worker.settings import SettingsError

_LOGGER = logging.getLogger("worker.reconcile")

LIST_PAGE_SIZE = 1000  # objects per list request (the API's maximum)
LIST_FIELDS = "items(name,bucket,generation,size,contentType,timeCreated,metadata),nextPageToken"
QUERY_PAGE_ROWS = 50_000  # rowed keys fetched per page of the query's results
# A row is written after its upload; the margin covers clock skew between Cloud Storage and the worker.
ROW_CLOCK_MARGIN = dt.timedelta(hours=1)
QUERY_TIMEOUT_S = 600.0
PUBLISH_MAX_IN_FLIGHT = 1000  # publish futures awaited in groups of this many
PUBLISH_TIMEOUT_S = 60.0
REPUBLISHED_BY = "reconcile"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TABLE_ID = re.compile(r"[A-Za-z0-9_:.-]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_$-]+")


class ReconcileError(RuntimeError):
    """A resource cannot be read or written; the message names it and what to do."""


# --- The window (pure) --------------------------------------------------------------------------

def parse_duration(text: str) -> dt.timedelta:
    """"90m", "24h", "1h30m", "2d", "45s" or a bare number of seconds -> timedelta. ValueError otherwise."""
    text = text.strip().lower()
    try:
        return dt.timedelta(seconds=float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{text!r} is not a duration like 90m, 24h, 1h30m, 2d or a number of seconds")
    return dt.timedelta(seconds=sum(float(number) * _UNIT_S[unit] for number, unit in parts))


def parse_time(text: str, now: dt.datetime) -> dt.datetime:
    """An ISO 8601 time (UTC if it names no zone), or a duration meaning that long before now."""
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            return now - parse_duration(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither an ISO 8601 time (2026-11-22T10:00:00Z) "
                             "nor a duration before now (24h, 90m)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ReconcileSettings:
    bucket: str
    prefix: str
    since: dt.datetime
    until: dt.datetime
    min_age_s: float
    results_table: str
    errors_table: str
    jobs_topic: str  # projects/P/topics/T, or "" in a dry run without a topic
    republish: bool
    project: str

    @classmethod
    def from_options(cls, *, bucket: str | None, prefix: str, since: str, until: str | None, min_age: str,
                     results_table: str | None, errors_table: str | None, jobs_topic: str | None,
                     republish: bool, project: str | None, now: dt.datetime) -> "ReconcileSettings":
        """Options (or their environment variables) -> settings. Raises SettingsError naming the setting."""
        if not bucket:
            raise SettingsError("missing --bucket (RECONCILE_BUCKET): the upload bucket to reconcile")
        try:
            since_at = parse_time(since, now)
        except ValueError as exc:
            raise SettingsError(f"--since {exc}") from None
        try:
            until_at = parse_time(until, now) if until else now
        except ValueError as exc:
            raise SettingsError(f"--until {exc}") from None
        if since_at >= until_at:
            raise SettingsError(f"--since {rfc3339(since_at)} is not before --until {rfc3339(until_at)}")
        try:
            min_age_s = parse_duration(min_age).total_seconds()
        except ValueError as exc:
            raise SettingsError(f"--min-age {exc}") from None
        if min_age_s < 0:
            raise SettingsError(f"--min-age {min_age!r} must be >= 0")
        tables = {}
        for option, env_name, value in (("--results-table", "WORKER_RESULTS_TABLE", results_table),
                                        ("--errors-table", "WORKER_ERRORS_TABLE", errors_table)):
            if not value:
                raise SettingsError(f"missing {option} ({env_name}): the table as project.dataset.table")
            if not _TABLE_ID.fullmatch(value):
                raise SettingsError(f"{option} ({env_name})={value!r} must be project.dataset.table")
            tables[option] = value
        project = project or tables["--results-table"].split(".")[0]
        topic = (jobs_topic or "").strip()
        if topic and not topic.startswith("projects/"):
            topic = f"projects/{project}/topics/{topic}"
        if topic and not re.fullmatch(r"projects/[^/]+/topics/[^/]+", topic):
            raise SettingsError(f"--jobs-topic (JOBS_TOPIC)={jobs_topic!r} must be projects/P/topics/T or a short name")
        if republish and not topic:
            raise SettingsError("--republish needs --jobs-topic (JOBS_TOPIC): the topic the function publishes to")
        return cls(bucket=bucket, prefix=prefix or "", since=since_at, until=until_at, min_age_s=min_age_s,
                   results_table=tables["--results-table"], errors_table=tables["--errors-table"],
                   jobs_topic=topic, republish=republish, project=project)


@dataclass
class Tally:
    """What one run saw; the progress display reads it while the run goes on."""

    scanned: int = 0  # objects listed under the prefix
    listed: int = 0  # of them created in the window and older than min_age_s: compared with the tables
    rowed_keys: int = 0  # keys with a row since the window's start (minus the clock margin)
    missing: int = 0
    republished: int = 0


# --- Pure comparison and job building -------------------------------------------------------

def object_key(resource: dict) -> str:
    return job_contract.event_key(resource["bucket"], resource["name"], str(resource["generation"]))


def missing(objects: Iterable[dict], keys: set[str] | frozenset[str]) -> Iterator[dict]:
    """The object resources whose event key has no row."""
    for resource in objects:
        if object_key(resource) not in keys:
            yield resource


def job_for(resource: dict, received_at: dt.datetime) -> dict:
    """The job the function would have published for this object (storage_job builds both).

    The event fields say what happened: a reconcile event id, the finalized event type, the
    object's creation time as the event time. `republished_by` is for tracing only: the worker's
    parse ignores keys it does not know.
    """
    job = job_contract.job_from_object(resource, event_id=f"reconcile-{uuid.uuid4()}",
                                       event_type=job_contract.FINALIZED_EVENT_TYPE,
                                       event_time=resource.get("timeCreated"), received_at=received_at)
    job["republished_by"] = REPUBLISHED_BY
    return job


def blob_resource(blob) -> dict:
    """A listed google.cloud.storage Blob -> the object resource fields a job needs (JSON API form)."""
    return {
        "bucket": blob.bucket.name,
        "name": blob.name,
        "generation": str(blob.generation),
        "size": None if blob.size is None else str(blob.size),
        "contentType": blob.content_type,
        "timeCreated": rfc3339(blob.time_created) if blob.time_created else None,
        "metadata": blob.metadata or {},
    }


# --- I/O at the edges ---------------------------------------------------------------------------

def list_uploads(storage_client, bucket: str, prefix: str, since: dt.datetime, until: dt.datetime,
                 min_age_s: float, now: dt.datetime, tally: Tally | None = None) -> Iterator[dict]:
    """Object resources under prefix created in [since, until) and at least min_age_s before now.

    Uploads younger than min_age_s may still have their event in flight, so they are not called
    missing yet. Cloud Storage lists have no time filter (only name prefixes, offsets and globs):
    every object under the prefix is listed, page by page, and filtered here on timeCreated. The
    bucket's lifecycle rule (upload_retention_days) bounds how many there are; a prefix with
    dates in its names (incoming/2026-11-22/) narrows the listing further.
    Only live objects are listed: an overwritten generation is not checked.
    """
    from google.api_core import exceptions

    tally = tally if tally is not None else Tally()
    newest = min(until, now - dt.timedelta(seconds=min_age_s))
    try:
        # An iterator over pages of LIST_PAGE_SIZE objects, each fetched when the previous one is used up.
        blobs = storage_client.list_blobs(bucket, prefix=prefix or None, page_size=LIST_PAGE_SIZE,
                                          fields=LIST_FIELDS)
        for blob in blobs:
            tally.scanned += 1
            created = blob.time_created
            if created is None or not since <= created < newest:
                continue
            tally.listed += 1
            yield blob_resource(blob)
    except exceptions.NotFound as exc:
        raise ReconcileError(f"bucket gs://{bucket} does not exist: check --bucket (RECONCILE_BUCKET) ({exc})")
    except exceptions.Forbidden as exc:
        raise ReconcileError(f"cannot list gs://{bucket}/{prefix}: grant roles/storage.objectViewer on the bucket "
                             f"to the identity running reconcile ({exc})")
    except exceptions.GoogleAPICallError as exc:
        raise ReconcileError(f"listing gs://{bucket}/{prefix} failed: {exc}; run reconcile again, it is safe")


ROWED_KEYS_SQL = """
SELECT event_key FROM `{results}`
WHERE processed_at >= @rows_since AND STARTS_WITH(event_key, @key_prefix)
UNION DISTINCT
SELECT event_key FROM `{errors}`
WHERE failed_at >= @rows_since AND STARTS_WITH(event_key, @key_prefix)
"""


def rowed_keys(bq_client, results_table: str, errors_table: str, bucket: str, prefix: str, since: dt.datetime,
               margin: dt.timedelta = ROW_CLOCK_MARGIN) -> set[str]:
    """Event keys of uploads under gs://bucket/prefix with a results or errors row since since - margin.

    One query over both tables. Its bounds: the partition columns (results by processed_at, errors
    by failed_at; a row is never written before its upload, so rows of uploads created at or
    after `since` are all in partitions from since - margin on) and the key prefix `bucket/prefix`
    (the event key starts with the bucket and object name, and unlike the errors table's bucket and
    object_name columns it is never NULL). Values go in as query parameters; only the table ids,
    checked as project.dataset.table, are part of the text. The result is read page by page.
    """
    from google.api_core import exceptions
    from google.cloud import bigquery
    from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY, DEFAULT_RETRY

    for table in (results_table, errors_table):
        if not _TABLE_ID.fullmatch(table):
            raise ValueError(f"{table!r} is not project.dataset.table")
    job_config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter("rows_since", "TIMESTAMP", since - margin),
                          bigquery.ScalarQueryParameter("key_prefix", "STRING", f"{bucket}/{prefix}")],
        labels={"purpose": "reconcile"},
    )
    sql = ROWED_KEYS_SQL.format(results=results_table, errors=errors_table)
    try:
        job = bq_client.query(sql, job_config=job_config, retry=DEFAULT_RETRY.with_timeout(120),
                              job_retry=DEFAULT_JOB_RETRY.with_timeout(QUERY_TIMEOUT_S))
        rows = job.result(page_size=QUERY_PAGE_ROWS, timeout=QUERY_TIMEOUT_S)
        keys = set()
        for page in rows.pages:
            keys.update(row[0] for row in page)
    except exceptions.NotFound as exc:
        raise ReconcileError(f"{results_table} or {errors_table} not found: check --results-table/--errors-table "
                             f"(WORKER_RESULTS_TABLE/WORKER_ERRORS_TABLE) ({exc})")
    except exceptions.Forbidden as exc:
        raise ReconcileError(f"cannot query {results_table} and {errors_table}: grant roles/bigquery.dataViewer on "
                             f"the dataset and roles/bigquery.jobUser on the project ({exc})")
    except exceptions.BadRequest as exc:
        raise ReconcileError(f"BigQuery rejected the query of {results_table} and {errors_table}: do both tables "
                             f"have the schemas in sql/? ({exc})")
    except exceptions.GoogleAPICallError as exc:
        raise ReconcileError(f"the query of {results_table} and {errors_table} failed: {exc}; "
                             "run reconcile again, it is safe")
    return keys


def republish(publisher, topic: str, objects: Iterable[dict], now: Callable[[], dt.datetime] | None = None,
              max_in_flight: int = PUBLISH_MAX_IN_FLIGHT, timeout_s: float = PUBLISH_TIMEOUT_S,
              tally: Tally | None = None) -> int:
    """Publish each object's job (data and attributes as the function sends them); returns how many.

    Waits for every publish; the first failure raises ReconcileError naming the object and topic.
    """
    now = now or (lambda: dt.datetime.now(dt.timezone.utc))
    tally = tally if tally is not None else Tally()
    published = 0
    in_flight: list[tuple[dict, Future]] = []

    def settle() -> int:
        for resource, future in in_flight:
            try:
                future.result(timeout=timeout_s)
            except Exception as exc:
                raise ReconcileError(_publish_problem(topic, resource, exc)) from exc
            tally.republished += 1
        count = len(in_flight)
        in_flight.clear()
        return count

    for resource in objects:
        job = job_for(resource, now())
        try:
            future = publisher.publish(topic, json.dumps(job).encode(), **job_contract.job_attributes(job))
        except Exception as exc:
            raise ReconcileError(_publish_problem(topic, resource, exc)) from exc
        in_flight.append((resource, future))
        if len(in_flight) >= max_in_flight:
            published += settle()
    return published + settle()


def _publish_problem(topic: str, resource: dict, exc: Exception) -> str:
    from google.api_core import exceptions

    where = f"publishing the job of gs://{resource['bucket']}/{resource['name']} to {topic} failed"
    if isinstance(exc, exceptions.NotFound):
        return f"{where}: the topic does not exist; check --jobs-topic (JOBS_TOPIC) ({exc})"
    if isinstance(exc, exceptions.Forbidden):
        return f"{where}: grant roles/pubsub.publisher on the topic to the identity running reconcile ({exc})"
    return f"{where}: {exc!r}; nothing is lost, run reconcile --republish again"


# --- One run --------------------------------------------------------------------------------

@dataclass
class Summary:
    bucket: str
    prefix: str
    since: str
    until: str
    min_age_s: float
    listed: int
    scanned: int
    rowed_keys: int
    missing: int
    republished: int
    dry_run: bool
    jobs_topic: str
    seconds: float

    def line(self) -> str:
        head = (f"reconcile: {self.missing} of {self.listed} uploads in gs://{self.bucket}/{self.prefix} created "
                f"{self.since} .. {self.until} (at least {self.min_age_s:.0f} s ago) have no row "
                f"({self.scanned} objects under the prefix, {self.rowed_keys} keys with a row, {self.seconds:.1f} s)")
        if self.dry_run:
            return head + ("; dry run: --republish publishes their jobs" if self.missing else "")
        return head + f"; {self.republished} jobs republished to {self.jobs_topic}"

    def log_fields(self) -> dict:
        """The structured log line's fields: the log-based metric and its alert read reconcile_missing."""
        return {"reconcile_missing": self.missing, "reconcile_listed": self.listed,
                "reconcile_republished": self.republished, "reconcile_scanned": self.scanned,
                "reconcile_rowed_keys": self.rowed_keys, "reconcile_bucket": self.bucket,
                "reconcile_prefix": self.prefix, "reconcile_since": self.since, "reconcile_until": self.until,
                "reconcile_dry_run": self.dry_run, "reconcile_seconds": round(self.seconds, 3)}


def reconcile(settings: ReconcileSettings, *, storage_client, bq_client, publisher, now: dt.datetime,
              tally: Tally | None = None, on_missing: Callable[[dict], None] = lambda _: None) -> Summary:
    """Rowed keys first, then the listing streamed against them: only the keys are held in memory.

    (An upload whose row lands between the query and the listing is reported although it has its
    row by then; uploads younger than min_age_s are left out, so that takes a delivery retried for
    minutes, and republishing it is harmless.)
    """
    started = time.monotonic()
    tally = tally if tally is not None else Tally()
    keys = rowed_keys(bq_client, settings.results_table, settings.errors_table, settings.bucket, settings.prefix,
                      settings.since)
    tally.rowed_keys = len(keys)

    def reported(objects: Iterable[dict]) -> Iterator[dict]:
        for resource in objects:
            tally.missing += 1
            on_missing(resource)
            yield resource

    listed = list_uploads(storage_client, settings.bucket, settings.prefix, settings.since, settings.until,
                          settings.min_age_s, now, tally)
    found = reported(missing(listed, keys))
    if settings.republish:
        republish(publisher, settings.jobs_topic, found, tally=tally)
    else:
        for _ in found:
            pass
    return Summary(bucket=settings.bucket, prefix=settings.prefix, since=rfc3339(settings.since),
                   until=rfc3339(settings.until), min_age_s=settings.min_age_s, listed=tally.listed,
                   scanned=tally.scanned, rowed_keys=tally.rowed_keys, missing=tally.missing,
                   republished=tally.republished, dry_run=not settings.republish, jobs_topic=settings.jobs_topic,
                   seconds=time.monotonic() - started)


def missing_line(resource: dict) -> str:
    """Text output: event key, creation time, size in bytes (tab-separated)."""
    return f"{object_key(resource)}\t{resource.get('timeCreated')}\t{resource.get('size')}"


def missing_record(resource: dict) -> dict:
    """--json output of one missing upload (the summary follows as {"record": "summary", ...})."""
    return {"record": "missing", "event_key": object_key(resource), "bucket": resource["bucket"],
            "name": resource["name"], "generation": resource["generation"],
            "time_created": resource.get("timeCreated"), "size": resource.get("size")}


def main(settings: ReconcileSettings, *, json_output: bool, progress: bool | None) -> int:
    """The CLI's run: progress on stderr, one line per missing upload and a summary on stdout, and
    one structured log line at the end, which the alert matches. Returns the exit code."""
    import click
    from google.auth.exceptions import DefaultCredentialsError
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, SpinnerColumn, TimeElapsedColumn
    from rich.text import Text

    from worker import clients

    tally = Tally()

    class TallyColumn(ProgressColumn):
        # Read at each refresh (rich's own thread), so the listing loop never calls into rich.
        def render(self, task) -> Text:
            return Text(f"gs://{settings.bucket}/{settings.prefix}: {tally.scanned} listed, {tally.listed} "
                        f"in the window, {tally.missing} without a row, {tally.republished} republished")

    try:
        storage = clients.storage_client(settings.project)
        bigquery = clients.bigquery_client(settings.project)
        # Default batching (throughput), unlike the function's one-message batches.
        publisher = clients.publisher_client() if settings.republish else None
    except (DefaultCredentialsError, RuntimeError) as exc:
        # google.auth's error, or worker.clients' own (a RuntimeError) when it wraps it.
        click.echo(f"reconcile: cannot make the Google Cloud clients: {exc} (on Google Cloud, run as a service "
                   "account; elsewhere `gcloud auth application-default login`, or set the *_EMULATOR_HOST "
                   "variables for local emulators)", err=True)
        return 2
    console = Console(stderr=True)
    bar = Progress(SpinnerColumn(), TallyColumn(), TimeElapsedColumn(), console=console,
                   disable=not (console.is_terminal if progress is None else progress),
                   redirect_stdout=sys.stdout.isatty())
    bar.add_task("reconcile", total=None)

    def on_missing(resource: dict) -> None:
        click.echo(json.dumps(missing_record(resource)) if json_output else missing_line(resource))

    try:
        with bar:
            summary = reconcile(settings, storage_client=storage, bq_client=bigquery, publisher=publisher,
                                now=dt.datetime.now(dt.timezone.utc), tally=tally, on_missing=on_missing)
    except ReconcileError as exc:
        _LOGGER.error("reconcile failed: %s", exc, extra={"reconcile_failed": True,
                                                          "reconcile_bucket": settings.bucket})
        click.echo(f"reconcile: {exc}", err=True)
        return 1
    finally:
        if publisher is not None:
            publisher.stop()
    click.echo(json.dumps({"record": "summary", **asdict(summary)}) if json_output else summary.line())
    _LOGGER.log(logging.WARNING if summary.missing else logging.INFO,
                "reconcile: %d uploads without a row", summary.missing, extra=summary.log_fields())
    return 0

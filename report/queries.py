"""The SQL files in sql/queries/ as objects, and running them against BigQuery (real or emulated).

Every query names its tables as `${project}.${dataset}.name` and takes named parameters; the same
text runs on local-bigquery and on BigQuery. The report and the tests run queries only through
`Warehouse.run`, so what the tests check is what the report shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from localcloud.resources import SQL_DIR, render_sql

QUERIES_DIR = SQL_DIR / "queries"

# Every parameter a query file may take, with its BigQuery type. NULL means "no filter" / default.
PARAMETER_TYPES = {"run_id": "STRING", "run_prefix": "STRING", "bucket_s": "INT64"}

QUERY_TIMEOUT_S = 120.0
CALL_DEADLINE_S = 30.0


class ReportError(Exception):
    """Something the user can fix: a stack that is not up, a dataset that does not exist, a bad query."""


class UnfilteredQuery(ReportError):
    """The query cannot apply the requested run filter, so its rows would not match the selection."""


@dataclass(frozen=True)
class Selection:
    """Which result rows every query reads: one run, runs with a common prefix, or everything."""

    run_id: str | None = None
    run_prefix: str | None = None

    def describe(self) -> str:
        if self.run_id and self.run_prefix:
            return f"run {self.run_id} (prefix {self.run_prefix})"
        if self.run_id:
            return f"run {self.run_id}"
        if self.run_prefix:
            return f"runs starting with {self.run_prefix}"
        return "every run"

    def parameters(self) -> dict[str, str | None]:
        return {"run_id": self.run_id, "run_prefix": self.run_prefix}


@dataclass(frozen=True)
class Query:
    name: str
    path: Path

    @cached_property
    def sql(self) -> str:
        return self.path.read_text()

    @cached_property
    def header(self) -> str:
        """The leading comment block, without the comment markers."""
        lines = []
        for line in self.sql.splitlines():
            if not line.startswith("--"):
                break
            lines.append(line[2:].strip())
        return " ".join(lines)

    @property
    def summary(self) -> str:
        """What the query returns: its header up to the parameter list."""
        return self.header.split("Parameters:")[0].strip()

    @property
    def documented_columns(self) -> list[str]:
        """Column names listed after `Columns:` in the header; `p50/p95_x_ms` stands for p50_x_ms, p95_x_ms."""
        listed = self.header.split("Columns:", 1)[1] if "Columns:" in self.header else ""
        listed = re.sub(r"\([^)]*\)", "", listed)
        columns = []
        for item in re.findall(r"[\w/]+", listed):
            if "/" in item:
                *prefixes, last = item.split("/")
                head, _, tail = last.partition("_")
                columns += [f"{prefix}_{tail}" for prefix in prefixes] + [last]
            else:
                columns.append(item)
        return columns

    @cached_property
    def parameters(self) -> tuple[str, ...]:
        code = re.sub(r"--[^\n]*", "", self.sql)
        return tuple(sorted(set(re.findall(r"@(\w+)", code))))


def query_names() -> list[str]:
    return sorted(path.stem for path in QUERIES_DIR.glob("*.sql"))


def load_query(name: str) -> Query:
    path = QUERIES_DIR / f"{name}.sql"
    if not path.is_file():
        raise ReportError(f"no query {name}: expected {path}")
    return Query(name, path)


class Warehouse:
    """A BigQuery dataset holding the results, errors and batches tables and the views of sql/."""

    def __init__(self, client, project: str, dataset: str, description: str = ""):
        self.client = client
        self.project = project
        self.dataset = dataset
        self.description = description or f"BigQuery {project}.{dataset}"

    @classmethod
    def connect(cls, project: str, dataset: str, env) -> "Warehouse":
        """Real BigQuery, or the emulator when env has BIGQUERY_EMULATOR_HOST."""
        from worker.clients import bigquery_client

        endpoint = env.get("BIGQUERY_EMULATOR_HOST")
        where = f"BigQuery emulator at {endpoint}" if endpoint else "BigQuery"
        return cls(bigquery_client(project, env), project, dataset, f"{where}: {project}.{dataset}")

    def check(self) -> None:
        """Fail early, with what to do, when the dataset does not exist."""
        from google.api_core.exceptions import NotFound
        from google.cloud.bigquery.retry import DEFAULT_RETRY

        try:
            self.client.get_dataset(f"{self.project}.{self.dataset}", retry=DEFAULT_RETRY.with_deadline(CALL_DEADLINE_S))
        except NotFound:
            raise ReportError(f"no dataset {self.dataset} in project {self.project} ({self.description}): "
                              "`make up` or infra/ creates it; pass the dataset the pipeline writes to") from None

    def run(self, query: Query, selection: Selection = Selection(), **values) -> list[dict]:
        """Rows of one query; parameters the query does not take are not sent."""
        from google.api_core.exceptions import BadRequest, NotFound
        from google.cloud.bigquery.retry import DEFAULT_RETRY
        from google.cloud import bigquery

        given = {**selection.parameters(), **values}
        unknown = set(query.parameters) - set(PARAMETER_TYPES)
        if unknown:
            raise ReportError(f"{query.path.name} takes unknown parameters {sorted(unknown)}; "
                              f"known: {sorted(PARAMETER_TYPES)}")
        ignored = [name for name in ("run_id", "run_prefix") if given.get(name) and name not in query.parameters]
        if ignored:
            raise UnfilteredQuery(f"{query.name} cannot filter by {', '.join(ignored)}")
        parameters = [bigquery.ScalarQueryParameter(name, PARAMETER_TYPES[name], given.get(name))
                      for name in query.parameters]
        job_config = bigquery.QueryJobConfig(query_parameters=parameters, use_legacy_sql=False)
        try:
            job = self.client.query(render_sql(query.sql, self), job_config=job_config, job_retry=None,
                                    retry=DEFAULT_RETRY.with_deadline(CALL_DEADLINE_S))
            return [dict(row.items()) for row in job.result(timeout=QUERY_TIMEOUT_S)]
        except NotFound as exc:
            raise ReportError(f"{query.name}: {_first_line(exc.message)} (tables and views come from `make up` "
                              "or infra/; is this the dataset the pipeline writes to?)") from exc
        except BadRequest as exc:
            raise ReportError(f"{query.name} failed on {self.description}: {_first_line(exc.message)}") from exc


def _first_line(message: str) -> str:
    """Google's error text without the `Location:` and `Job ID:` lines it appends."""
    return message.strip().splitlines()[0] if message and message.strip() else str(message)

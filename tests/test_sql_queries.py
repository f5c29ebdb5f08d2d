"""Every query in sql/queries/ on the BigQuery emulator against known rows, with the expected numbers
computed here in Python; plus static checks that a renamed column or an undocumented one is caught.

Queries run through report.queries.Warehouse.run, the code path `make report` uses.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pytest

from localcloud.resources import table_schema
from report.queries import PARAMETER_TYPES, ReportError, Selection, UnfilteredQuery, load_query, query_names
from tests.known_rows import ERRORS_ONLY_RUN, OTHER_RUN, PREFIX, KnownRows, known_dataset

SELECTIONS = (Selection(run_prefix=PREFIX), Selection(run_id="sqlt-a"))


@pytest.fixture(scope="module")
def known(stack):
    with known_dataset(stack) as (warehouse, truth):
        yield warehouse, truth


# --- Python's side: the same numbers, computed from the rows -----------------------------------

def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def selected(rows: list[dict], selection: Selection) -> list[dict]:
    return [row for row in rows
            if (selection.run_id is None or row["run_id"] == selection.run_id)
            and (selection.run_prefix is None or (row["run_id"] or "").startswith(selection.run_prefix))]


def grouped(rows: list[dict], *keys) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(key(row) if callable(key) else row[key] for key in keys)].append(row)
    return dict(sorted(groups.items(), key=lambda item: tuple("" if v is None else v for v in item[0])))


def mean(rows: list[dict], column: str) -> float | None:
    values = [row[column] for row in rows if row[column] is not None]
    return statistics.fmean(values) if values else None


def assert_percentile(got: float, values: list[float], percent: float, rounding: float = 0.0) -> None:
    """APPROX_QUANTILES may be off by about one bucket of rank: accept the values within 1%
    (and `rounding` for queries that round)."""
    ordered = sorted(values)
    n = len(ordered)
    low = ordered[max(0, math.floor((percent / 100 - 0.01) * (n - 1)))]
    high = ordered[min(n - 1, math.ceil((percent / 100 + 0.01) * (n - 1)))]
    assert low - rounding <= got <= high + rounding, f"p{percent} = {got}, expected within [{low}, {high}] of {ordered}"


def memory_gib(row: dict) -> float:
    return round(row["memory_total_bytes"] / 1024 ** 3, 1)


def framework(row: dict) -> str:
    return row["web_framework"] or "pull (none)"


def same(got, want, rel: float = 1e-9, abs: float = 1e-9) -> bool:
    """Numbers within tolerance, anything else equal."""
    numbers = (int, float)
    if isinstance(got, numbers) and isinstance(want, numbers) and not isinstance(want, bool):
        return math.isclose(got, want, rel_tol=rel, abs_tol=abs)
    return got == want


def assert_rows(got: list[dict], expected: list[dict], **tolerance) -> None:
    """Same rows in the same order, with the expected columns and values."""
    assert len(got) == len(expected), f"{len(got)} rows, expected {len(expected)}: {got}"
    for row, want in zip(got, expected):
        differ = {k: (row[k], v) for k, v in want.items() if not same(row[k], v, **tolerance)}
        assert not differ, f"(got, expected) differ in {differ} for row {row}"


def whole_ms_s(start: dt.datetime, end: dt.datetime) -> float:
    """TIMESTAMP_DIFF(end, start, MILLISECOND) / 1000."""
    return ((end - start) // dt.timedelta(milliseconds=1)) / 1000


# --- One check per query file; test_every_query_has_a_check keeps it that way -------------------

CHECKS = {}


@dataclass
class Case:
    """What a check gets besides the query's rows: the rows it should have read, and a way to run it again."""

    rows: list[dict]  # the de-duplicated result rows of the selection
    selection: Selection
    run: Callable[..., list[dict]]  # run(selection=..., bucket_s=...) -> rows
    truth: KnownRows


def check(name):
    def register(function):
        CHECKS[name] = function
        return function
    return register


def means_by(rows, keys, names):
    expected = []
    for key, group in grouped(rows, *keys).items():
        expected.append({**dict(zip(names, key)), "images": len(group),
                         "mean_inference_ms": mean(group, "inference_ms"), "mean_total_ms": mean(group, "total_ms"),
                         "mean_end_to_end_ms": mean(group, "end_to_end_ms")})
    return expected


@check("by_engine")
def check_by_engine(got, case):
    expected = means_by(case.rows, ("engine", "precision"), ("engine", "precision"))
    for row in expected:
        group = [r for r in case.rows if (r["engine"], r["precision"]) == (row["engine"], row["precision"])]
        row["mean_batch_size"] = mean(group, "batch_size")
    assert_rows(got, expected)


@check("by_engine_machine")
def check_by_engine_machine(got, case):
    keys = ("engine", "precision", "environment", "logical_cores", memory_gib)
    names = ("engine", "precision", "environment", "logical_cores", "memory_gib")
    expected = means_by(case.rows, keys, names)
    for row, group in zip(expected, grouped(case.rows, *keys).values()):
        row["hosts"] = len({r["worker_host"] for r in group})
        row["cpu_models"] = ", ".join(sorted({r["cpu_model"] for r in group}))
    assert_rows(got, expected)
    assert {row["memory_gib"] for row in got} == {8.0, 15.6}


@check("by_engine_framework")
def check_by_engine_framework(got, case):
    assert_rows(got, means_by(case.rows, ("engine", "precision", framework), ("engine", "precision", "web_framework")))
    assert "pull (none)" in {row["web_framework"] for row in got}
    assert {"flask", "fastapi"} <= {row["web_framework"].split()[0] for row in got}  # two frameworks compared


@check("by_engine_machine_framework")
def check_by_engine_machine_framework(got, case):
    keys = ("engine", "precision", "environment", "logical_cores", memory_gib, framework)
    names = ("engine", "precision", "environment", "logical_cores", "memory_gib", "web_framework")
    assert_rows(got, means_by(case.rows, keys, names))
    assert {"flask", "fastapi"} <= {row["web_framework"].split()[0] for row in got}


@check("latency_percentiles")
def check_latency_percentiles(got, case):
    groups = grouped(case.rows, "engine", "precision")
    assert [(row["engine"], row["precision"]) for row in got] == list(groups)
    for row, group in zip(got, groups.values()):
        assert row["images"] == len(group)
        for column in ("inference_ms", "total_ms", "end_to_end_ms"):
            for percent in (50, 95, 99):
                assert_percentile(row[f"p{percent}_{column}"], [r[column] for r in group], percent)
        assert row["max_total_ms"] == pytest.approx(max(r["total_ms"] for r in group))


@check("by_model")
def check_by_model(got, case):
    keys = ("model_name", "engine", "precision", lambda r: r.get("cpu_flags"))
    groups = grouped(case.rows, *keys)
    assert [(r["model_name"], r["engine"], r["precision"], r["cpu_flags"]) for r in got] == list(groups)
    for row, group in zip(got, groups.values()):
        assert row["images"] == len(group)
        for column in ("batch_size", "inference_ms", "total_ms"):
            assert same(row[f"mean_{column}"], mean(group, column))
        for percent in (50, 95):
            assert_percentile(row[f"p{percent}_inference_ms"], [r["inference_ms"] for r in group], percent)
        assert row["images_per_s"] is None or row["images_per_s"] > 0


@check("latency_distribution")
def check_latency_distribution(got, case):
    groups = grouped(case.rows, "engine", "precision")
    assert [(row["engine"], row["precision"]) for row in got] == list(groups)
    for row, group in zip(got, groups.values()):
        assert row["images"] == len(group)
        for column in ("inference_ms", "total_ms", "end_to_end_ms"):
            values, percentiles = [r[column] for r in group], row[f"{column}_percentiles"]
            assert len(percentiles) == 101 and percentiles == sorted(percentiles)
            assert percentiles[0] == pytest.approx(min(values)) and percentiles[100] == pytest.approx(max(values))
            assert set(percentiles) <= set(values)
            for percent in (25, 50, 75, 90):
                assert_percentile(percentiles[percent], values, percent)


def floor_to(moment: dt.datetime, width_s: int) -> int:
    return int(moment.timestamp()) // width_s * width_s


@check("throughput")
def check_throughput(got, case):
    expected = []
    for (engine, precision), group in grouped(case.rows, "engine", "precision").items():
        spans, per = [], {width: defaultdict(int) for width in (1, 60)}
        for (run_id,), run in grouped(group, "run_id").items():
            spans.append(whole_ms_s(min(ts(r["received_at"]) for r in run), max(ts(r["processed_at"]) for r in run)))
            for r in run:
                for width in per:
                    per[width][run_id, floor_to(ts(r["processed_at"]), width)] += 1
        expected.append({"engine": engine, "precision": precision, "runs": len(spans), "images": len(group),
                         "first_received_at": min(ts(r["received_at"]) for r in group),
                         "last_processed_at": max(ts(r["processed_at"]) for r in group),
                         "busy_s": sum(spans), "longest_run_s": max(spans),
                         "images_per_s": len(group) / sum(spans), "images_per_minute": 60 * len(group) / sum(spans),
                         "peak_images_per_minute": max(per[60].values()),
                         "peak_images_per_second": max(per[1].values())})
    # The emulator (DuckDB) and BigQuery may count whole milliseconds one apart.
    assert_rows(got, expected, rel=1e-3, abs=2e-3)
    if case.selection.run_prefix:
        assert {row["runs"] for row in got} == {2}  # busy time of two runs, not the ten minutes between them
        assert all(row["busy_s"] < 10 for row in got)


@check("throughput_over_time")
def check_throughput_over_time(got, case):
    # got is for @bucket_s = 1; also per minute, and NULL (= per minute).
    for width, result in ((1, got), (60, case.run(bucket_s=60)), (60, case.run(bucket_s=None))):
        expected = []
        for (run_id, engine, precision), group in grouped(case.rows, "run_id", "engine", "precision").items():
            counts = defaultdict(int)
            for r in group:
                counts[floor_to(ts(r["processed_at"]), width)] += 1
            first = min(counts)
            expected += [{"run_id": run_id, "engine": engine, "precision": precision,
                          "bucket_start": dt.datetime.fromtimestamp(start, dt.timezone.utc),
                          "seconds_from_first": start - first, "images": n, "images_per_s": n / width,
                          "images_per_minute": n * 60 / width} for start, n in sorted(counts.items())]
        assert_rows(result, expected)
    assert any(row["images"] > 1 for row in case.run(bucket_s=60))


@check("stage_breakdown")
def check_stage_breakdown(got, case):
    sinks = {b["batch_id"]: b["sink_ms"] for b in case.truth.batches}
    stages = ("queue_ms", "download_ms", "preprocess_ms", "batch_wait_ms", "batch_inference_ms")
    expected = []
    for (engine, precision), group in grouped(case.rows, "engine", "precision").items():
        row = {"engine": engine, "precision": precision, "images": len(group)}
        for column in ("created_to_function_ms", "function_to_worker_ms", *stages):
            row[f"mean_{column}"] = mean(group, column)
        row["mean_unaccounted_ms"] = statistics.fmean(r["total_ms"] - sum(r[s] for s in stages) for r in group)
        row["mean_total_ms"] = mean(group, "total_ms")
        batch_sinks = [sinks[r["batch_id"]] for r in group if r["batch_id"] in sinks]
        row["mean_sink_ms"] = statistics.fmean(batch_sinks) if batch_sinks else None
        row["mean_end_to_end_ms"] = mean(group, "end_to_end_ms")
        row["mean_inference_ms"] = mean(group, "inference_ms")
        row["rows_off_5pct"] = sum(abs(r["total_ms"] - sum(r[s] for s in stages)) > 0.05 * r["total_ms"]
                                   for r in group)
        row["rows_without_batch"] = sum(r["batch_id"] not in sinks for r in group)
        expected.append(row)
    assert_rows(got, expected)
    if case.selection.run_prefix:  # the known rows hold both kinds of fault in these runs
        assert sum(row["rows_off_5pct"] for row in got) == 2
        assert sum(row["rows_without_batch"] for row in got) > 0


@check("speedup_vs_tensorflow")
def check_speedup(got, case):
    baseline = [r for r in case.rows if r["engine"] == "tensorflow"]
    groups = grouped(case.rows, "engine", "precision")
    assert [(row["engine"], row["precision"]) for row in got] == list(groups)
    for row, group in zip(got, groups.values()):
        assert row["images"] == len(group) and row["tensorflow_images"] == len(baseline)
        for column in ("inference_ms", "total_ms"):
            assert row[f"mean_{column}"] == pytest.approx(mean(group, column))
            assert_percentile(row[f"p50_{column}"], [r[column] for r in group], 50)
            name = column.removesuffix("_ms")
            assert row[f"speedup_mean_{name}"] == pytest.approx(mean(baseline, column) / mean(group, column))
            tensorflow_p50 = next(r[f"p50_{column}"] for r in got if r["engine"] == "tensorflow")
            assert row[f"speedup_p50_{name}"] == pytest.approx(tensorflow_p50 / row[f"p50_{column}"])
    openvino = next(row for row in got if row["engine"] == "openvino" and row["precision"] == "f32")
    assert openvino["speedup_mean_inference"] > 5  # the known rows make OpenVINO ~10x faster
    # Without TensorFlow rows in the selection there is nothing to compare with.
    alone = case.run(selection=Selection(run_id=OTHER_RUN))
    assert alone and all(row["tensorflow_images"] == 0 and row["speedup_mean_inference"] is None
                         and row["speedup_p50_total"] is None for row in alone)


@check("warm_vs_cold")
def check_warm_vs_cold(got, case):
    expected = []
    for (engine, precision), group in grouped(case.rows, "engine", "precision").items():
        cold, warm = [r for r in group if r["cold"]], [r for r in group if not r["cold"]]
        row = {"engine": engine, "precision": precision, "cold_images": len(cold), "warm_images": len(warm)}
        for column in ("inference_ms", "total_ms"):
            row[f"cold_mean_{column}"] = mean(cold, column)
            row[f"warm_mean_{column}"] = mean(warm, column)
        row["cold_over_warm_inference"] = row["cold_mean_inference_ms"] / row["warm_mean_inference_ms"]
        row["cold_over_warm_total"] = row["cold_mean_total_ms"] / row["warm_mean_total_ms"]
        expected.append(row)
    assert_rows(got, expected)


@check("runs")
def check_runs(got, case):
    errors = selected(case.truth.errors, case.selection)
    run_ids = sorted({r["run_id"] for r in case.rows} | {e["run_id"] for e in errors})
    by_run = {}
    for run_id in run_ids:
        group = [r for r in case.rows if r["run_id"] == run_id]
        row = {"run_id": run_id, "images": len(group), "errors": sum(e["run_id"] == run_id for e in errors)}
        if group:
            first = min(ts(r["received_at"]) for r in group)
            last = max(ts(r["processed_at"]) for r in group)
            row.update(engines=", ".join(sorted({f"{r['engine']}/{r['precision']}" for r in group})),
                       first_received_at=first, last_processed_at=last,
                       images_per_s=len(group) / whole_ms_s(first, last),
                       mean_batch_size=mean(group, "batch_size"), mean_inference_ms=mean(group, "inference_ms"))
        by_run[run_id] = row
    # Error-only runs have no first row: NULL sorts first, as on BigQuery.
    order = sorted(by_run.values(), key=lambda r: (r.get("first_received_at") is not None,
                                                   r.get("first_received_at") or dt.datetime.min, r["run_id"]))
    assert [row["run_id"] for row in got] == [row["run_id"] for row in order]
    for row, want in zip(got, order):
        assert_rows([row], [want], rel=1e-3)
        group = [r for r in case.rows if r["run_id"] == row["run_id"]]
        if group:
            assert_percentile(row["p50_total_ms"], [r["total_ms"] for r in group], 50)
            assert_percentile(row["p95_end_to_end_ms"], [r["end_to_end_ms"] for r in group], 95)
        else:
            assert row["engines"] is None and row["p50_total_ms"] is None
    if case.selection.run_prefix:
        assert ERRORS_ONLY_RUN in [row["run_id"] for row in got]


@check("errors_by_reason")
def check_errors_by_reason(got, case):
    errors = selected(case.truth.errors, case.selection)
    expected = [{"reason": reason, "errors": len(group), "runs": len({e["run_id"] for e in group}),
                 "first_failed_at": min(ts(e["failed_at"]) for e in group),
                 "last_failed_at": max(ts(e["failed_at"]) for e in group)}
                for (reason,), group in grouped(errors, "reason").items()]
    expected.sort(key=lambda row: (-row["errors"], row["reason"]))
    assert_rows(got, expected)


@check("run_summary")
def check_run_summary(got, case):
    if case.selection.run_prefix:
        assert got is UnfilteredQuery  # it takes only @run_id: the runner refuses to show unfiltered rows
        return
    for row, ((label,), group) in zip(got, grouped(case.rows, "label").items(), strict=True):
        assert row["label"] == label and row["images"] == len(group)
        assert row["mean_score"] == pytest.approx(mean(group, "score"), abs=5e-4)
        assert row["mean_inference_ms"] == pytest.approx(mean(group, "inference_ms"), abs=5e-4)
        assert row["mean_total_ms"] == pytest.approx(mean(group, "total_ms"), abs=0.05)
        for column, rounding in (("inference_ms", 5e-4), ("total_ms", 0.05)):
            for percent in (50, 95):
                assert_percentile(row[f"p{percent}_{column}"], [r[column] for r in group], percent, rounding)


# --- Tests ---------------------------------------------------------------------------------------

def test_every_query_has_a_check():
    assert sorted(CHECKS) == query_names(), "add a @check for every file in sql/queries/"


@pytest.mark.stack
@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("name", query_names())
def test_query_on_known_rows(known, name, selection):
    warehouse, truth = known
    query = load_query(name)

    def run(selection=selection, **values):
        return warehouse.run(query, selection, **{"bucket_s": 1, **values})

    try:
        got = run()
    except UnfilteredQuery:
        got = UnfilteredQuery
    CHECKS[name](got, Case(selected(truth.results, selection), selection, run, truth))
    if got is not UnfilteredQuery:
        assert got, f"{name} returned no rows for {selection.describe()}"
        assert list(got[0]) == query.documented_columns, f"{name}.sql: header `Columns:` differs from the result"


@pytest.mark.stack
def test_a_renamed_column_breaks_every_query_that_reads_it(stack):
    """Rename results.inference_ms on the emulator: each query naming it must fail, the others run."""
    def rename(table, fields):
        return [{**f, "name": "inference_time_ms"} if table == "results" and f["name"] == "inference_ms" else f
                for f in fields]

    with known_dataset(stack, schema_edit=rename) as (warehouse, _):
        for name in query_names():
            query = load_query(name)
            if re.search(r"\binference_ms\b", strip_sql(query.sql)):
                with pytest.raises(ReportError, match=name):
                    warehouse.run(query, Selection(run_id="sqlt-a"))
            else:
                warehouse.run(query, Selection(run_id="sqlt-a"))


# --- Static checks: columns and parameters named in the SQL exist -------------------------------

KEYWORDS = set("""
SELECT FROM WHERE AND OR NOT IS NULL AS WITH GROUP BY ORDER ASC DESC NULLS FIRST LAST JOIN LEFT RIGHT FULL
OUTER INNER CROSS USING ON CASE WHEN THEN ELSE END TRUE FALSE DISTINCT LIMIT IN QUALIFY OVER PARTITION ROWS
BETWEEN UNION ALL HAVING INTERVAL EXCEPT REPLACE STRUCT ARRAY
MICROSECOND MILLISECOND SECOND MINUTE HOUR DAY WEEK MONTH QUARTER YEAR
STRING INT64 FLOAT64 NUMERIC BOOL TIMESTAMP DATE
""".split())


def strip_sql(sql: str) -> str:
    """The SQL without comments, string literals, backquoted table names and parameters."""
    sql = re.sub(r"--[^\n]*", " ", sql)
    sql = re.sub(r"'(?:[^'\\]|\\.)*'", " ", sql)
    sql = re.sub(r"`[^`]*`", " ", sql)
    return re.sub(r"@\w+", " ", sql)


def unknown_names(sql: str, columns: set[str]) -> set[str]:
    """Names that are neither keywords, functions, columns, nor aliases defined earlier in the text.

    The queries are built from CTEs, so an alias is defined before anything reads it; in
    `MAX(sink_ms) AS sink_ms` the first sink_ms comes before its alias and must be a column."""
    code = strip_sql(sql)
    defined = {}  # name -> where it is first defined (an alias after AS, or a CTE name before AS ()
    for pattern in (r"\bAS\s+([A-Za-z_]\w*)", r"\b(\w+)\s+AS\s*\("):
        for match in re.finditer(pattern, code, re.I):
            defined[match.group(1)] = min(defined.get(match.group(1), match.start(1)), match.start(1))
    unknown = set()
    for match in re.finditer(r"\b([A-Za-z_]\w*)\b(?!\s*\()", code):
        name = match.group(1)
        if name.upper() in KEYWORDS or name in columns:
            continue
        if name in defined and defined[name] <= match.start(1):
            continue
        unknown.add(name)
    return unknown


def schema_columns(fields_by_table: dict[str, list[dict]]) -> set[str]:
    return {field["name"] for fields in fields_by_table.values() for field in fields}


SCHEMAS = {table: table_schema(table) for table in ("results", "errors", "batches")}


@pytest.mark.parametrize("name", query_names())
def test_query_names_only_existing_columns(name):
    query = load_query(name)
    assert unknown_names(query.sql, schema_columns(SCHEMAS)) == set(), \
        f"{name}.sql names columns that are not in sql/*_schema.json"


def test_a_renamed_column_is_caught_without_running_anything():
    renamed = json.loads(json.dumps(SCHEMAS))
    for field in renamed["results"]:
        if field["name"] == "total_ms":
            field["name"] = "worker_total_ms"
    flagged = {name for name in query_names()
               if "total_ms" in unknown_names(load_query(name).sql, schema_columns(renamed))}
    assert flagged == {name for name in query_names() if re.search(r"\btotal_ms\b", strip_sql(load_query(name).sql))}
    assert {"by_engine", "stage_breakdown", "speedup_vs_tensorflow"} <= flagged


@pytest.mark.parametrize("name", query_names())
def test_query_header_and_parameters(name):
    query = load_query(name)
    assert query.summary, f"{name}.sql: start with a comment saying what it returns"
    assert "Parameters:" in query.header and query.documented_columns, f"{name}.sql: list Parameters: and Columns:"
    assert set(query.parameters) <= set(PARAMETER_TYPES)
    for parameter in query.parameters:
        assert f"@{parameter}" in query.header, f"{name}.sql: document @{parameter}"
    assert "${project}.${dataset}." in query.sql and "results`" not in query.sql.replace("results_dedup`", ""), \
        f"{name}.sql: read results through the results_dedup view"
    if name != "run_summary":  # the demo's table, kept as it was
        assert {"run_id", "run_prefix"} <= set(query.parameters)

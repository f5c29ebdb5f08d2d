"""Run every query of sql/queries/ for one selection of rows, and turn the rows into tables and plots."""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from report import models, plots
from report.queries import Query, ReportError, Selection, UnfilteredQuery, Warehouse, load_query, query_names

# Tables of the report, in order: (query, title). Every query file is either here or in PLOT_ONLY.
TABLES = (
    ("runs", "Runs"),
    ("by_engine", "By engine (the seed's first table)"),
    ("by_engine_machine", "By engine and machine size (the seed's second table)"),
    ("by_engine_framework", "By engine and web framework (the seed's third table)"),
    ("by_engine_machine_framework", "By engine, machine size and web framework (the seed's fourth table)"),
    ("latency_percentiles", "Latency percentiles"),
    ("speedup_vs_tensorflow", "Speed-up against TensorFlow"),
    ("stage_breakdown", "Stage breakdown"),
    ("warm_vs_cold", "Warm against cold"),
    ("throughput", "Throughput"),
    ("throughput_over_time", "Throughput over time"),
    ("errors_by_reason", "Errors by reason"),
    ("run_summary", "Per label"),
    ("by_model", "By model (network), engine, precision and CPU flags"),
)
PLOT_ONLY = ("latency_distribution",)
COLLAPSED = ("throughput_over_time",)  # long tables: folded in the HTML, left out on the terminal

# Throughput buckets: per second for runs up to this long, else per minute.
SECOND_BUCKETS_UP_TO_S = 900

# The 2020 seed's published means (16,000 images, one request at a time; TensorFlow through TF
# Serving's REST API): what, seed ms, query, column, row filter. Strings match as substrings.
SEED = (
    ("mean inference, TensorFlow", 215, "by_engine", "mean_inference_ms", {"engine": ("tensorflow", "tfserving")}),
    ("mean inference, OpenVINO", 4, "by_engine", "mean_inference_ms", {"engine": ("openvino",)}),
    ("mean total, TensorFlow", 502, "by_engine", "mean_total_ms", {"engine": ("tensorflow", "tfserving")}),
    ("mean total, OpenVINO", 98, "by_engine", "mean_total_ms", {"engine": ("openvino",)}),
    ("TensorFlow inference, Flask", 83, "by_engine_framework", "mean_inference_ms",
     {"engine": ("tensorflow", "tfserving"), "web_framework": ("flask",)}),
    ("TensorFlow inference, FastAPI", 348, "by_engine_framework", "mean_inference_ms",
     {"engine": ("tensorflow", "tfserving"), "web_framework": ("fastapi",)}),
    ("TensorFlow inference, 2-core VM", 364, "by_engine_machine", "mean_inference_ms",
     {"engine": ("tensorflow", "tfserving"), "logical_cores": (2,)}),
    ("TensorFlow inference, 4-core VM", 66, "by_engine_machine", "mean_inference_ms",
     {"engine": ("tensorflow", "tfserving"), "logical_cores": (4,)}),
)
# Columns shown left-aligned (names, not numbers).
TEXT_COLUMNS = frozenset({"engine", "precision", "environment", "web_framework", "cpu_models", "run_id", "engines",
                          "model_name", "cpu_flags", "runs_as",
                          "label", "reason"})

SEED_NOTE = ("The seed timed TensorFlow through TF Serving's REST API (JSON and an HTTP hop included) and "
             "OpenVINO in process, one image per request; here every engine is timed at the same boundary "
             "on micro-batches. Compare the shape, not the digits.")


@dataclass
class QueryResult:
    query: Query
    rows: list[dict] = field(default_factory=list)
    skipped: str | None = None  # why the query was not run for this selection
    error: str | None = None  # why it failed (the report shows the other queries all the same)


@dataclass
class ReportData:
    source: str
    selection: Selection
    bucket_s: int
    results: dict[str, QueryResult]
    generated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    bench_models: dict | None = None  # `make bench-models` JSON (bare engines per network), when there is one
    bench_models_source: str = ""

    def rows(self, name: str) -> list[dict]:
        return self.results[name].rows if name in self.results else []

    @property
    def images(self) -> int:
        return sum(row["images"] for row in self.rows("by_engine"))

    @property
    def errors(self) -> int:
        return sum(row["errors"] for row in self.rows("errors_by_reason"))

    @property
    def errors_by_query(self) -> dict[str, str]:
        return {name: result.error for name, result in self.results.items() if result.error}

    def empty_message(self) -> str:
        return f"no rows for {self.selection.describe()}"

    def stage_check(self) -> str | None:
        """How many rows' stages add up to their total within 5% (the issue's acceptance check)."""
        rows = self.rows("stage_breakdown")
        if not rows:
            return None
        total = sum(row["images"] for row in rows)
        off = sum(row["rows_off_5pct"] for row in rows)
        return f"worker stages add up to the worker total within 5% in {total - off:,} of {total:,} rows"


def report_query_names() -> list[str]:
    return [name for name, _ in TABLES] + list(PLOT_ONLY)


def collect(warehouse: Warehouse, selection: Selection, bucket_s: int | None = None,
            on_query: Callable[[int, int, str], None] = lambda index, total, name: None) -> ReportData:
    """Run every query; the throughput bucket defaults to 1 s for short runs and 60 s for long ones.
    A query that fails is recorded with its error and the others still run."""
    results: dict[str, QueryResult] = {}
    ordered = [name for name in query_names() if name != "throughput_over_time"] + ["throughput_over_time"]
    for index, name in enumerate(ordered, 1):
        on_query(index, len(ordered), name)
        query = load_query(name)
        if name == "throughput_over_time" and bucket_s is None:
            longest = max((row["longest_run_s"] or 0 for row in results["throughput"].rows), default=0)
            bucket_s = 1 if longest <= SECOND_BUCKETS_UP_TO_S else 60
        try:
            rows = warehouse.run(query, selection, bucket_s=bucket_s)
        except UnfilteredQuery:
            results[name] = QueryResult(query, skipped=f"takes only @run_id: not run for {selection.describe()}")
            continue
        except ReportError as exc:
            results[name] = QueryResult(query, error=str(exc))
            continue
        results[name] = QueryResult(query, rows)
    return ReportData(warehouse.description, selection, bucket_s or 60, results)


def seed_comparison(data: ReportData) -> list[dict]:
    """The seed's published numbers next to the matching rows of this selection."""
    comparison = []
    for what, seed_ms, name, column, match in SEED:
        matching = [row for row in data.rows(name) if all(_matches(row.get(k), wanted) for k, wanted in match.items())]
        here = [(_describe_match(row, match), row[column]) for row in matching if row.get(column) is not None]
        comparison.append({"what": what, "seed_ms": seed_ms, "here": here})
    return comparison


def _matches(value, wanted: tuple) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return any(str(w).lower() in value.lower() for w in wanted)
    return value in wanted


def _describe_match(row: dict, match: dict) -> str:
    keys = ("engine", "precision", "environment", "web_framework", "logical_cores")
    return " ".join(str(row[k]) for k in keys if k in row and row[k] is not None
                    and (k in ("engine", "precision") or k not in match))


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1 or magnitude == 0:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, list):
        return f"{len(value)} values"
    return str(value)


def table_rows(result: QueryResult) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted cells; array columns (plot data) are left out."""
    if not result.rows:
        return [], []
    columns = [c for c, v in result.rows[0].items() if not isinstance(v, list)]
    return columns, [[format_value(row[c]) for c in columns] for row in result.rows]


def build_plots(data: ReportData) -> list[dict]:
    """Each plot as a title, caption and SVG data URI, or a message when there is nothing to draw."""
    specs = (  # (title, caption, query, draw)
        ("Latency distribution per engine",
         "From latency_distribution.sql: 101 percentiles per engine of the per-image inference time and "
         "the worker total (receipt -> handed to the sink).",
         "latency_distribution", lambda: plots.latency_distribution(data.rows("latency_distribution"))),
        ("Stage breakdown",
         "From stage_breakdown.sql: mean time per image in each stage, stacked in the order an image meets "
         "them; the BigQuery insert comes from the batches table.",
         "stage_breakdown", lambda: plots.stage_breakdown(data.rows("stage_breakdown"))),
        ("Throughput over time",
         f"From throughput_over_time.sql with @bucket_s = {data.bucket_s}: images per second in each bucket, "
         "one line per run and engine, from the run's first row.",
         "throughput_over_time",
         lambda: plots.throughput_over_time(data.rows("throughput_over_time"), data.bucket_s)),
    )
    if data.bench_models:
        specs += (("Speed-up against fidelity, per network, engine and precision",
                   f"From {data.bench_models_source} (make bench-models, bare engines): speed-up over TensorFlow f32 "
                   "on the same inputs in the same run against top-1 disagreement with it on held-out demo images.",
                   None, lambda: models.speedup_against_fidelity(data.bench_models)),)
    built = []
    for title, caption, name, draw in specs:
        error = data.errors_by_query.get(name)
        svg = None if error else draw()
        built.append({
            "title": title, "caption": caption,
            "message": f"query failed: {error}" if error else None if svg else data.empty_message(),
            "src": "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode() if svg else None,
        })
    return built


def render_html(data: ReportData) -> str:
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(default=True), undefined=jinja2.StrictUndefined)
    tables = []
    for name, title in TABLES:
        result = data.results.get(name)
        if result is None:
            continue
        columns, cells = table_rows(result)
        tables.append({"name": name, "title": title, "summary": result.query.summary, "columns": columns,
                       "cells": cells, "collapsed": name in COLLAPSED,
                       "error": result.error,
                       "message": result.skipped or (None if cells or result.error else data.empty_message())})
    tables += models.tables(data.bench_models, data.bench_models_source, format_value)
    seed = [{**row, "here": [(label, format_value(value)) for label, value in row["here"]]}
            for row in seed_comparison(data)]
    return environment.get_template("report.html.j2").render(
        data=data, generated_at=format_value(data.generated_at), plots=build_plots(data), tables=tables,
        seed=seed, seed_note=SEED_NOTE, stage_check=data.stage_check(), text_columns=TEXT_COLUMNS)


def write_html(data: ReportData, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return out


def terminal_tables(data: ReportData) -> list:
    """rich tables of the same numbers, for the terminal."""
    from rich.markup import escape
    from rich.table import Table

    seed = Table(title="Against the 2020 seed (ms)", title_justify="left")
    for column in ("what", "seed", "here"):
        seed.add_column(column, justify="left" if column != "seed" else "right")
    for row in seed_comparison(data):
        here = ", ".join(f"{format_value(value)} ({label})" for label, value in row["here"]) or "no rows"
        seed.add_row(row["what"], str(row["seed_ms"]), here)
    tables = [seed]
    for name, title in TABLES:
        result = data.results.get(name)
        if result is None or name in COLLAPSED:
            continue
        table = Table(title=f"{title} ({name}.sql)", title_justify="left")
        columns, cells = table_rows(result)
        if not cells:
            table.add_column(f"[red]error:[/red] {escape(result.error)}" if result.error
                             else escape(result.skipped or data.empty_message()))
        elif len(columns) > TERMINAL_MAX_COLUMNS and len(cells) <= TERMINAL_MAX_COLUMNS:
            _transposed(table, columns, cells)
        else:
            for column in columns:
                table.add_column(column, justify="left" if column in TEXT_COLUMNS else "right")
            for row in cells:
                table.add_row(*row)
        tables.append(table)
    for built in models.tables(data.bench_models, data.bench_models_source, format_value):
        table = Table(title=f"{built['title']} ({built['source']})", title_justify="left")
        for column in built["columns"]:
            table.add_column(column, justify="left" if column in ("engine", "precision", "runs_as") else "right")
        for row in built["cells"]:
            table.add_row(*row)
        tables.append(table)
    return tables


TERMINAL_MAX_COLUMNS = 10


def _transposed(table, columns: list[str], cells: list[list[str]]) -> None:
    """Wide tables on the terminal: one line per column, one column per row, named by its leading text columns."""
    keys = []
    for column in columns:
        if column not in TEXT_COLUMNS:
            break
        keys.append(column)
    keys = keys or columns[:1]
    table.add_column(" / ".join(keys), justify="left")
    for row in cells:
        table.add_column(" ".join(row[columns.index(k)] for k in keys if row[columns.index(k)]), justify="right")
    for index, column in enumerate(columns):
        if column not in keys:
            table.add_row(column, *(row[index] for row in cells))

"""`make report`: the CLI against the BigQuery emulator with known rows, the HTML it writes, and that
HTML opened in a real browser (Debian's headless Chromium) with its plots on screen."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from report import browser
from report.__main__ import main
from report.build import QueryResult, ReportData, format_value, render_html, report_query_names
from report.queries import Selection, load_query, query_names
from tests.known_rows import PREFIX, known_dataset

PLOT_COLOURS = {"blue": (31, 119, 180), "orange": (255, 127, 14)}  # matplotlib's first two colours


def require_chromium() -> str:
    path = browser.chromium_path()
    if path is None:
        message = "chromium is not installed: `make chromium` installs Debian's package (make test does)"
        if os.environ.get("REQUIRE_CI_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def known(stack):
    with known_dataset(stack) as (warehouse, truth):
        yield warehouse, truth


@pytest.fixture(scope="module")
def report_html(stack, known, tmp_path_factory) -> Path:
    warehouse, _ = known
    out = tmp_path_factory.mktemp("report") / "index.html"
    code, output = run_cli("--project", warehouse.project, "--dataset", warehouse.dataset, "--run-prefix", PREFIX,
                           "--out", str(out), env={"BIGQUERY_EMULATOR_HOST": stack.config.bigquery_url})
    assert code == 0, output
    assert f"report: {out}" in output.replace("\n", "")
    return out


def plot_images(html: str) -> list[str]:
    return re.findall(r'<img class="plot" src="data:image/svg\+xml;base64,([^"]+)"', html)


# --- Without the stack -------------------------------------------------------------------------

def test_every_query_is_in_the_report():
    assert sorted(report_query_names()) == query_names(), "add the new query to report.build.TABLES or PLOT_ONLY"


def test_values_are_formatted_for_people():
    assert format_value(None) == ""
    assert format_value(1234) == "1,234"
    assert format_value(1234.56) == "1,235"
    assert format_value(12.345) == "12.3"
    assert format_value(2.5) == "2.50"
    assert format_value(0.01234) == "0.0123"
    assert format_value(True) == "yes"
    assert format_value(dt.datetime(2026, 3, 1, 10, 0, 57, 123456, tzinfo=dt.timezone.utc)) == "2026-03-01 10:00:57.123"
    assert format_value([1.0, 2.0]) == "2 values"


def test_a_selection_without_rows_renders_a_message_not_an_error():
    results = {name: QueryResult(load_query(name)) for name in query_names()}
    data = ReportData("test", Selection(run_id="nope"), 1, results)
    html = render_html(data)
    assert html.count("no rows for run nope") >= len(query_names())
    assert not plot_images(html)


def test_a_failed_query_is_shown_in_its_section_and_the_others_still_render():
    results = {name: QueryResult(load_query(name)) for name in query_names()}
    results["stage_breakdown"] = QueryResult(load_query("stage_breakdown"), error="stage_breakdown: Not found: batches")
    data = ReportData("test", Selection(run_id="r"), 1, results)
    html = render_html(data)
    assert f"1 of {len(query_names())} queries failed: stage_breakdown" in html
    assert html.count("query failed: stage_breakdown: Not found: batches") == 2  # the plot and the table
    assert data.errors_by_query == {"stage_breakdown": "stage_breakdown: Not found: batches"}


# --- On the emulator ---------------------------------------------------------------------------

@pytest.mark.stack
def test_report_from_known_rows(report_html, known):
    _, truth = known
    html = report_html.read_text()
    plots = plot_images(html)
    assert len(plots) == 3, "latency distribution, stage breakdown and throughput over time"
    for plot in plots:
        assert base64.b64decode(plot).lstrip().startswith(b"<?xml") and b"<svg" in base64.b64decode(plot)
    images = sum(1 for row in truth.results if row["run_id"].startswith(PREFIX))
    assert f"{images:,} result rows" in html
    for name in query_names():
        if name not in ("latency_distribution", "run_summary"):
            assert f'<h2 id="{name}">' in html
    assert "takes only @run_id" in html  # run_summary cannot filter by prefix: shown as skipped, not unfiltered
    assert "pull (none)" in html and "fastapi (uvicorn)" in html
    assert "worker stages add up to the worker total within 5% in" in html
    # Self-contained: nothing to fetch when it is opened.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "url(http" not in html


@pytest.mark.stack
def test_report_for_a_run_without_rows(stack, known, tmp_path):
    warehouse, _ = known
    out = tmp_path / "empty.html"
    code, output = run_cli("--project", warehouse.project, "--dataset", warehouse.dataset, "--run-id", "no-such-run",
                           "--out", str(out), "--quiet", env={"BIGQUERY_EMULATOR_HOST": stack.config.bigquery_url})
    assert code == 0, output
    html = out.read_text()
    assert "no rows for run no-such-run" in html and not plot_images(html)


@pytest.mark.stack
def test_report_names_a_missing_dataset(stack, tmp_path):
    code, output = run_cli("--project", stack.config.project, "--dataset", "no_such_dataset", "--out",
                           str(tmp_path / "x.html"), env={"BIGQUERY_EMULATOR_HOST": stack.config.bigquery_url})
    assert code == 1 and "no_such_dataset" in output and "Traceback" not in output


@pytest.mark.stack
@pytest.mark.slow
def _stopped_stack_with_tables(run_dir: Path):
    """A run directory as `make demo` leaves it: BigQuery data written, every process stopped."""
    from localcloud import resources, services
    from localcloud.config import StackConfig
    from localcloud.processes import ProcessManager

    config = StackConfig.with_free_ports(run_dir)
    config.save()
    processes = ProcessManager(config.run_dir)
    processes.start(services.bigquery(config))
    try:
        resources.create_bigquery(config)
    finally:
        processes.stop("bigquery")
    return config, processes


def test_report_after_the_stack_stopped_starts_its_bigquery_alone(tmp_path):
    """`make demo` and `make bench` stop the stack; `make report` afterwards reads the data they left."""
    config, processes = _stopped_stack_with_tables(tmp_path / "run")
    out = tmp_path / "report.html"
    code, output = run_cli("--out", str(out), "--quiet", env={"LOCAL_RUN_DIR": str(config.run_dir)})
    assert code == 0, output
    assert "starting its BigQuery emulator" in output and "no rows for every run" in out.read_text()
    assert processes.process("bigquery") is None, "the emulator the report started is still running"


def test_report_on_data_from_before_a_schema_migration_migrates_it_first(tmp_path, monkeypatch):
    """A run directory left by an older version lacks newer columns (cpu_flags, migration 003); the
    report adds them as `make up` would, instead of failing by_model on an unknown column."""
    from localcloud import resources

    schema = resources.table_schema
    with monkeypatch.context() as patch:
        patch.setattr(resources, "table_schema", lambda name: [f for f in schema(name) if f["name"] != "cpu_flags"])
        patch.setattr(resources, "create_view", lambda *args: None)  # the views of that version did not exist
        config, _ = _stopped_stack_with_tables(tmp_path / "run")
    out = tmp_path / "report.html"
    code, output = run_cli("--out", str(out), "--quiet", env={"LOCAL_RUN_DIR": str(config.run_dir)})
    assert code == 0, output
    assert "by_model" in out.read_text() and "Unrecognized name" not in out.read_text()


def test_report_without_a_local_stack_says_what_to_run(tmp_path):
    code, output = run_cli("--out", str(tmp_path / "x.html"), env={"LOCAL_RUN_DIR": str(tmp_path / "run")})
    assert code == 1 and "make up" in output and "--project" in output


# --- In a browser ------------------------------------------------------------------------------

@pytest.mark.stack
def test_report_shows_its_plots_in_chromium(report_html, tmp_path):
    from PIL import Image

    require_chromium()
    dom = browser.dump_dom(report_html)
    assert len(re.findall(r'<img class="plot" src="data:image/svg\+xml;base64,', dom)) == 3
    assert '<table id="seed">' in dom and '<h2 id="stage_breakdown">' in dom

    png = browser.screenshot(report_html, tmp_path / "report.png", width=1280, height=2000)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1280, 3)
    non_white = int((pixels.min(axis=2) < 235).sum())
    assert non_white > 0.05 * 1280 * 2000, f"the page looks blank: {non_white} non-white pixels"
    colours = len(np.unique(pixels.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])))
    assert colours > 200, f"{colours} colours: too few for plots"
    for name, colour in PLOT_COLOURS.items():
        near = int((np.abs(pixels - np.array(colour)) <= 30).all(axis=2).sum())
        assert near > 2000, f"hardly any {name} plot pixels ({near}): the plots did not render"

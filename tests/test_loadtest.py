"""localcloud/loadtest.py's pure parts: the wrk command, its output, the /metrics deltas."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from localcloud.loadtest import (ENGINES, FRAMEWORKS, LUA_SCRIPT, choose, load_point, main, parse_wrk_output,
                                 server_means, server_setup, table_order, wrk_command)

WRK_STDOUT = """Running 2s test @ http://127.0.0.1:1/classify
  1 threads and 4 connections
LOADTEST_JSON {"requests": 300, "duration_us": 2000000, "bytes": 1000, "errors": {"connect": 0, "read": 0, \
"write": 0, "status": 2, "timeout": 1}, "latency_us": {"mean": 9000.0, "max": 40000, "p50": 8000, "p90": 12000, \
"p95": 15000, "p99": 30000}}
"""


def test_wrk_command_uses_the_lua_script_and_at_most_one_thread_per_connection():
    command = wrk_command("http://x/classify", connections=1, duration_s=2.5, threads=2)
    assert command[:4] == ["wrk", "-t1", "-c1", "-d2.5s"] and str(LUA_SCRIPT) in command
    assert LUA_SCRIPT.is_file() and "latency:percentile(95)" in LUA_SCRIPT.read_text()


def test_the_json_line_of_the_lua_script_becomes_a_load_point():
    wrk = parse_wrk_output(WRK_STDOUT)
    facts = {"precision": "f32", "engine_version": "1", "web_framework": "fastapi 0.1/uvicorn 0.2"}
    point = load_point("openvino", "fastapi", facts, server_setup("fastapi", 8), 4, 2.0, wrk,
                       {"mean_batch": 2.0, "server_total_ms": 5.0, "server_inference_ms": 1.0})
    assert point.requests_per_s == 150.0 and (point.p50_ms, point.p95_ms, point.p99_ms) == (8.0, 15.0, 30.0)
    assert point.errors == 3 and point.mean_batch == 2.0
    assert (point.framework, point.web_framework) == ("fastapi", "fastapi 0.1/uvicorn 0.2")
    assert point.server.startswith("uvicorn: 1 process") and server_setup("flask", 8).startswith("gunicorn: 1 worker")


def test_server_means_come_from_histogram_deltas():
    classify = (("source", "classify"),)
    total = (("source", "classify"), ("stage", "total"))
    before = {("worker_batch_size_count", classify): 10.0, ("worker_batch_size_sum", classify): 10.0,
              ("worker_stage_seconds_count", total): 10.0, ("worker_stage_seconds_sum", total): 0.1}
    after = {("worker_batch_size_count", classify): 20.0, ("worker_batch_size_sum", classify): 50.0,
             ("worker_stage_seconds_count", total): 50.0, ("worker_stage_seconds_sum", total): 0.9}
    means = server_means(before, after)
    assert means["mean_batch"] == 4.0 and abs(means["server_total_ms"] - 20.0) < 1e-9
    assert means["server_inference_ms"] is None


def test_both_frameworks_by_default_and_the_table_groups_engine_framework_connections():
    [frameworks] = [p for p in main.params if p.name == "frameworks"]
    assert choose(frameworks.default, FRAMEWORKS, "--frameworks") == ["flask", "fastapi"]
    assert choose(" fastapi, flask,fastapi", FRAMEWORKS, "--frameworks") == ["fastapi", "flask"]
    for wrong in ("django", ""):
        with pytest.raises(click.BadParameter):
            choose(wrong, FRAMEWORKS, "--frameworks")
    wrk = parse_wrk_output(WRK_STDOUT)
    facts = {"precision": "f32", "engine_version": "1", "web_framework": "x"}
    measured = {"mean_batch": 1.0, "server_total_ms": 1.0, "server_inference_ms": 1.0}
    # measured as run_engine does: at each connection count, the frameworks in turn
    points = [load_point(engine, framework, facts, "s", count, 2.0, wrk, measured)
              for engine in ("tensorflow", "openvino") for count in (16, 1) for framework in ("fastapi", "flask")]
    ordered = table_order(points, ["openvino", "tensorflow"], ["flask", "fastapi"], [1, 16])
    assert [(p.engine, p.framework, p.connections) for p in ordered[:4]] == [
        ("openvino", "flask", 1), ("openvino", "flask", 16), ("openvino", "fastapi", 1), ("openvino", "fastapi", 16)]


def test_an_unknown_framework_or_engine_is_refused_before_anything_starts(tmp_path):
    result = CliRunner().invoke(main, ["--frameworks", "flask,django", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--frameworks" in result.output and "django" in result.output
    result = CliRunner().invoke(main, ["--engines", "onnx", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--engines" in result.output and "openvino" in result.output
    assert set(ENGINES) >= {"openvino", "tensorflow"} and list(tmp_path.iterdir()) == []

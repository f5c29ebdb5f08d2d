"""localcloud/loadtest.py's pure parts: the wrk command, its output, the /metrics deltas."""

from __future__ import annotations

from localcloud.loadtest import LUA_SCRIPT, load_point, parse_wrk_output, server_means, wrk_command

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
    facts = {"precision": "f32", "engine_version": "1", "web_framework": "flask/gunicorn"}
    point = load_point("openvino", facts, "1 worker", 4, 2.0, wrk, {"mean_batch": 2.0, "server_total_ms": 5.0,
                                                                    "server_inference_ms": 1.0})
    assert point.requests_per_s == 150.0 and (point.p50_ms, point.p95_ms, point.p99_ms) == (8.0, 15.0, 30.0)
    assert point.errors == 3 and point.mean_batch == 2.0


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

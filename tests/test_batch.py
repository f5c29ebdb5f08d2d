"""The batch runner's ack/nack policy with in-memory fakes (the real servers are in test_*_stack.py)."""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from worker.batch import BatchRunner, Delivery, PermanentError, Tables
from worker.engines.base import EngineInfo
from modelspec.preprocess import DecodeLimits
from worker.sink import InsertOutcome
from tests.helpers import png_bytes

MANIFEST = {"name": "demo", "version": "7", "class_names": ["grass", "moon"], "threshold": 0.5,
            "input": {"name": "image", "shape": [None, 128, 128, 1], "dtype": "float32"}}


class FakeEngine:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.batches: list[int] = []

    def infer(self, batch):
        if self.fail:
            raise RuntimeError("engine exploded")
        self.batches.append(len(batch))
        return ((batch.mean(axis=(1, 2, 3)) - 0.5).astype(np.float32) * 10)[:, None]  # (n, 1 unit)

    def describe(self):
        return EngineInfo("fake", "1.0", "CPU", "f32", "openvino_fp32")


class FakeFetcher:
    def __init__(self, objects: dict):
        self.objects = objects
        self.fetched: list[str] = []

    def fetch(self, job):
        self.fetched.append(job.name)
        value = self.objects[job.name]
        if isinstance(value, Exception):
            raise value
        return value


class FakeSink:
    def __init__(self, reject: set[str] = frozenset(), down: bool = False):
        self.reject, self.down = reject, down
        self.tables: dict[str, list[dict]] = {}

    def insert(self, table, rows):
        if self.down:
            return InsertOutcome({i: "insert failed: 503" for i in range(len(rows))})
        outcome = InsertOutcome({i: "rejected" for i, row in enumerate(rows) if row["event_key"] in self.reject})
        self.tables.setdefault(table, []).extend(r for i, r in enumerate(rows) if i not in outcome.failed)
        return outcome


class Recorder:
    def __init__(self):
        self.acked: list[str] = []
        self.nacked: list[str] = []

    def delivery(self, name: str, size: int | None = 100, data: bytes | None = None) -> Delivery:
        body = data if data is not None else json.dumps({
            "event_key": f"b/{name}#1", "bucket": "b", "name": name, "generation": "1", "size": size,
            "time_created": "2026-11-22T22:00:00Z", "function_received_at": "2026-11-22T22:00:00.100000+00:00",
            "metadata": {"run_id": "r"}}).encode()
        return Delivery(data=body, message_id=f"m-{name}", delivery_attempt=1,
                        received_at=dt.datetime.now(dt.timezone.utc), received_monotonic=time.monotonic(),
                        ack=lambda: self.acked.append(name), nack=lambda: self.nacked.append(name))


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def runner(pool, objects, engine=None, sink=None, limits=DecodeLimits()):
    return BatchRunner(engine=engine or FakeEngine(), manifest=MANIFEST, fetcher=FakeFetcher(objects),
                       sink=sink or FakeSink(), tables=Tables("p.d.results", "p.d.errors"), limits=limits,
                       machine_row={"worker_host": "h"}, sample_system=lambda: {"cpu_percent": 1.0},
                       io_pool=pool)


def white_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def test_good_images_become_result_rows_in_one_inference_call_and_are_acked(pool):
    sink, engine, rec = FakeSink(), FakeEngine(), Recorder()
    batch_runner = runner(pool, {"a.png": white_png(), "b.png": png_bytes(1)}, engine=engine, sink=sink)

    report = batch_runner.run([rec.delivery("a.png"), rec.delivery("b.png")])

    assert report.results == 2 and report.errors == 0 and report.retried == 0
    assert engine.batches == [2]
    assert sorted(rec.acked) == ["a.png", "b.png"] and rec.nacked == []
    rows = {r["object_name"]: r for r in sink.tables["p.d.results"]}
    assert rows["a.png"]["label"] == "moon" and rows["a.png"]["score"] > 0.99  # white -> logit +5
    assert rows["a.png"]["batch_size"] == 2
    assert rows["a.png"]["inference_ms"] == pytest.approx(rows["a.png"]["batch_inference_ms"] / 2)
    assert rows["a.png"]["function_to_worker_ms"] > 0 and rows["a.png"]["run_id"] == "r"
    assert rows["a.png"]["cold"] is True
    batch_runner._fetcher.objects["c.png"] = png_bytes(3)
    batch_runner.run([rec.delivery("c.png")])
    assert sink.tables["p.d.results"][-1]["cold"] is False


def test_bad_input_becomes_one_error_row_and_is_acked_without_retry(pool):
    sink, rec = FakeSink(), Recorder()
    objects = {"doc.pdf": b"%PDF-1.4", "gone.png": PermanentError("object_not_found", "deleted"),
               "ok.png": png_bytes(2), "huge.png": png_bytes(3)}
    report = runner(pool, objects, sink=sink, limits=DecodeLimits(max_bytes=10_000)).run(
        [rec.delivery("doc.pdf"), rec.delivery("gone.png"), rec.delivery("ok.png"),
         rec.delivery("huge.png", size=50_000), rec.delivery("junk", data=b"\xff not json")])

    reasons = {r["object_name"] or r["event_key"]: r["reason"] for r in sink.tables["p.d.errors"]}
    assert reasons == {"doc.pdf": "not_an_image", "gone.png": "object_not_found", "huge.png": "too_many_bytes",
                       "message:m-junk": "malformed_job"}
    assert report.results == 1 and report.errors == 4
    assert sorted(rec.acked) == ["doc.pdf", "gone.png", "huge.png", "junk", "ok.png"] and rec.nacked == []


def test_transient_download_failures_are_nacked_and_write_nothing(pool):
    sink, rec = FakeSink(), Recorder()
    report = runner(pool, {"a.png": ConnectionError("reset"), "b.png": png_bytes(4)}, sink=sink).run(
        [rec.delivery("a.png"), rec.delivery("b.png")])
    assert rec.nacked == ["a.png"] and rec.acked == ["b.png"] and report.retried == 1
    assert [r["object_name"] for r in sink.tables["p.d.results"]] == ["b.png"]


def test_only_rows_the_sink_accepted_are_acked(pool):
    rec = Recorder()
    sink = FakeSink(reject={"b/b.png#1"})
    runner(pool, {"a.png": png_bytes(5), "b.png": png_bytes(6)}, sink=sink).run(
        [rec.delivery("a.png"), rec.delivery("b.png")])
    assert rec.acked == ["a.png"] and rec.nacked == ["b.png"]


def test_a_sink_outage_nacks_every_message_including_error_rows(pool):
    rec = Recorder()
    report = runner(pool, {"a.png": png_bytes(7), "doc.pdf": b"%PDF"}, sink=FakeSink(down=True)).run(
        [rec.delivery("a.png"), rec.delivery("doc.pdf")])
    assert rec.acked == [] and sorted(rec.nacked) == ["a.png", "doc.pdf"]
    assert report.results == report.errors == 0 and report.retried == 2


def test_an_engine_failure_is_retried_not_blamed_on_the_images(pool):
    rec, sink = Recorder(), FakeSink()
    runner(pool, {"a.png": png_bytes(8)}, engine=FakeEngine(fail=True), sink=sink).run([rec.delivery("a.png")])
    assert rec.nacked == ["a.png"] and rec.acked == [] and sink.tables == {}


def test_copies_of_one_event_give_one_row_and_every_copy_is_acked(pool):
    rec, sink, engine = Recorder(), FakeSink(), FakeEngine()
    batch_runner = runner(pool, {"a.png": png_bytes(9)}, engine=engine, sink=sink)

    first = batch_runner.run([rec.delivery("a.png"), rec.delivery("a.png"), rec.delivery("a.png")])
    later = batch_runner.run([rec.delivery("a.png")])  # a redelivery after the row was written

    assert engine.batches == [1] and len(sink.tables["p.d.results"]) == 1
    assert rec.acked == ["a.png"] * 4 and rec.nacked == []
    assert (first.results, first.duplicates, later.results, later.duplicates) == (1, 2, 0, 1)


def test_a_failed_row_is_not_remembered_so_its_redelivery_is_processed_again(pool):
    rec, sink = Recorder(), FakeSink(down=True)
    batch_runner = runner(pool, {"a.png": png_bytes(10)}, sink=sink)
    batch_runner.run([rec.delivery("a.png")])
    sink.down = False
    batch_runner.run([rec.delivery("a.png")])
    assert rec.nacked == ["a.png"] and rec.acked == ["a.png"] and len(sink.tables["p.d.results"]) == 1


def test_the_last_delivery_attempt_turns_a_transient_failure_into_an_error_row(pool):
    rec, sink = Recorder(), FakeSink()
    batch_runner = BatchRunner(engine=FakeEngine(), manifest=MANIFEST,
                               fetcher=FakeFetcher({"a.png": TimeoutError("read timed out"), "b.png": TimeoutError("x")}),
                               sink=sink, tables=Tables("p.d.results", "p.d.errors"), limits=DecodeLimits(),
                               machine_row={}, sample_system=dict, io_pool=pool, max_delivery_attempts=5)
    early, last = rec.delivery("a.png"), rec.delivery("b.png")
    early.delivery_attempt, last.delivery_attempt = 4, 5

    batch_runner.run([early, last])

    assert rec.nacked == ["a.png"] and rec.acked == ["b.png"]
    [row] = sink.tables["p.d.errors"]
    assert row["reason"] == "retries_exhausted" and "read timed out" not in row["message"] and "5" in row["message"]


class SlowFetcher(FakeFetcher):
    """Each download takes a known time, so stage timings have something to add up."""

    def fetch(self, job):
        time.sleep(0.02 if job.name == "slow.png" else 0.005)
        return super().fetch(job)


class SlowEngine(FakeEngine):
    def infer(self, batch):
        time.sleep(0.03)
        return super().infer(batch)


def test_each_rows_stages_add_up_to_its_total_and_the_batch_row_carries_the_sink_time(pool):
    rec, sink = Recorder(), FakeSink()
    reports = []
    batch_runner = BatchRunner(
        engine=SlowEngine(), manifest=MANIFEST,
        fetcher=SlowFetcher({"slow.png": png_bytes(1), "fast.png": png_bytes(2), "x.png": png_bytes(3)}),
        sink=sink, tables=Tables("p.d.results", "p.d.errors", batches="p.d.batches"), limits=DecodeLimits(),
        machine_row={"worker_host": "h"}, sample_system=lambda: {"cpu_percent": 1.0}, io_pool=pool,
        observers=[reports.append])
    time.sleep(0.01)  # some queueing before the batch starts
    report = batch_runner.run([rec.delivery("slow.png"), rec.delivery("fast.png"), rec.delivery("x.png")])

    rows = sink.tables["p.d.results"]
    assert len(rows) == 3 and reports == [report] and report.result_rows == rows
    for row in rows:
        stages = (row["queue_ms"] + row["download_ms"] + row["preprocess_ms"] + row["batch_wait_ms"]
                  + row["batch_inference_ms"])
        assert row["total_ms"] >= 40.0
        assert abs(stages - row["total_ms"]) <= 0.05 * row["total_ms"], row
        assert row["batch_id"] == report.batch_id
    by_name = {row["object_name"]: row for row in rows}
    # The fast image waited for the slow one: that wait is its batch_wait, not its download.
    assert by_name["fast.png"]["batch_wait_ms"] > by_name["slow.png"]["batch_wait_ms"] + 5
    assert by_name["fast.png"]["inference_ms"] == pytest.approx(by_name["fast.png"]["batch_inference_ms"] / 3)
    [batch_row] = sink.tables["p.d.batches"]
    assert (batch_row["batch_id"], batch_row["images"], batch_row["results"]) == (report.batch_id, 3, 3)
    assert batch_row["sink_ms"] == report.sink_ms and batch_row["inference_ms"] >= 30.0


def test_an_observer_that_raises_costs_no_row(pool):
    rec, sink = Recorder(), FakeSink()

    def broken(_report):
        raise RuntimeError("metrics backend down")

    batch_runner = runner(pool, {"a.png": png_bytes(1)}, sink=sink)
    batch_runner.add_observer(broken)
    report = batch_runner.run([rec.delivery("a.png")])
    assert report.results == 1 and rec.acked == ["a.png"]


def test_next_batch_fills_up_to_the_limit_then_stops_waiting():
    import queue

    from worker.microbatch import next_batch

    source: queue.Queue[int] = queue.Queue()
    assert next_batch(source, 4, 0.01, first_wait_s=0.01) == []
    for value in range(6):
        source.put(value)
    assert next_batch(source, 4, 1.0) == [0, 1, 2, 3]
    started = time.monotonic()
    assert next_batch(source, 4, 0.05) == [4, 5]  # a partial batch after at most max_wait_s
    assert time.monotonic() - started < 0.5

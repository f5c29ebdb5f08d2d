"""Group commit: concurrent inserts share one streaming insert, each caller gets its own outcome."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from worker.sink import CoalescingSink, InsertOutcome, insert_id


class RecordingSink:
    def __init__(self, reject: set[str] = frozenset(), delay_s: float = 0.05, explode: bool = False):
        self.calls: list[list[str]] = []
        self.reject, self.delay_s, self.explode = reject, delay_s, explode
        self.lock = threading.Lock()

    def insert(self, table, rows):
        time.sleep(self.delay_s)
        if self.explode:
            raise ConnectionError("socket closed")
        with self.lock:
            self.calls.append([row["event_key"] for row in rows])
        return InsertOutcome({i: "bad row" for i, row in enumerate(rows) if row["event_key"] in self.reject})


def rows(prefix: str, count: int) -> list[dict]:
    return [{"event_key": f"{prefix}{i}"} for i in range(count)]


def test_concurrent_inserts_are_merged_and_each_caller_sees_only_its_own_failures():
    inner = RecordingSink(reject={"c1", "f0"})
    sink = CoalescingSink(inner, max_rows=500)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda p: sink.insert("t", rows(p, 3)), "abcdefgh"))
    assert sum(len(call) for call in inner.calls) == 24
    assert len(inner.calls) < 8, "no two inserts were merged"
    failed = {prefix: outcome.failed for prefix, outcome in zip("abcdefgh", outcomes)}
    assert failed["c"] == {1: "bad row"} and failed["f"] == {0: "bad row"}
    assert all(not failed[p] for p in "abdegh")


def test_a_group_never_exceeds_max_rows():
    inner = RecordingSink(delay_s=0.02)
    sink = CoalescingSink(inner, max_rows=10)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: sink.insert("t", rows(p, 4)), "abcdefgh"))
    assert max(len(call) for call in inner.calls) <= 10
    assert sorted(key for call in inner.calls for key in call) == sorted(f"{p}{i}" for p in "abcdefgh" for i in range(4))


def test_an_exception_in_the_insert_fails_every_row_of_the_group_instead_of_hanging():
    sink = CoalescingSink(RecordingSink(explode=True))
    outcome = sink.insert("t", rows("a", 2))
    assert set(outcome.failed) == {0, 1} and "socket closed" in outcome.failed[0]


def test_submit_does_not_wait_and_reports_through_its_callback():
    done = threading.Event()
    seen = []
    sink = CoalescingSink(RecordingSink(delay_s=0.2), linger_by_table={"batches": 0.1})
    started = time.perf_counter()
    sink.submit("batches", rows("b", 1), lambda outcome: (seen.append(outcome.ok), done.set()))
    assert time.perf_counter() - started < 0.05
    assert done.wait(5) and seen == [True]


def test_tables_are_written_separately():
    inner = RecordingSink(delay_s=0.0)
    sink = CoalescingSink(inner)
    sink.insert("results", rows("r", 2))
    sink.insert("errors", rows("e", 1))
    assert inner.calls == [["r0", "r1"], ["e0"]]


def test_long_event_keys_are_hashed_to_a_valid_insert_id():
    assert insert_id("short") == "short"
    long_id = insert_id("k" * 200)
    assert long_id.startswith("sha256:") and len(long_id) <= 128

"""Fault injection on the real local stack: every upload must end as exactly one result row or
one error row in the de-duplicated views, whatever goes wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from localcloud import services
from tests.bad_inputs import awkward_valid_inputs, bad_inputs
from tests.helpers import (IsolatedWorker, demo_images, new_run_id, png_bytes, upload, upload_many,
                           wait_for_keys)

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MAX_BYTES = 1024 * 1024


def report(title: str, uploaded: int, counts: dict) -> None:
    """One line per fault for the README table (shown with pytest -s)."""
    lost = uploaded - counts["results"] - counts["errors"]
    duplicated = counts["result_rows"] + counts["error_rows"] - counts["results"] - counts["errors"]
    print(f"\nFAULT | {title} | {uploaded} | {counts['results']} | {counts['errors']} | {lost} | "
          f"{counts['in_both']} in both views, {duplicated} extra raw rows")


def test_bad_inputs_mixed_into_good_uploads_each_end_as_one_row(stack):
    worker = IsolatedWorker(stack, "corpus", WORKER_MAX_IMAGE_BYTES=str(MAX_BYTES))
    worker.start()
    run_id = new_run_id()
    prefix = f"{stack.config.prefix}{run_id}/"
    bad = bad_inputs()
    good = awkward_valid_inputs() + [(path.name, path.read_bytes()) for _, path in demo_images(per_class=10)]
    try:
        upload_many(stack, [(prefix + name, data) for name, data, _ in bad] + [(prefix + n, d) for n, d in good],
                    run_id)
        counts = worker.wait(run_id, len(bad) + len(good))
        report(f"{len(bad)} kinds of bad input among {len(good)} good", len(bad) + len(good), counts)

        assert (counts["results"], counts["errors"], counts["in_both"]) == (len(good), len(bad), 0)
        assert counts["result_rows"] == len(good) and counts["error_rows"] == len(bad)
        from localcloud.demo import bigquery_rows
        rows = bigquery_rows(stack.config, f"SELECT object_name, reason, message FROM "
                                           f"`${{project}}.${{dataset}}.{worker.errors_table}`", {})
        reasons = {row["object_name"][len(prefix):]: row["reason"] for row in rows}
        assert reasons == {name: reason for name, _, reason in bad}
        assert all(row["message"] for row in rows)
        assert worker.process() is not None, "the worker died on bad input"
    finally:
        worker.close()


def test_every_event_delivered_three_times_still_gives_one_row_each(stack):
    config = stack.config
    stack.processes.stop("eventarc")
    stack.processes.start(services.eventarc(config, copies=3))
    run_id = new_run_id()
    try:
        items = [(f"{config.prefix}{run_id}/{i}.png", png_bytes(i)) for i in range(40)]
        upload_many(stack, items, run_id)
        counts = wait_for_keys(stack, run_id, len(items))
        time.sleep(2.0)  # let the later copies arrive too
        counts = wait_for_keys(stack, run_id, len(items))
        report("every event delivered 3 times", len(items), counts)
        assert (counts["results"], counts["errors"]) == (len(items), 0)
        assert counts["result_rows"] == len(items), "a duplicate delivery wrote a second row"
        function_log = (config.run_dir / "logs" / "function.log").read_text()
        assert sum(f"{run_id}/0.png#" in line for line in function_log.splitlines()) == 3
    finally:
        stack.processes.stop("eventarc")
        stack.processes.start(services.eventarc(config))


def interrupt_mid_load(worker: IsolatedWorker, count: int, seed: int, after_rows: int, interrupt) -> dict:
    """Upload count images, call interrupt(worker process) once after_rows rows exist, restart the
    worker, and wait for every row. Returns the counts plus what interrupt returned and the rows
    written before the restart."""
    stack = worker.stack
    run_id = new_run_id()
    items = [(f"{stack.config.prefix}{run_id}/{i}.png", png_bytes(seed + i, size=64)) for i in range(count)]
    uploader = threading.Thread(target=upload_many, args=(stack, items, run_id))
    uploader.start()
    deadline = time.monotonic() + 60
    while worker.counts(run_id)["results"] < after_rows and time.monotonic() < deadline:
        time.sleep(0.2)
    outcome = interrupt(worker.process())
    done_before_restart = worker.counts(run_id)["results"]
    stack.processes.pid_file(worker.name).unlink(missing_ok=True)
    uploader.join()
    worker.start()
    counts = worker.wait(run_id, count, timeout_s=180)
    assert 0 < done_before_restart < count, "the interruption did not land in the middle of the load"
    return {**counts, "outcome": outcome, "done_before_restart": done_before_restart}


def test_worker_killed_mid_load_then_restarted_loses_nothing(stack):
    def kill(process):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    worker = IsolatedWorker(stack, "kill")
    worker.start()
    try:
        counts = interrupt_mid_load(worker, 500, seed=1000, after_rows=100, interrupt=kill)
        report(f"worker SIGKILLed after {counts['done_before_restart']} rows, restarted", 500, counts)
        assert (counts["results"], counts["errors"], counts["in_both"]) == (500, 0, 0)
    finally:
        worker.close()


def test_sigterm_mid_load_stops_cleanly_and_a_restart_loses_nothing(stack):
    """The instance group's stop: SIGTERM ends pulling, lets batches in flight finish, returns the
    queued messages, and exits 0 within WORKER_SHUTDOWN_TIMEOUT_S."""
    def terminate(process):
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        return process.wait(30), time.monotonic() - started

    worker = IsolatedWorker(stack, "term", WORKER_SHUTDOWN_TIMEOUT_S="15")
    worker.start()
    try:
        counts = interrupt_mid_load(worker, 400, seed=3000, after_rows=80, interrupt=terminate)
        exit_code, took_s = counts["outcome"]
        report(f"worker SIGTERMed after {counts['done_before_restart']} rows (exit {exit_code} in {took_s:.1f} s), "
               "restarted", 400, counts)
        assert exit_code == 0 and took_s < 15 + 5
        assert (counts["results"], counts["errors"], counts["in_both"]) == (400, 0, 0)
        assert counts["result_rows"] == 400, "a message finished before the stop was written again"
        assert "queued messages returned for redelivery" in stack.processes.log_file(worker.name).read_text()
    finally:
        worker.close()


def test_bigquery_down_for_ten_seconds_mid_load_loses_nothing(stack):
    config = stack.config
    run_id = new_run_id()
    items = [(f"{config.prefix}{run_id}/{i}.png", png_bytes(2000 + i, size=64)) for i in range(300)]
    uploader = threading.Thread(target=upload_many, args=(stack, items, run_id), kwargs={"threads": 2})
    uploader.start()
    deadline = time.monotonic() + 60
    while wait_for_keys(stack, run_id, 1, timeout_s=0)["results"] < 30 and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.processes.stop("bigquery")
    time.sleep(10.0)
    stack.processes.start(services.bigquery(config))
    uploader.join()
    counts = wait_for_keys(stack, run_id, len(items), timeout_s=180)
    report("BigQuery emulator stopped 10 s mid-load", len(items), counts)
    assert (counts["results"], counts["errors"], counts["in_both"]) == (len(items), 0, 0)
    assert stack.processes.process("worker") is not None, "the worker died during the outage"


def test_objects_deleted_or_replaced_before_download_get_error_rows(stack):
    from worker.clients import storage_client

    worker = IsolatedWorker(stack, "gone")
    run_id = new_run_id()
    prefix = f"{stack.config.prefix}{run_id}/"
    try:
        generations = upload_many(stack, [(f"{prefix}{i}.png", png_bytes(3000 + i)) for i in range(20)], run_id)
        bucket = storage_client(stack.config.project, stack.config.client_env()).bucket(stack.config.bucket)
        for i in range(5):
            bucket.blob(f"{prefix}{i}.png").delete()
        for i in range(5, 10):  # replaced: the job for the first generation finds it gone
            upload(stack, f"{prefix}{i}.png", png_bytes(4000 + i), run_id)
        worker.start()
        counts = worker.wait(run_id, 25)
        report("5 objects deleted and 5 replaced before download", 25, counts)
        assert (counts["results"], counts["errors"], counts["in_both"]) == (15, 10, 0)
        assert len(generations) == 20
    finally:
        worker.close()


def test_retries_run_out_into_an_error_row_and_dead_letters_can_be_listed_and_replayed(stack):
    """Downloads fail (storage unreachable for this worker): after the last attempt the worker
    writes a retries_exhausted error row. A job whose error row cannot be written either goes to
    the dead-letter topic, where the CLI lists, explains and replays it."""
    from worker.clients import publisher_client, subscriber_client

    config = stack.config
    run_id = new_run_id()
    broken = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "WORKER_DOWNLOAD_TIMEOUT_S": "0.5"}
    worker = IsolatedWorker(stack, "retry", dead_letter_topic=config.topic_path(config.dead_letter_topic),
                            **broken)
    worker.start()
    try:
        upload(stack, f"{config.prefix}{run_id}/unreachable.png", png_bytes(5), run_id)
        counts = worker.wait(run_id, 1, timeout_s=90)
        assert (counts["results"], counts["errors"]) == (0, 1)
    finally:
        worker.close()

    # A job in the dead letters, as the subscription's dead-letter policy leaves it.
    job = {"event_key": f"{config.bucket}/{config.prefix}{run_id}/dead.png#1", "bucket": config.bucket,
           "name": f"{config.prefix}{run_id}/dead.png", "generation": "1", "metadata": {"run_id": run_id}}
    upload(stack, job["name"], png_bytes(6), run_id)  # the main worker classifies the real upload
    publisher = publisher_client(config.client_env())
    publisher.publish(config.topic_path(config.dead_letter_topic), json.dumps(job).encode(),
                      CloudPubSubDeadLetterSourceDeliveryCount="5").result(timeout=10)
    env = {**os.environ, **config.client_env()}
    listed = subprocess.run([sys.executable, "-m", "worker.deadletter", "list"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"{run_id}/dead.png#1" in listed.stdout.replace("\n", "")
    explained = subprocess.run([sys.executable, "-m", "worker.deadletter", "explain"], env=env,
                               capture_output=True, text=True, timeout=60)
    assert "object_not_found" in explained.stdout.replace("\n", " ").replace("│", " ")
    replayed = subprocess.run([sys.executable, "-m", "worker.deadletter", "replay"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert "replayed" in replayed.stdout and replayed.returncode == 0
    # In the main tables: both real uploads were classified by the main worker, and the replayed
    # job (generation 1 never existed) became an object_not_found error row.
    counts = wait_for_keys(stack, run_id, 3, timeout_s=60)
    assert (counts["results"], counts["errors"]) == (2, 1)
    remaining = subscriber_client(config.client_env()).pull(
        subscription=config.subscription_path(config.dead_letter_subscription), max_messages=10, timeout=5)
    assert not any(run_id.encode() in m.message.data for m in remaining.received_messages)

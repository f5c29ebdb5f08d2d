"""Faults on the event path (storage notification -> Eventarc stand-in -> function), on the real stack.

- a message that the stand-in or the function cannot handle is settled on the Eventarc
  dead-letter topic, and every good upload around it still gets its row;
- a stack process that dies is restarted by the supervisor, and `localcloud status` says so;
- the trigger down long enough to lose events: `python -m worker reconcile --republish` finds the
  uploads without a row and recovers them, exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import new_run_id, png_bytes, upload, upload_many, wait_for_keys

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _dead_lettered(stack, run_id: str, expected: int, timeout_s: float = 60.0) -> list:
    """Messages tagged with run_id on the Eventarc dead-letter hold subscription."""
    from worker.clients import subscriber_client

    config = stack.config
    subscriber = subscriber_client(config.client_env())
    subscription = config.subscription_path(config.eventarc_dead_letter_subscription)
    found, deadline = {}, time.monotonic() + timeout_s
    while len(found) < expected and time.monotonic() < deadline:
        response = subscriber.pull(request={"subscription": subscription, "max_messages": 50}, timeout=10)
        ours = [m for m in response.received_messages if m.message.attributes.get("test_run") == run_id]
        for received in ours:
            found[received.message.data] = received.message
        if ours:
            subscriber.acknowledge(request={"subscription": subscription, "ack_ids": [m.ack_id for m in ours]})
        if len(found) < expected:
            time.sleep(0.5)
    return list(found.values())


def test_a_message_nothing_can_handle_is_dead_lettered_and_the_good_ones_around_it_get_rows(stack):
    from worker.clients import publisher_client

    config = stack.config
    run_id = new_run_id()
    eventarc_pid = stack.processes.process("eventarc").pid
    publisher = publisher_client(config.client_env())
    topic = config.topic_path(config.notifications_topic)
    good = [(f"{config.prefix}{run_id}/good-{i}.png", png_bytes(seed=300 + i)) for i in range(6)]

    upload_many(stack, good[:3], run_id)
    # Not a storage notification at all: the stand-in cannot turn it into a CloudEvent.
    publisher.publish(topic, b"not json", eventType="OBJECT_FINALIZE", test_run=run_id).result(timeout=30)
    # A notification of an object without a generation: the function refuses it with 400.
    broken = {"bucket": config.bucket, "name": f"{config.prefix}{run_id}/broken.png", "metadata": {"run_id": run_id}}
    publisher.publish(topic, json.dumps(broken).encode(), eventType="OBJECT_FINALIZE", bucketId=config.bucket,
                      objectId=broken["name"], payloadFormat="JSON_API_V1", test_run=run_id).result(timeout=30)
    upload_many(stack, good[3:], run_id)

    counts = wait_for_keys(stack, run_id, expected=len(good), timeout_s=90)
    settled = _dead_lettered(stack, run_id, expected=2)

    assert counts["results"] + counts["errors"] == len(good)
    assert counts["result_rows"] + counts["error_rows"] == len(good)  # nothing doubled
    assert sorted(m.data for m in settled) == sorted([b"not json", json.dumps(broken).encode()])
    assert all(int(m.attributes["CloudPubSubDeadLetterSourceDeliveryCount"]) == config.max_delivery_attempts
               for m in settled)
    assert stack.processes.process("eventarc").pid == eventarc_pid, "the stand-in died on a bad message"
    log = stack.processes.log_file("eventarc").read_text()
    assert "is not a Cloud Storage notification" in log and "function answered 400" in log


def _status(stack) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCAL_RUN_DIR": str(stack.config.run_dir)}
    return subprocess.run([sys.executable, "-m", "localcloud", "status"], env=env, capture_output=True, text=True,
                          timeout=60)


def _wait_restarted(stack, name: str, old_pid: int, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process = stack.processes.process(name)
        if process is not None and process.pid != old_pid:
            return process
        time.sleep(0.2)
    pytest.fail(f"{name} was not restarted within {timeout_s:.0f} s:\n{stack.processes.tail('supervisor')}")


def test_a_stack_process_that_dies_is_restarted_and_reported(stack):
    config = stack.config
    old = stack.processes.process("function")
    run_id = new_run_id()

    os.killpg(old.pid, signal.SIGKILL)
    _wait_restarted(stack, "function", old.pid)
    name = f"{config.prefix}{run_id}/after-restart.png"
    upload(stack, name, png_bytes(seed=5), run_id)
    counts = wait_for_keys(stack, run_id, expected=1, timeout_s=90)
    status = _status(stack)

    assert counts["results"] == 1 and counts["result_rows"] == 1
    assert status.returncode == 0, status.stderr
    assert "RESTARTED" in status.stderr and "function" in status.stderr


def test_a_dead_process_is_reported_loudly_with_its_log(stack):
    """With the supervisor held back, a dead service is DOWN in status, with its log, exit code 1."""
    supervisor = stack.processes.process("supervisor")
    os.kill(supervisor.pid, signal.SIGSTOP)
    try:
        victim = stack.processes.process("eventarc")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        status = _status(stack)
    finally:
        os.kill(supervisor.pid, signal.SIGCONT)
    _wait_restarted(stack, "eventarc", victim.pid)

    assert status.returncode == 1
    assert "DOWN" in status.stderr and "eventarc" in status.stderr
    assert "delivering" in status.stderr  # the last lines of its log
    assert "reconcile --republish" in status.stderr


def _reconcile(stack, *args: str) -> subprocess.CompletedProcess:
    config = stack.config
    env = {**os.environ, **config.client_env(),
           "WORKER_RESULTS_TABLE": config.table_id(config.results_table),
           "WORKER_ERRORS_TABLE": config.table_id(config.errors_table),
           "JOBS_TOPIC": config.topic_path(config.jobs_topic)}
    return subprocess.run([sys.executable, "-m", "worker", "reconcile", "--bucket", config.bucket, *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_trigger_down_mid_load_then_reconcile_republish_recovers_every_upload_once(stack):
    """Uploads go on while the Eventarc stand-in is killed and its trigger subscription is gone
    (what a trigger outage longer than Pub/Sub's retention does): those events are lost. Then one
    reconcile --republish finds exactly the uploads without a row and recovers each once."""
    import threading

    from localcloud.resources import create_pubsub
    from tests.test_faults_stack import report
    from worker.clients import subscriber_client

    config = stack.config
    run_id = new_run_id()
    prefix = f"{config.prefix}{run_id}/"
    items = [(f"{prefix}img-{i:03d}.png", png_bytes(seed=2000 + i)) for i in range(60)]
    uploaded: list[str] = []
    phase = threading.Event()

    def uploader():
        for index, (name, data) in enumerate(items):
            upload(stack, name, data, run_id)
            uploaded.append(name)
            if index == 19:
                phase.set()
                while phase.is_set():  # hold until the trigger is down
                    time.sleep(0.05)
            time.sleep(0.05)

    thread = threading.Thread(target=uploader)
    thread.start()
    assert phase.wait(60)
    subscriber = subscriber_client(config.client_env())
    subscriber.delete_subscription(subscription=config.subscription_path(config.eventarc_subscription))
    victim = stack.processes.process("eventarc")
    os.killpg(victim.pid, signal.SIGKILL)
    phase.clear()  # uploads 20..39 happen while the trigger is down
    while len(uploaded) < 40:
        time.sleep(0.05)
    create_pubsub(config)  # the trigger is back (a new, empty subscription)
    thread.join()
    _wait_restarted(stack, "eventarc", victim.pid)

    before = wait_for_keys(stack, run_id, expected=len(items), timeout_s=30)  # settles short of 60
    dry = _reconcile(stack, "--prefix", prefix, "--since", "1h", "--min-age", "0s")
    lost = len(items) - before["results"] - before["errors"]
    assert 0 < lost < len(items), f"no event was lost, so the test shows nothing: {before}"
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1].startswith(f"reconcile: {lost} of {len(items)} uploads"), dry.stdout
    assert len([line for line in dry.stdout.splitlines() if line.startswith(config.bucket + "/")]) == lost

    republished = _reconcile(stack, "--prefix", prefix, "--since", "1h", "--min-age", "0s", "--republish")
    counts = wait_for_keys(stack, run_id, expected=len(items), timeout_s=120)
    again = _reconcile(stack, "--prefix", prefix, "--since", "1h", "--min-age", "0s", "--republish")
    time.sleep(5)  # anything republished twice would land now
    final = wait_for_keys(stack, run_id, expected=len(items), timeout_s=10)
    report(f"Eventarc stand-in killed and its subscription gone mid-load ({lost} events lost); "
           "reconcile --republish", len(items), final)

    assert republished.returncode == 0 and again.returncode == 0, republished.stderr + again.stderr
    assert counts["results"] + counts["errors"] == len(items)
    assert (final["results"] + final["errors"], final["in_both"]) == (len(items), 0)
    assert final["result_rows"] + final["error_rows"] == len(items), "a row was doubled"
    from localcloud.demo import bigquery_rows

    deduped = bigquery_rows(config, "SELECT COUNT(*) AS n FROM `${project}.${dataset}.results_dedup` "
                                    "WHERE run_id = @run_id", {"run_id": run_id})[0]["n"]
    assert deduped == final["results"]

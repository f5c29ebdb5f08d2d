from __future__ import annotations

import datetime as dt
import json

import pytest

from worker.jobs import MalformedJob, parse_job, partial_identity


def job_bytes(**changes) -> bytes:
    body = {"event_key": "b/o.png#5", "bucket": "b", "name": "o.png", "generation": "5", "size": 10,
            "content_type": "image/png", "time_created": "2026-11-22T22:27:04.652711Z",
            "function_received_at": "2026-11-22T22:27:04.700000+00:00", "metadata": {"run_id": "r1"}}
    body.update(changes)
    return json.dumps(body).encode()


def test_parse_job_reads_identity_times_and_run_id():
    job = parse_job(job_bytes())
    assert (job.event_key, job.bucket, job.name, job.generation, job.size) == ("b/o.png#5", "b", "o.png", 5, 10)
    assert job.time_created == dt.datetime(2026, 11, 22, 22, 27, 4, 652711, tzinfo=dt.timezone.utc)
    assert job.run_id == "r1"


@pytest.mark.parametrize("data", [b"not json", b"[1]", job_bytes(generation="g"), job_bytes(event_key="")])
def test_parse_job_rejects_what_is_not_a_job(data):
    with pytest.raises(MalformedJob):
        parse_job(data)


def test_partial_identity_keeps_what_can_be_read():
    assert partial_identity(job_bytes(generation="g"))["name"] == "o.png"
    assert partial_identity(b"garbage") == {}

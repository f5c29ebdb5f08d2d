"""Any object name Cloud Storage accepts ends as exactly one row, through the CLIs users type.

Cloud Storage takes any valid Unicode of 1 to 1,024 UTF-8 bytes except CR and LF. On the way the
name crosses a CloudEvent header (percent-encoded, HTTP binding 1.0.2), the function, a Pub/Sub
message, a media URL and a BigQuery row.
"""

from __future__ import annotations

import subprocess

import pytest

from localcloud.stack import cli_env
from tests.helpers import new_run_id, png_bytes, rows_for_run, upload

pytestmark = [pytest.mark.stack, pytest.mark.slow]

# Names after `<prefix><run id>/`. The CLIs read '#' as a generation and '?', '*', '[' as
# wildcards, and normalise '..' segments, so those go through the Python client as an
# application would send them.
CLI_NAMES = [
    "日本語の画像.png",
    "猫 🐱 emoji 😀.png",
    "combining e\u0301te\u0301 marks.png",
    "right-to-left שלום عربي.png",
    "quotes \"double\" 'single'.png",
    "back\\slash.png",
    "pct%2Fslash 100%.png",
    "plus+sign & amp=1.png",
    "  spaces  around  .png",
    "ñandú tab\tin name.png",
]
CLIENT_NAMES = [
    "weird#1.png",
    "q?x=1&y=2.png",
    "star*and[brackets].png",
    "a/../b/./c.png",
    "../up.png",
    "trailing-dot..png",
]


def _long_name(prefix: str) -> str:
    """A name of exactly 1,024 UTF-8 bytes, the Cloud Storage limit, mostly two-byte characters.

    In segments of at most 200 bytes: fake-gcs-server stores objects as files, and a file name
    can have at most 255 bytes (Cloud Storage itself has no such limit).
    """
    suffix = ".png"
    room = 1024 - len(prefix.encode()) - len(suffix)
    segments, left = [], room
    while left > 0:
        size = min(200, left)  # bytes of this segment, its '/' included when not the last
        body = size - 1 if left - size > 0 else size
        segments.append("é" * (body // 2) + "x" * (body % 2))
        left -= size
    return prefix + "/".join(segments) + suffix


def _cli_upload(stack, tool: str, source, name: str, run_id: str) -> None:
    config = stack.config
    destination = f"gs://{config.bucket}/{name}"
    if tool == "gcloud":
        command = ["gcloud", "storage", "cp", f"--custom-metadata=run_id={run_id}", str(source), destination]
    else:
        command = ["gsutil", "-q", "-h", f"x-goog-meta-run_id:{run_id}", "cp", str(source), destination]
    completed = subprocess.run(command, env={**__import__("os").environ, **cli_env(config)},
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"{tool} cp {name!r}: {completed.stderr[-1500:]}"


def test_every_accepted_name_gets_exactly_one_row_named_as_uploaded(stack, tmp_path):
    run_id = new_run_id()
    base = f"{stack.config.prefix}{run_id}/"
    source = tmp_path / "image.png"
    source.write_bytes(png_bytes(seed=11))
    long_name = _long_name(base)
    assert len(long_name.encode()) == 1024

    uploaded = []
    for index, relative in enumerate(CLI_NAMES):
        name = base + relative
        _cli_upload(stack, "gcloud" if index % 2 == 0 else "gsutil", source, name, run_id)
        uploaded.append(name)
    for name in [base + relative for relative in CLIENT_NAMES] + [long_name]:
        upload(stack, name, source.read_bytes(), run_id)
        uploaded.append(name)

    results, errors = rows_for_run(stack, run_id, expected=len(uploaded), timeout_s=120)

    assert errors == [], [(e["object_name"], e["reason"], e["message"]) for e in errors]
    named = sorted(row["object_name"] for row in results)
    assert named == sorted(uploaded)  # each name once, byte for byte
    for row in results:
        assert row["event_key"] == f"{stack.config.bucket}/{row['object_name']}#{row['generation']}"

"""Helpers for tests on the local stack: make images, upload them, wait for their rows."""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from localcloud.config import REPO_ROOT
from localcloud.demo import bigquery_rows
from localcloud.stack import Stack

DATA = Path(__file__).parent / "data"
DEMO_DATASET = REPO_ROOT / "build" / "demo-dataset"
MODEL_DIR = REPO_ROOT / "build" / "models" / "demo" / "1"


def png_bytes(seed: int = 0, size: int = 96) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def demo_images(per_class: int) -> list[tuple[str, Path]]:
    """(class name, path) pairs from the demo dataset, both classes."""
    pairs = []
    for class_dir in sorted(p for p in DEMO_DATASET.iterdir() if p.is_dir()):
        pairs += [(class_dir.name, path) for path in sorted(class_dir.iterdir())[:per_class]]
    return pairs


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def upload(stack: Stack, name: str, data: bytes, run_id: str, content_type: str = "image/png",
           bucket: str | None = None) -> int:
    """Upload with the Python client (as an application would); returns the generation."""
    from worker.clients import storage_client

    config = stack.config
    client = storage_client(config.project, config.client_env())
    blob = client.bucket(bucket or config.bucket).blob(name)
    blob.metadata = {"run_id": run_id}
    blob.upload_from_string(data, content_type=content_type)
    return blob.generation


def rows_for_run(stack: Stack, run_id: str, expected: int, timeout_s: float = 60.0) -> tuple[list[dict], list[dict]]:
    """Wait until results + errors for the run reach expected (or the timeout); return both."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = bigquery_rows(stack.config, "SELECT * FROM `${project}.${dataset}.results` WHERE run_id = @run_id",
                                {"run_id": run_id})
        errors = bigquery_rows(stack.config, "SELECT * FROM `${project}.${dataset}.errors` WHERE run_id = @run_id",
                               {"run_id": run_id})
        if len(results) + len(errors) >= expected or time.monotonic() > deadline:
            return results, errors
        time.sleep(0.3)


def load_json(name: str):
    return json.loads((DATA / name).read_text())

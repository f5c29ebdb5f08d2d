"""Fixtures: the real local stack on free ports, started once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcloud.config import StackConfig
from localcloud.stack import Stack
from tests.helpers import MODEL_DIR


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "manifest.json").is_file():
        pytest.fail(f"no demo model at {MODEL_DIR}: run `make model` (make test does it for you)")
    return MODEL_DIR


@pytest.fixture(scope="session")
def stack(tmp_path_factory, model_dir) -> Stack:
    """The whole stack, worker included, on ports nobody else uses (a `make up` may be running)."""
    config = StackConfig.with_free_ports(tmp_path_factory.mktemp("stack"), model_dir=model_dir, worker_batch_size=8)
    stack = Stack(config)
    stack.up()
    yield stack
    stack.down()

"""The job contract (functions/storage_job.py), loaded by file path.

Why not a copy, and why not move it into this package: there must be one source for the job a
finalized upload becomes, or `reconcile` could republish jobs that differ from the Cloud
Function's. The function is deployed from functions/ as is (that directory is its whole source),
so the module has to live there, and functions/ is not a package the worker can import. The
module is standard library only; the worker images copy it to /app/functions/storage_job.py, the
same place relative to this file as in the repository.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "functions" / "storage_job.py"


def _load():
    if not SOURCE.is_file():
        raise ImportError(f"the job contract {SOURCE} is missing: the worker needs functions/storage_job.py "
                          "beside its package (images: COPY functions/storage_job.py /app/functions/)")
    spec = importlib.util.spec_from_file_location("worker._storage_job", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_contract = _load()

FINALIZED_EVENT_TYPE: str = _contract.FINALIZED_EVENT_TYPE
JOB_SCHEMA_VERSION: str = _contract.JOB_SCHEMA_VERSION
event_key = _contract.event_key
job_from_object = _contract.job_from_object
job_attributes = _contract.job_attributes

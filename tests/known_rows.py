"""Known rows for the SQL and report tests: results, batches and errors built from the schema files,
loaded into a dataset of their own on the local stack's BigQuery emulator.

The rows cover what the queries must get right: several engines, precisions, machine sizes and web
frameworks; two runs with a common prefix and one without; cold first batches; a late duplicate
result and error (the *_dedup views must drop them); a batch written twice and one never written;
rows whose stages miss their total by more than 5%; processed_at crossing a minute boundary.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass, replace
from typing import Iterator

from localcloud.resources import create_bigquery, table_schema
from report.queries import Warehouse

GIB = 1024 ** 3
START = dt.datetime(2026, 3, 1, 10, 0, 57, tzinfo=dt.timezone.utc)
BATCH = 4
PREFIX = "sqlt-"
RUNS = ("sqlt-a", "sqlt-b")
OTHER_RUN = "other-c"  # openvino only, outside the prefix
ERRORS_ONLY_RUN = "sqlt-errors-only"


@dataclass(frozen=True)
class Machine:
    environment: str
    logical_cores: int
    physical_cores: int
    memory_total_bytes: int
    host: str
    cpu_model: str


SMALL = Machine("local", 2, 1, 8 * GIB, "host-small", "Intel Xeon @ 2.20GHz")
LARGE = Machine("cloud", 4, 2, int(15.62 * GIB), "host-large", "AMD EPYC 7B12")


@dataclass(frozen=True)
class Config:
    engine: str
    precision: str
    web_framework: str | None
    machine: Machine
    inference_ms: float  # base per-image inference time
    images: int  # per run


CONFIGS = (
    Config("openvino", "bf16", None, SMALL, 2.5, 7),
    Config("openvino", "f32", None, SMALL, 4.0, 10),
    Config("openvino", "f32", "fastapi (uvicorn)", LARGE, 1.5, 5),
    Config("tensorflow", "f32", None, SMALL, 40.0, 9),
    Config("tensorflow", "f32", "flask (gunicorn)", LARGE, 12.0, 6),
)
OFF_ROWS = {("sqlt-a", 3, 5), ("sqlt-b", 1, 2)}  # (run, config, index): stages miss the total by 20%
MISSING_BATCH = ("sqlt-b", 4, 0)  # (run, config, batch): no batches row
DOUBLED_BATCH = ("sqlt-a", 0, 0)  # written twice to batches


def complete(table: str, row: dict) -> dict:
    """The row with every REQUIRED field the test left out; unknown fields are an error."""
    schema = {field["name"]: field for field in table_schema(table)}
    unknown = set(row) - set(schema)
    assert not unknown, f"{table} has no column {sorted(unknown)}: was it renamed in sql/{table}_schema.json?"
    defaults = {"STRING": "x", "INTEGER": 0, "FLOAT": 0.0, "BOOLEAN": False, "TIMESTAMP": START.isoformat()}
    return {**{name: defaults[field["type"]] for name, field in schema.items()
               if field.get("mode") == "REQUIRED" and name not in row}, **row}


def _vary(index: int, salt: int) -> float:
    """A deterministic spread in [0, 1)."""
    return ((index * 7 + salt * 3) % 11) / 11


def _ts(value: dt.datetime) -> str:
    return value.isoformat()


def result_rows() -> list[dict]:
    rows = []
    for run_index, run_id in enumerate(RUNS + (OTHER_RUN,)):
        configs = list(enumerate(CONFIGS)) if run_id != OTHER_RUN else [(1, CONFIGS[1])]
        for config_index, config in configs:
            start = START + dt.timedelta(minutes=10 * run_index, seconds=0.7 * config_index)
            count = config.images if run_id != OTHER_RUN else 3
            for index in range(count):
                batch, v = index // BATCH, _vary(index, config_index + run_index)
                batch_size = min(BATCH, count - batch * BATCH)
                inference = config.inference_ms * (1 + v)
                stages = {"queue_ms": 1 + 3 * v, "download_ms": 5 + 10 * v, "preprocess_ms": 1.5 + v,
                          "batch_wait_ms": 2 + 4 * v, "batch_inference_ms": inference * batch_size}
                total = sum(stages.values()) + 0.3
                if (run_id, config_index, index) in OFF_ROWS:
                    total = sum(stages.values()) * 1.2
                processed = start + dt.timedelta(seconds=0.35 * index)
                created_to_function, function_to_worker = 50 + 20 * v, 30 + 10 * v
                machine = config.machine
                rows.append(complete("results", {
                    "event_key": f"uploads/{run_id}/{config_index}/{index}.png#1",
                    "run_id": run_id, "bucket": "uploads", "object_name": f"{run_id}/{config_index}/{index}.png",
                    "generation": 1, "label": "moon" if index % 2 else "grass", "score": round(0.1 + 0.8 * v, 4),
                    "model_name": "demo", "model_version": "1", "engine": config.engine,
                    "precision": config.precision, "batch_size": batch_size,
                    "created_to_function_ms": created_to_function, "function_to_worker_ms": function_to_worker,
                    **stages, "inference_ms": inference, "total_ms": total,
                    "end_to_end_ms": created_to_function + function_to_worker + total,
                    "cold": batch == 0, "batch_id": f"{run_id}/{config_index}/{batch}",
                    "worker_host": machine.host, "cpu_model": machine.cpu_model,
                    "physical_cores": machine.physical_cores, "logical_cores": machine.logical_cores,
                    "memory_total_bytes": machine.memory_total_bytes, "environment": machine.environment,
                    "web_framework": config.web_framework,
                    "received_at": _ts(processed - dt.timedelta(milliseconds=total)),
                    "processed_at": _ts(processed),
                }))
    return rows


def late_duplicate(rows: list[dict]) -> dict:
    """A redelivery written after BigQuery's de-duplication window: same key, later, wild numbers."""
    first = rows[0]
    later = dt.datetime.fromisoformat(first["processed_at"]) + dt.timedelta(minutes=5)
    return {**first, "inference_ms": 99999.0, "total_ms": 99999.0, "end_to_end_ms": 99999.0, "cold": True,
            "processed_at": _ts(later), "received_at": _ts(later - dt.timedelta(seconds=1))}


def batch_rows(results: list[dict]) -> list[dict]:
    batches: dict[str, list[dict]] = {}
    for row in results:
        batches.setdefault(row["batch_id"], []).append(row)
    out = []
    for batch_id, rows in batches.items():
        run_id, config_index, batch = batch_id.split("/")
        if (run_id, int(config_index), int(batch)) == MISSING_BATCH:
            continue
        first = rows[0]
        out.append(complete("batches", {
            "batch_id": batch_id, "event_key": batch_id, "run_id": run_id, "worker_host": first["worker_host"],
            "engine": first["engine"], "precision": first["precision"], "model_version": "1",
            "web_framework": first["web_framework"], "images": len(rows), "results": len(rows),
            "sink_ms": 3.0 + 2 * int(batch) + int(config_index),
            "started_at": rows[0]["received_at"], "processed_at": rows[-1]["processed_at"],
        }))
    return out


def error_rows() -> list[dict]:
    specs = (("sqlt-a", "not_an_image"), ("sqlt-a", "not_an_image"), ("sqlt-a", "corrupt_image"),
             ("sqlt-b", "not_an_image"), (ERRORS_ONLY_RUN, "too_many_bytes"), (ERRORS_ONLY_RUN, "too_many_bytes"),
             (OTHER_RUN, "empty_object"))
    return [complete("errors", {
        "event_key": f"uploads/{run_id}/bad-{index}#1", "run_id": run_id, "reason": reason,
        "message": f"{reason} for test", "failed_at": _ts(START + dt.timedelta(seconds=index)),
    }) for index, (run_id, reason) in enumerate(specs)]


@dataclass
class KnownRows:
    """What was inserted; `results` and `errors` are what the *_dedup views should return."""

    results: list[dict]
    batches: list[dict]
    errors: list[dict]


def known_rows() -> tuple[KnownRows, dict[str, list[dict]]]:
    """The de-duplicated truth, and the raw rows to insert per table (duplicates included)."""
    results, errors = result_rows(), error_rows()
    batches = batch_rows(results)
    doubled = "/".join(map(str, DOUBLED_BATCH))
    duplicate_error = {**errors[0], "message": "written again", "failed_at": _ts(START + dt.timedelta(hours=1))}
    raw = {
        "results": results + [late_duplicate(results)],
        "batches": batches + [row for row in batches if row["batch_id"] == doubled],
        "errors": errors + [duplicate_error],
    }
    return KnownRows(results, batches, errors), raw


@contextlib.contextmanager
def known_dataset(stack, schema_edit=None) -> Iterator[tuple[Warehouse, KnownRows]]:
    """A dataset of its own on the stack's emulator with tables and views from sql/ and the known rows.
    schema_edit(table, fields) -> fields may change a schema first (to test a renamed column)."""
    from google.cloud import bigquery

    from localcloud import resources
    from worker.clients import bigquery_client

    config = replace(stack.config, dataset=f"sqltest_{uuid.uuid4().hex[:8]}")
    client = bigquery_client(config.project, config.client_env())
    truth, raw = known_rows()
    try:
        if schema_edit is None:
            create_bigquery(config)
        else:
            client.create_dataset(config.dataset)
            for table in ("results", "errors", "batches"):
                before = table_schema(table)
                after = schema_edit(table, [dict(f) for f in before])
                client.create_table(bigquery.Table(config.table_id(table), schema=[
                    bigquery.SchemaField.from_api_repr(f) for f in after]))
                renamed = {old["name"]: new["name"] for old, new in zip(before, after)}
                raw[table] = [{renamed.get(k, k): v for k, v in row.items()} for row in raw[table]]
            for view in sorted(resources.SQL_DIR.glob("views/*.sql")):
                resources.create_view(client, config, view)
        for table, rows in raw.items():
            # A fresh insertId per row: the duplicates must reach the table, as late redeliveries do.
            errors = client.insert_rows_json(config.table_id(table), rows, row_ids=[uuid.uuid4().hex for _ in rows])
            assert not errors, f"insert into {table} failed: {errors[:3]}"
        yield Warehouse(client, config.project, config.dataset), truth
    finally:
        client.delete_dataset(f"{config.project}.{config.dataset}", delete_contents=True, not_found_ok=True)


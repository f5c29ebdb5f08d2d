"""Create the stack's topics, subscriptions, bucket, dataset and tables (idempotent)."""

from __future__ import annotations

import json
from pathlib import Path

from google.api_core.exceptions import AlreadyExists, Conflict
from google.api_core.retry import Retry

from localcloud.config import REPO_ROOT, StackConfig

SQL_DIR = REPO_ROOT / "sql"


CLUSTERING = {"results": ["engine", "model_version"], "batches": ["engine", "worker_host"]}


def table_schema(name: str) -> list[dict]:
    return json.loads((SQL_DIR / f"{name}_schema.json").read_text())


def create_pubsub(config: StackConfig) -> None:
    from worker.clients import publisher_client, subscriber_client

    publisher = publisher_client(config.client_env())
    subscriber = subscriber_client(config.client_env())
    # Same shape as infra/: jobs that keep failing go to a dead-letter topic whose own
    # subscription holds them for `python -m worker.deadletter`, so nothing is dropped.
    subscriptions = (
        # Eventarc's trigger subscription, with a dead-letter topic: an event the stand-in or the
        # function cannot handle ends there after its last attempt, held for inspection.
        (config.eventarc_dead_letter_topic, {"name": config.eventarc_dead_letter_subscription,
                                             "ack_deadline_seconds": 60}),
        (config.notifications_topic, {
            "name": config.eventarc_subscription, "ack_deadline_seconds": 60,
            "dead_letter_policy": {"dead_letter_topic": config.topic_path(config.eventarc_dead_letter_topic),
                                   "max_delivery_attempts": config.max_delivery_attempts},
        }),
        (config.dead_letter_topic, {"name": config.dead_letter_subscription, "ack_deadline_seconds": 60}),
        (config.jobs_topic, {
            "name": config.jobs_subscription,
            "ack_deadline_seconds": config.jobs_ack_deadline_s,
            "dead_letter_policy": {"dead_letter_topic": config.topic_path(config.dead_letter_topic),
                                   "max_delivery_attempts": config.max_delivery_attempts},
            "retry_policy": {"minimum_backoff": {"seconds": 1}, "maximum_backoff": {"seconds": 60}},
        }),
    )
    for topic, subscription in subscriptions:
        try:
            publisher.create_topic(name=config.topic_path(topic))
        except AlreadyExists:
            pass
        try:
            subscriber.create_subscription(request={
                **subscription, "name": config.subscription_path(subscription["name"]),
                "topic": config.topic_path(topic)})
        except AlreadyExists:
            pass
    subscriber.close()


def create_bucket(config: StackConfig) -> None:
    from worker.clients import storage_client

    client = storage_client(config.project, config.client_env())
    try:
        client.create_bucket(config.bucket)
    except Conflict:
        pass


def create_bigquery(config: StackConfig) -> None:
    from google.cloud import bigquery

    from worker.clients import bigquery_client

    client = bigquery_client(config.project, config.client_env())
    retry = Retry(timeout=30)
    client.create_dataset(bigquery.Dataset(f"{config.project}.{config.dataset}"), exists_ok=True, retry=retry)
    for table_name, schema_name, partition_field in (
        (config.results_table, "results", "processed_at"),
        (config.errors_table, "errors", "failed_at"),
        (config.batches_table, "batches", "processed_at"),
    ):
        table = bigquery.Table(config.table_id(table_name),
                               schema=[bigquery.SchemaField.from_api_repr(f) for f in table_schema(schema_name)])
        table.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY,
                                                            field=partition_field)
        table.clustering_fields = CLUSTERING.get(schema_name)
        client.create_table(table, exists_ok=True, retry=retry)
        add_missing_columns(client, config.table_id(table_name), table.schema)
    for view_file in sorted(SQL_DIR.glob("views/*.sql")):
        create_view(client, config, view_file)


def add_missing_columns(client, table_id: str, schema: list) -> list[str]:
    """The schema migration: columns the schema file has and the table lacks are added (new
    columns are NULLABLE or REPEATED, so existing rows stay readable). Returns their names."""
    table = client.get_table(table_id)
    present = {field.name for field in table.schema}
    missing = [field for field in schema if field.name not in present]
    if missing:
        table.schema = list(table.schema) + missing
        client.update_table(table, ["schema"])
    return [field.name for field in missing]


def create_view(client, config: StackConfig, view_file: Path) -> None:
    from google.cloud import bigquery

    view = bigquery.Table(f"{config.project}.{config.dataset}.{view_file.stem}")
    view.view_query = render_sql(view_file.read_text(), config)
    client.delete_table(view, not_found_ok=True)
    client.create_table(view)


def render_sql(text: str, config: StackConfig) -> str:
    """SQL files name tables as `${dataset}.results`; fill in the project and dataset."""
    return text.replace("${project}", config.project).replace("${dataset}", config.dataset)

"""`python -m worker.deadletter list|explain|replay`: jobs that exhausted their delivery attempts.

The jobs subscription's dead-letter policy moves a job there after max_delivery_attempts; the
dead-letter topic's own subscription holds it until someone looks. Listing does not consume.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click
from rich.console import Console
from rich.table import Table

from worker import clients
from worker.jobs import MalformedJob, parse_job, partial_identity

console = Console(width=None if sys.stdout.isatty() else 160)
PULL_BATCH = 100


@dataclass(frozen=True)
class DeadJob:
    ack_id: str
    message_id: str
    data: bytes
    attributes: dict[str, str]

    @property
    def attempts(self) -> str:
        return self.attributes.get("CloudPubSubDeadLetterSourceDeliveryCount", "?")

    @property
    def identity(self) -> dict:
        return partial_identity(self.data)


def _path(kind: str, name: str, project: str) -> str:
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


def pull_dead_jobs(subscriber, subscription: str, limit: int) -> list[DeadJob]:
    jobs: list[DeadJob] = []
    while len(jobs) < limit:
        response = subscriber.pull(subscription=subscription, max_messages=min(PULL_BATCH, limit - len(jobs)),
                                   timeout=10)
        if not response.received_messages:
            break
        jobs += [DeadJob(m.ack_id, m.message.message_id, m.message.data, dict(m.message.attributes))
                 for m in response.received_messages]
    return jobs


def release(subscriber, subscription: str, jobs: list[DeadJob]) -> None:
    """Give listed jobs back at once (ack deadline 0) so listing consumes nothing."""
    if jobs:
        subscriber.modify_ack_deadline(subscription=subscription, ack_ids=[j.ack_id for j in jobs],
                                       ack_deadline_seconds=0)


def explain(job: DeadJob, storage) -> str:
    try:
        parsed = parse_job(job.data)
    except MalformedJob as exc:
        return f"not a job this worker reads ({exc}); replaying will give a malformed_job error row"
    blob = storage.bucket(parsed.bucket).blob(parsed.name, generation=parsed.generation)
    try:
        exists = blob.exists()
    except Exception as exc:
        return f"cannot check gs://{parsed.bucket}/{parsed.name}: {exc}"
    if not exists:
        return "the object is gone; replaying will write an object_not_found error row"
    return ("the object is there: the worker kept failing on it for a transient reason (see its log for "
            f"{parsed.event_key}); replay once the cause is fixed")


@click.group()
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", required=True)
@click.option("--subscription", envvar="DEAD_LETTER_SUBSCRIPTION", default="jobs-dead-letter-hold",
              show_default=True, help="the dead-letter topic's subscription")
@click.pass_context
def cli(ctx, project: str, subscription: str) -> None:
    """Inspect and replay dead-lettered jobs."""
    ctx.obj = {"project": project, "subscription": _path("subscriptions", subscription, project),
               "subscriber": clients.subscriber_client()}


def _table(jobs: list[DeadJob], reasons: list[str] | None = None) -> Table:
    table = Table(title=f"{len(jobs)} dead-lettered job(s)")
    for column in ("event key", "attempts", "message id") + (("why / what replay does",) if reasons else ()):
        table.add_column(column)
    for index, job in enumerate(jobs):
        cells = [str(job.identity.get("event_key") or "(unreadable)"), job.attempts, job.message_id]
        table.add_row(*cells, *([reasons[index]] if reasons else []))
    return table


@cli.command("list")
@click.option("--limit", default=1000, show_default=True)
@click.pass_obj
def list_jobs(obj, limit: int) -> None:
    """Show dead-lettered jobs without consuming them."""
    jobs = pull_dead_jobs(obj["subscriber"], obj["subscription"], limit)
    release(obj["subscriber"], obj["subscription"], jobs)
    console.print(_table(jobs))


@cli.command("explain")
@click.option("--limit", default=100, show_default=True)
@click.pass_obj
def explain_jobs(obj, limit: int) -> None:
    """Say for each dead-lettered job why it is likely there and what a replay would do."""
    storage = clients.storage_client(obj["project"])
    jobs = pull_dead_jobs(obj["subscriber"], obj["subscription"], limit)
    try:
        console.print(_table(jobs, [explain(job, storage) for job in jobs]))
    finally:
        release(obj["subscriber"], obj["subscription"], jobs)


@cli.command("replay")
@click.option("--jobs-topic", envvar="JOBS_TOPIC", default="jobs", show_default=True)
@click.option("--limit", default=1000, show_default=True)
@click.pass_obj
def replay_jobs(obj, jobs_topic: str, limit: int) -> None:
    """Publish dead-lettered jobs to the jobs topic again, then remove them from the dead letters."""
    publisher = clients.publisher_client()
    topic = _path("topics", jobs_topic, obj["project"])
    jobs = pull_dead_jobs(obj["subscriber"], obj["subscription"], limit)
    replayed = 0
    try:
        for job in jobs:
            attributes = {k: v for k, v in job.attributes.items() if not k.startswith("CloudPubSubDeadLetter")}
            publisher.publish(topic, job.data, **attributes).result(timeout=30)
            obj["subscriber"].acknowledge(subscription=obj["subscription"], ack_ids=[job.ack_id])
            replayed += 1
    finally:
        release(obj["subscriber"], obj["subscription"], jobs[replayed:])
    console.print(f"replayed {replayed} job(s) to {topic}")


if __name__ == "__main__":
    cli()

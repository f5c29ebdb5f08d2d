"""BigQuery streaming inserts with the event key as insertId; per-row errors are checked."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from google.api_core.retry import Retry

_LOGGER = logging.getLogger(__name__)

# BigQuery documents insertId as a best-effort de-duplication key of at most 128 characters.
MAX_INSERT_ID_CHARS = 128


def insert_id(event_key: str) -> str:
    if len(event_key) <= MAX_INSERT_ID_CHARS:
        return event_key
    return "sha256:" + hashlib.sha256(event_key.encode()).hexdigest()


@dataclass
class InsertOutcome:
    failed: dict[int, str] = field(default_factory=dict)  # row index -> why

    @property
    def ok(self) -> bool:
        return not self.failed


class BigQuerySink:
    def __init__(self, client, timeout_s: float = 30.0):
        self._client = client
        self._timeout_s = timeout_s
        # Bounded: a dead endpoint must not hold a batch (and its leases) for minutes.
        self._retry = Retry(initial=0.2, maximum=2.0, timeout=timeout_s)

    def insert(self, table: str, rows: list[dict]) -> InsertOutcome:
        """Insert rows (each with an event_key); returns which rows BigQuery did not accept."""
        if not rows:
            return InsertOutcome()
        try:
            errors = self._client.insert_rows_json(
                table, rows, row_ids=[insert_id(row["event_key"]) for row in rows],
                retry=self._retry, timeout=self._timeout_s,
            )
        except Exception as exc:  # the whole call failed: every row is still to be written
            _LOGGER.warning("insert into %s failed for %d rows: %s", table, len(rows), exc)
            return InsertOutcome({index: f"insert failed: {exc}" for index in range(len(rows))})
        outcome = InsertOutcome()
        for entry in errors:
            outcome.failed[int(entry["index"])] = "; ".join(e.get("message", str(e)) for e in entry.get("errors", []))
        if outcome.failed:
            _LOGGER.warning("insert into %s rejected %d of %d rows: %s", table, len(outcome.failed), len(rows),
                            next(iter(outcome.failed.values())))
        return outcome

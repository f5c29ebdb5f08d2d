"""Readiness of what the worker writes to: a cheap call, remembered for a while."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

_LOGGER = logging.getLogger(__name__)


class CachedProbe:
    """Calls probe() (raises when the dependency is unreachable) at most once per ok_ttl_s after a
    success and once per fail_ttl_s after a failure, so a health checker polling every few seconds
    costs the dependency little; answers "ok" or why not."""

    def __init__(self, probe: Callable[[], None], ok_ttl_s: float = 30.0, fail_ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._probe = probe
        self._ok_ttl_s = ok_ttl_s
        self._fail_ttl_s = fail_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._answer = "not checked"

    def check(self) -> str:
        with self._lock:
            now = self._clock()
            ttl = self._ok_ttl_s if self._answer == "ok" else self._fail_ttl_s
            if self._checked_at is None or now - self._checked_at >= ttl:
                self._answer = self._run()
                self._checked_at = self._clock()
            return self._answer

    def _run(self) -> str:
        try:
            self._probe()
        except Exception as exc:
            _LOGGER.warning("readiness probe failed: %s", exc)
            return f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
        return "ok"


def bigquery_table_probe(client, table: str, timeout_s: float = 5.0) -> Callable[[], None]:
    """Reading the table's metadata: BigQuery answers, our credentials work, the table exists."""
    def probe() -> None:
        client.get_table(table, timeout=timeout_s, retry=None)

    return probe

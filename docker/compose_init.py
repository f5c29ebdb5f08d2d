"""One-shot init of the compose stack (docker/docker-compose.yml, service `init`).

Creates the topics, subscriptions (dead-letter policy included), the upload bucket, the dataset,
the tables and the views with the same code as `make up` (localcloud/resources.py), pointed at the
emulator containers by the standard variables:

  GOOGLE_CLOUD_PROJECT, PUBSUB_EMULATOR_HOST (host:port), STORAGE_EMULATOR_HOST (http://host:port),
  BIGQUERY_EMULATOR_HOST (http://host:port)

Waits for each emulator first (compose starts them in parallel), exits 0 when everything exists.
"""

from __future__ import annotations

import os
import sys
import time

import requests

from localcloud import resources
from localcloud.config import StackConfig

CLIENT_VARIABLES = ("GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "BIGQUERY_EMULATOR_HOST")


class ComposeStackConfig(StackConfig):
    """The local stack's names and settings, with clients pointed at the compose services."""

    def client_env(self) -> dict[str, str]:
        missing = [name for name in CLIENT_VARIABLES if not os.environ.get(name)]
        if missing:
            raise SystemExit(f"compose_init: set {', '.join(missing)}")
        return {name: os.environ[name] for name in CLIENT_VARIABLES}


def readiness_urls(config: StackConfig, env: dict[str, str]) -> dict[str, str]:
    return {
        "pubsub": f"http://{env['PUBSUB_EMULATOR_HOST']}/",
        "gcs": f"{env['STORAGE_EMULATOR_HOST'].rstrip('/')}/storage/v1/b",
        "bigquery": f"{env['BIGQUERY_EMULATOR_HOST'].rstrip('/')}/bigquery/v2/projects/{config.project}/datasets",
    }


def wait_until_up(name: str, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"compose_init: {name} did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(1)


def main(timeout_s: float = 180.0) -> int:
    config = ComposeStackConfig(project=os.environ.get("GOOGLE_CLOUD_PROJECT", StackConfig.project))
    env = config.client_env()
    for name, url in readiness_urls(config, env).items():
        wait_until_up(name, url, timeout_s)
    # Topics first: fake-gcs-server drops notifications published to a topic that does not exist.
    resources.create_pubsub(config)
    resources.create_bucket(config)
    resources.create_bigquery(config)
    print(f"compose_init: project {config.project} ready (bucket {config.bucket}, topic {config.jobs_topic}, "
          f"dataset {config.dataset})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Google Cloud clients for production or for the local emulators, chosen by environment.

Storage and Pub/Sub clients find their emulators through STORAGE_EMULATOR_HOST and
PUBSUB_EMULATOR_HOST. The BigQuery library has no such variable, so this project reads
BIGQUERY_EMULATOR_HOST (http://host:port) the same way.

Without an emulator a client needs Application Default Credentials; when there are none, the
client functions raise CredentialsMissing, whose message names the variables to set.
"""

from __future__ import annotations

import contextlib
import os
from typing import Mapping

STORAGE_EMULATOR = "STORAGE_EMULATOR_HOST"
BIGQUERY_EMULATOR = "BIGQUERY_EMULATOR_HOST"
PUBSUB_EMULATOR = "PUBSUB_EMULATOR_HOST"


class CredentialsMissing(RuntimeError):
    """A client for Google Cloud was needed and no credentials were found (nor an emulator set)."""


@contextlib.contextmanager
def needs_credentials(service: str, emulator_variable: str):
    """Turn google.auth's DefaultCredentialsError, raised while making a client, into
    CredentialsMissing naming the cause and what to set."""
    from google.auth.exceptions import DefaultCredentialsError

    try:
        yield
    except DefaultCredentialsError as exc:
        raise CredentialsMissing(
            f"the {service} client needs Google credentials and found none "
            f"(google.auth.exceptions.DefaultCredentialsError: {exc}); set GOOGLE_APPLICATION_CREDENTIALS to a "
            f"service-account key file or run `gcloud auth application-default login`, or set {emulator_variable} "
            "to use a local emulator"
        ) from exc


def storage_client(project: str, env: Mapping[str, str] = os.environ):
    from google.cloud import storage

    endpoint = env.get(STORAGE_EMULATOR)
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": endpoint})
    with needs_credentials("Cloud Storage", STORAGE_EMULATOR):
        return storage.Client(project=project)


def bigquery_client(project: str, env: Mapping[str, str] = os.environ):
    from google.cloud import bigquery

    endpoint = env.get(BIGQUERY_EMULATOR)
    if endpoint:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        if not endpoint.startswith("http"):
            endpoint = f"http://{endpoint}"
        return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                               client_options=ClientOptions(api_endpoint=endpoint))
    with needs_credentials("BigQuery", BIGQUERY_EMULATOR):
        return bigquery.Client(project=project)


def subscriber_client(env: Mapping[str, str] = os.environ):
    from google.cloud import pubsub_v1

    host = env.get(PUBSUB_EMULATOR)
    if host:
        import grpc
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(host)))
    with needs_credentials("Pub/Sub subscriber", PUBSUB_EMULATOR):
        return pubsub_v1.SubscriberClient()


def publisher_client(env: Mapping[str, str] = os.environ, **kwargs):
    from google.cloud import pubsub_v1

    host = env.get(PUBSUB_EMULATOR)
    if host:
        import grpc
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host)),
                                         **kwargs)
    with needs_credentials("Pub/Sub publisher", PUBSUB_EMULATOR):
        return pubsub_v1.PublisherClient(**kwargs)

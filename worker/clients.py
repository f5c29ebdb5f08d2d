"""Google Cloud clients for production or for the local emulators, chosen by environment.

Storage and Pub/Sub clients find their emulators through STORAGE_EMULATOR_HOST and
PUBSUB_EMULATOR_HOST. The BigQuery library has no such variable, so this project reads
BIGQUERY_EMULATOR_HOST (http://host:port) the same way.
"""

from __future__ import annotations

import os
from typing import Mapping


def storage_client(project: str, env: Mapping[str, str] = os.environ):
    from google.cloud import storage

    endpoint = env.get("STORAGE_EMULATOR_HOST")
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": endpoint})
    return storage.Client(project=project)


def bigquery_client(project: str, env: Mapping[str, str] = os.environ):
    from google.cloud import bigquery

    endpoint = env.get("BIGQUERY_EMULATOR_HOST")
    if endpoint:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        if not endpoint.startswith("http"):
            endpoint = f"http://{endpoint}"
        return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                               client_options=ClientOptions(api_endpoint=endpoint))
    return bigquery.Client(project=project)


def subscriber_client(env: Mapping[str, str] = os.environ):
    from google.cloud import pubsub_v1

    host = env.get("PUBSUB_EMULATOR_HOST")
    if host:
        import grpc
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(host)))
    return pubsub_v1.SubscriberClient()


def publisher_client(env: Mapping[str, str] = os.environ, **kwargs):
    from google.cloud import pubsub_v1

    host = env.get("PUBSUB_EMULATOR_HOST")
    if host:
        import grpc
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host)),
                                         **kwargs)
    return pubsub_v1.PublisherClient(**kwargs)

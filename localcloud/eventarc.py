"""Eventarc stand-in: Cloud Storage notifications on Pub/Sub -> CloudEvents POSTed to the function.

In Google Cloud, Eventarc delivers an object-finalized event to a 2nd-gen function as a CloudEvent
in binary content mode: context attributes as `ce-*` headers, the object resource as the JSON body.
fake-gcs-server publishes the notification (JSON_API_V1 payload) to Pub/Sub; this process turns
each one into that request, so the function's production code path is the one exercised.

Header values follow the CloudEvents HTTP protocol binding 1.0.2, section 3.1.3.2: space, '"',
'%' and everything outside printable ASCII are percent-encoded as UTF-8, so any object name
Cloud Storage accepts (CJK, emoji, quotes, up to 1,024 bytes) travels in `ce-subject`.

Delivery follows Eventarc's push subscription: a 2xx acks; anything else (an event that cannot be
converted, a 4xx or 5xx, a connection error, a bug here) is logged with the message id and nacked.
The trigger's subscription has a dead-letter policy, so an event that keeps failing lands on the
Eventarc dead-letter topic after its last attempt: settled and visible, never dropped, and never
the end of this process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import click
import requests

_LOGGER = logging.getLogger("localcloud.eventarc")

FINALIZED_EVENT_TYPE = "google.cloud.storage.object.v1.finalized"
NOTIFICATION_EVENT_TYPES = {"OBJECT_FINALIZE": FINALIZED_EVENT_TYPE}
RETRY_PAUSE_S = 0.5


def encode_header_value(value: str) -> str:
    """A CloudEvents attribute as an HTTP header value (HTTP binding 1.0.2, section 3.1.3.2)."""
    return "".join(
        char if "!" <= char <= "~" and char not in '"%' else "".join(f"%{byte:02X}" for byte in char.encode())
        for char in value
    )


def notification_to_cloudevent(attributes: dict[str, str], data: bytes, message_id: str) -> tuple[dict, bytes] | None:
    """A GCS Pub/Sub notification -> (headers, body) of Eventarc's binary-mode CloudEvent.

    None for notification types this trigger does not subscribe to. KeyError or ValueError for
    a message that is not a Cloud Storage notification.
    """
    event_type = NOTIFICATION_EVENT_TYPES.get(attributes.get("eventType", ""))
    if event_type is None:
        return None
    bucket = attributes["bucketId"]
    name = attributes["objectId"]
    context = {
        "specversion": "1.0",
        "id": message_id,
        "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "type": event_type,
        "subject": f"objects/{name}",
        "bucket": bucket,
    }
    if attributes.get("eventTime"):
        context["time"] = attributes["eventTime"]
    headers = {f"ce-{key}": encode_header_value(value) for key, value in context.items()}
    headers["Content-Type"] = "application/json; charset=utf-8"
    # Eventarc sends the object resource; keep fake-gcs-server's bytes as they are.
    json.loads(data)
    return headers, data


class Forwarder:
    def __init__(self, target_url: str, timeout_s: float = 60.0, copies: int = 1):
        self._target_url = target_url
        self._timeout_s = timeout_s
        self._copies = copies  # >1 injects the duplicate deliveries Eventarc's retries can cause
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def __call__(self, message) -> None:
        # Whatever goes wrong with one message stays with that message: it is nacked, retried and
        # in the end dead-lettered by the subscription's policy; the stream goes on.
        try:
            self._handle(message)
        except Exception:
            _LOGGER.exception("event %s (attempt %s) failed in the stand-in; nacked", message.message_id,
                              message.delivery_attempt)
            message.nack()

    def _handle(self, message) -> None:
        try:
            converted = notification_to_cloudevent(dict(message.attributes), message.data, message.message_id)
        except (KeyError, ValueError) as exc:
            _LOGGER.error("notification %s (attempt %s) is not a Cloud Storage notification (%s: %s); nacked, "
                          "it goes to the dead-letter topic after its last attempt", message.message_id,
                          message.delivery_attempt, type(exc).__name__, exc)
            message.nack()
            return
        if converted is None:
            message.ack()
            return
        headers, body = converted
        for _ in range(self._copies):
            if not self._deliver(message, headers, body):
                return
        message.ack()

    def _deliver(self, message, headers: dict, body: bytes) -> bool:
        """POST once; False when the message was nacked for a retry."""
        try:
            response = self._session().post(self._target_url, data=body, headers=headers, timeout=self._timeout_s)
        except requests.RequestException as exc:
            _LOGGER.warning("function unreachable for event %s: %s; will retry", message.message_id, exc)
            time.sleep(RETRY_PAUSE_S)
            message.nack()
            return False
        if 200 <= response.status_code < 300:
            return True
        # Eventarc's push subscription retries every other status; the dead-letter policy ends it.
        _LOGGER.error("function answered %d for event %s (attempt %s): %s; will retry", response.status_code,
                      message.message_id, message.delivery_attempt, response.text[:300])
        time.sleep(RETRY_PAUSE_S)
        message.nack()
        return False


@click.command()
@click.option("--subscription", required=True, help="projects/P/subscriptions/S receiving GCS notifications")
@click.option("--target", required=True, help="URL of the function")
@click.option("--ready-file", type=click.Path(path_type=Path), help="written once the stream is open")
@click.option("--max-in-flight", default=64, show_default=True, help="events delivered at once")
@click.option("--copies", default=1, show_default=True, help="deliver each event this many times (fault tests)")
def main(subscription: str, target: str, ready_file: Path | None, max_in_flight: int, copies: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from google.cloud import pubsub_v1
    from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

    from worker import logs

    logs.configure()
    subscriber = pubsub_v1.SubscriberClient()
    stream = subscriber.subscribe(
        subscription, callback=Forwarder(target, copies=copies),
        flow_control=pubsub_v1.types.FlowControl(max_messages=max_in_flight),
        scheduler=ThreadScheduler(ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="deliver")),
    )
    if ready_file:
        ready_file.write_text("ready")
    _LOGGER.info("delivering %s to %s", subscription, target)
    try:
        stream.result()
    except KeyboardInterrupt:
        stream.cancel()
    except Exception as exc:
        # The stream itself ended (subscription gone, emulator down): exit so the supervisor restarts us.
        _LOGGER.error("the stream of %s ended: %s; exiting", subscription, exc)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

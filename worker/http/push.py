"""Pub/Sub push delivery: the envelope parsed into the same Delivery the pull path builds.

Pub/Sub POSTs `{"message": {"data": base64, "attributes", "messageId", "publishTime"},
"subscription", "deliveryAttempt"}`; a 2xx answer acks, anything else nacks (and it comes back).
Parsing is pure; PushOutcome turns the runner's ack/nack into the HTTP answer.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import threading
from dataclasses import dataclass, field

from worker.batch import Delivery
from worker.jobs import parse_timestamp


class PushEnvelopeError(ValueError):
    """The body is not a push envelope (not from Pub/Sub, or damaged): answer 400."""


@dataclass(frozen=True)
class PushMessage:
    data: bytes
    message_id: str
    subscription: str = ""
    delivery_attempt: int | None = None
    publish_time: dt.datetime | None = None
    attributes: dict[str, str] = field(default_factory=dict)


def parse_push_envelope(body: bytes) -> PushMessage:
    """A wrapped push request body -> PushMessage. Raises PushEnvelopeError saying what is wrong."""
    try:
        envelope = json.loads(body)
    except ValueError:
        raise PushEnvelopeError("the body is not JSON (expected a Pub/Sub push envelope)")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("message"), dict):
        raise PushEnvelopeError("the body has no \"message\" object (expected a Pub/Sub push envelope)")
    message = envelope["message"]
    message_id = message.get("messageId") or message.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise PushEnvelopeError("the message has no messageId")
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise PushEnvelopeError("message.data is not base64")
    attempt = envelope.get("deliveryAttempt")
    if attempt is not None and not (isinstance(attempt, int) and attempt >= 1):
        raise PushEnvelopeError(f"deliveryAttempt {attempt!r} is not a positive integer")
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise PushEnvelopeError("message.attributes is not an object")
    return PushMessage(
        data=data,
        message_id=message_id,
        subscription=str(envelope.get("subscription") or ""),
        delivery_attempt=attempt,
        publish_time=parse_timestamp(message.get("publishTime") or message.get("publish_time")),
        attributes={str(k): str(v) for k, v in attributes.items()},
    )


class PushOutcome:
    """Settled once, by the runner's ack (row written, or a duplicate) or nack (try again)."""

    def __init__(self) -> None:
        self._settled = threading.Event()
        self._acked = False

    def ack(self) -> None:
        self._settle(True)

    def nack(self) -> None:
        self._settle(False)

    def _settle(self, acked: bool) -> None:
        if not self._settled.is_set():
            self._acked = acked
            self._settled.set()

    def wait(self, timeout_s: float) -> bool | None:
        """True: acked; False: nacked; None: not settled within timeout_s."""
        if not self._settled.wait(timeout_s):
            return None
        return self._acked


def push_delivery(message: PushMessage, outcome: PushOutcome, received_at: dt.datetime,
                  received_monotonic: float, web_framework: str | None = None) -> Delivery:
    return Delivery(
        data=message.data,
        message_id=message.message_id,
        delivery_attempt=message.delivery_attempt,
        received_at=received_at,
        received_monotonic=received_monotonic,
        ack=outcome.ack,
        nack=outcome.nack,
        web_framework=web_framework,
    )


def envelope_for(data: bytes, message_id: str, subscription: str = "", delivery_attempt: int | None = None,
                 attributes: dict[str, str] | None = None, publish_time: str | None = None) -> dict:
    """The envelope Pub/Sub would POST for a message (tests and tools build requests with it)."""
    envelope: dict = {
        "message": {"data": base64.b64encode(data).decode(), "messageId": message_id, "message_id": message_id,
                    "attributes": attributes or {},
                    "publishTime": publish_time or dt.datetime.now(dt.timezone.utc).isoformat()},
        "subscription": subscription,
    }
    if delivery_attempt is not None:
        envelope["deliveryAttempt"] = delivery_attempt
    return envelope

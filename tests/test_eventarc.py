"""The Eventarc stand-in turns a real fake-gcs-server notification into Eventarc's CloudEvent."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest
from cloudevents.http import from_http

from localcloud.eventarc import Forwarder, encode_header_value, notification_to_cloudevent
from tests.helpers import load_json

GOLDEN = load_json("gcs_notification_finalize.json")


def test_finalize_notification_becomes_a_binary_mode_storage_cloudevent():
    headers, body = notification_to_cloudevent(GOLDEN["attributes"], json.dumps(GOLDEN["data"]).encode(), "77")

    assert headers["ce-type"] == "google.cloud.storage.object.v1.finalized"
    assert headers["ce-source"] == "//storage.googleapis.com/projects/_/buckets/uploads"
    assert headers["ce-subject"] == "objects/incoming/golden/cat%20photo.png"  # space percent-encoded
    assert headers["ce-id"] == "77" and headers["ce-specversion"] == "1.0"
    assert headers["ce-time"] == GOLDEN["attributes"]["eventTime"]
    event = from_http(headers, body)  # the same parser functions-framework uses
    assert event.get_data()["generation"] == GOLDEN["data"]["generation"]
    assert event["bucket"] == "uploads"


def test_other_notification_types_are_not_forwarded():
    attributes = {**GOLDEN["attributes"], "eventType": "OBJECT_DELETE"}
    assert notification_to_cloudevent(attributes, b"{}", "1") is None


@pytest.mark.parametrize("value, encoded", [
    ("objects/a.png", "objects/a.png"),
    ("a b", "a%20b"),
    ('say "hi"', "say%20%22hi%22"),
    ("100%", "100%25"),
    ("tab\tnl", "tab%09nl"),
    ("ñandú", "%C3%B1and%C3%BA"),
    ("猫", "%E7%8C%AB"),
    ("🐱", "%F0%9F%90%B1"),
    ("#?&+=/\\~!", "#?&+=/\\~!"),  # printable ASCII other than '"' and '%' stays
])
def test_header_values_are_percent_encoded_as_the_http_binding_says(value, encoded):
    assert encode_header_value(value) == encoded
    assert unquote(encoded) == value


def test_any_object_name_travels_in_ascii_headers_and_the_body_keeps_it_exact():
    name = "incoming/日本語 😀 e\u0301 שלום \"q\" \\ #?%+ ../x" + "é" * 400
    data = json.dumps({**GOLDEN["data"], "name": name}).encode()

    headers, body = notification_to_cloudevent({**GOLDEN["attributes"], "objectId": name}, data, "9")

    assert all(value.isascii() for value in headers.values())
    assert unquote(headers["ce-subject"]) == f"objects/{name}"
    assert from_http(headers, body).get_data()["name"] == name


@dataclass
class FakeMessage:
    attributes: dict
    data: bytes
    message_id: str = "m-1"
    delivery_attempt: int = 1
    settled: list = field(default_factory=list)

    def ack(self):
        self.settled.append("ack")

    def nack(self):
        self.settled.append("nack")


def test_a_message_that_is_no_notification_is_nacked_for_the_dead_letter_topic_not_raised():
    message = FakeMessage({"eventType": "OBJECT_FINALIZE"}, b"not json")  # no bucketId/objectId

    Forwarder("http://127.0.0.1:9/")(message)

    assert message.settled == ["nack"]


def test_an_unexpected_failure_is_nacked_and_does_not_escape(monkeypatch):
    message = FakeMessage(GOLDEN["attributes"], json.dumps(GOLDEN["data"]).encode())
    forwarder = Forwarder("http://127.0.0.1:9/")
    monkeypatch.setattr(forwarder, "_deliver", lambda *_: 1 / 0)

    forwarder(message)

    assert message.settled == ["nack"]


def test_ignored_event_types_are_acked():
    message = FakeMessage({**GOLDEN["attributes"], "eventType": "OBJECT_DELETE"}, b"{}")

    Forwarder("http://127.0.0.1:9/")(message)

    assert message.settled == ["ack"]

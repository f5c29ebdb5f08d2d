"""The Eventarc stand-in turns a real fake-gcs-server notification into Eventarc's CloudEvent."""

from __future__ import annotations

import json

from cloudevents.http import from_http

from localcloud.eventarc import notification_to_cloudevent
from tests.helpers import load_json

GOLDEN = load_json("gcs_notification_finalize.json")


def test_finalize_notification_becomes_a_binary_mode_storage_cloudevent():
    headers, body = notification_to_cloudevent(GOLDEN["attributes"], json.dumps(GOLDEN["data"]).encode(), "77")

    assert headers["ce-type"] == "google.cloud.storage.object.v1.finalized"
    assert headers["ce-source"] == "//storage.googleapis.com/projects/_/buckets/uploads"
    assert headers["ce-subject"] == "objects/incoming/golden/cat photo.png"
    assert headers["ce-id"] == "77" and headers["ce-specversion"] == "1.0"
    assert headers["ce-time"] == GOLDEN["attributes"]["eventTime"]
    event = from_http(headers, body)  # the same parser functions-framework uses
    assert event.get_data()["generation"] == GOLDEN["data"]["generation"]
    assert event["bucket"] == "uploads"


def test_other_notification_types_are_not_forwarded():
    attributes = {**GOLDEN["attributes"], "eventType": "OBJECT_DELETE"}
    assert notification_to_cloudevent(attributes, b"{}", "1") is None

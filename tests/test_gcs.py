"""The media download: URL, CRC32C check and failure classes, against a local HTTP server."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import google_crc32c
import pytest
import urllib3

from worker.batch import PermanentError
from worker.gcs import GcsFetcher, crc32c_of, media_url
from worker.jobs import Job


def test_media_url_escapes_the_object_name_and_pins_the_generation():
    assert media_url("http://h:1/", "b", "incoming/a b/ü.png", 7) == (
        "http://h:1/download/storage/v1/b/b/o/incoming%2Fa%20b%2F%C3%BC.png?alt=media&generation=7")


def test_crc32c_is_read_from_the_x_goog_hash_header():
    digest = google_crc32c.Checksum(b"abc").digest()
    header = f"crc32c={base64.b64encode(digest).decode()},md5=kAFQmDzST7DWlj99KOF/cg=="
    assert crc32c_of(header) == digest and crc32c_of(None) is None and crc32c_of("md5=x") is None


class _Handler(BaseHTTPRequestHandler):
    responses: list[tuple[int, bytes, str | None]] = []
    paths: list[str] = []

    def do_GET(self):
        self.paths.append(self.path)
        status, body, hash_header = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        self.send_response(status)
        if hash_header:
            self.send_header("x-goog-hash", hash_header)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.responses, _Handler.paths = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def job() -> Job:
    return Job(event_key="b/x.png#3", bucket="b", name="x.png", generation=3, size=7, content_type="image/png",
               time_created=None, function_received_at=None, run_id=None)


def crc_header(data: bytes) -> str:
    return "crc32c=" + base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def fetcher(endpoint: str) -> GcsFetcher:
    return GcsFetcher(urllib3.PoolManager(retries=False), endpoint, timeout_s=5)


def test_a_download_retries_a_503_and_a_corrupt_transfer_then_returns_the_bytes(server):
    _, endpoint = server
    _Handler.responses = [(503, b"busy", None), (200, b"garbled", crc_header(b"payload")),
                          (200, b"payload", crc_header(b"payload"))]
    assert fetcher(endpoint).fetch(job()) == b"payload"
    assert len(_Handler.paths) == 3 and all("generation=3" in path for path in _Handler.paths)


def test_a_missing_generation_is_a_permanent_object_not_found(server):
    _, endpoint = server
    _Handler.responses = [(404, b"not found", None)]
    with pytest.raises(PermanentError) as raised:
        fetcher(endpoint).fetch(job())
    assert raised.value.reason == "object_not_found" and "gs://b/x.png generation 3" in str(raised.value)


def test_a_forbidden_download_names_the_object_and_the_permission(server):
    _, endpoint = server
    _Handler.responses = [(403, b"denied", None)]
    with pytest.raises(RuntimeError, match="gs://b/x.png: HTTP 403.*permissions"):
        fetcher(endpoint).fetch(job())

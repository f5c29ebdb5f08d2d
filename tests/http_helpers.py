"""Helpers for the HTTP face's tests: OIDC tokens signed by a test key, a certificates server,
and a check of rows against the BigQuery schema in sql/."""

from __future__ import annotations

import datetime as dt
import functools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEY_ID = "test-key-1"
PUSH_AUDIENCE = "https://worker.example.test/pubsub/push"
PUSH_SERVICE_ACCOUNT = "push-invoker@test-project.iam.gserviceaccount.com"


@functools.cache
def signing_key() -> tuple[str, str]:
    """(private key PEM, self-signed certificate PEM): a stand-in for one of Google's keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-signer")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    return private_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def certs_json() -> bytes:
    return json.dumps({KEY_ID: signing_key()[1]}).encode()


def push_token(audience: str = PUSH_AUDIENCE, email: str = PUSH_SERVICE_ACCOUNT, issuer: str = "https://accounts.google.com",
               expires_in_s: int = 600) -> str:
    """An ID token shaped like the one Pub/Sub push attaches (signed by the test key)."""
    from google.auth import crypt, jwt

    now = int(time.time())
    payload = {"iss": issuer, "aud": audience, "sub": "1234567890", "email": email, "email_verified": True,
               "iat": now, "exp": now + expires_in_s}
    signer = crypt.RSASigner.from_string(signing_key()[0], key_id=KEY_ID)
    return jwt.encode(signer, payload).decode()


class FakeTransport:
    """A google.auth transport Request answering the certificates URL; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        self.calls += 1
        return _Answer(200, certs_json())


class _Answer:
    def __init__(self, status: int, data: bytes):
        self.status, self.data, self.headers = status, data, {}


class CertsServer:
    """Serves certs_json() over HTTP on 127.0.0.1 (the server under test fetches from it)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = certs_json()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/oauth2/v1/certs"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def schema(table: str) -> list[dict]:
    return json.loads((REPO / "sql" / f"{table}_schema.json").read_text())


_PYTHON_TYPES = {"STRING": (str,), "INTEGER": (int,), "FLOAT": (int, float), "BOOLEAN": (bool,), "TIMESTAMP": (str,)}


def schema_problems(row: dict, table: str = "results") -> list[str]:
    """Why BigQuery would refuse the row: unknown columns, missing required ones, wrong types."""
    return _problems(row, schema(table))


def _problems(row: dict, fields_list: list[dict], prefix: str = "") -> list[str]:
    fields = {f["name"]: f for f in fields_list}
    problems = [f"unknown column {prefix}{name}" for name in row if name not in fields]
    for name, spec in fields.items():
        value = row.get(name)
        if value is None:
            if spec.get("mode") == "REQUIRED":
                problems.append(f"required column {prefix}{name} is missing")
            continue
        values = value if spec.get("mode") == "REPEATED" else [value]
        if spec.get("mode") == "REPEATED" and not isinstance(value, list):
            problems.append(f"{prefix}{name}={value!r} is not a list (REPEATED)")
            continue
        for item in values:
            if spec["type"] == "RECORD":
                problems += (_problems(item, spec["fields"], f"{prefix}{name}.") if isinstance(item, dict)
                             else [f"{prefix}{name}={item!r} is not a RECORD"])
                continue
            kinds = _PYTHON_TYPES[spec["type"]]
            if not isinstance(item, kinds) or (spec["type"] in ("INTEGER", "FLOAT") and isinstance(item, bool)):
                problems.append(f"{prefix}{name}={item!r} is not {spec['type']}")
            elif spec["type"] == "TIMESTAMP":
                dt.datetime.fromisoformat(item)
    return problems


# --- both web frameworks ------------------------------------------------------------------------

FRAMEWORKS = ("flask", "fastapi")


class AsgiServer:
    """An ASGI app under uvicorn for real, in a thread of this process, on a free loopback port,
    with the settings `serve` uses (worker/http/uvicorn_conf.py)."""

    def __init__(self, app, threads: int = 8):
        import uvicorn

        from localcloud.config import free_ports
        from worker.http import uvicorn_conf
        from worker.settings import HttpSettings

        port = free_ports(1)[0]
        settings = {**uvicorn_conf.config_kwargs(HttpSettings(host="127.0.0.1", port=port, threads=threads)),
                    "log_level": "warning"}
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, **settings))
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


class Answer:
    """A requests response with the face of a Flask test-client response (status_code, json,
    headers, content_type, get_data), so one test body checks either framework."""

    def __init__(self, response):
        self._response = response
        self.status_code = response.status_code
        self.headers = response.headers
        self.content_type = response.headers.get("Content-Type", "")

    @property
    def json(self):
        return self._response.json() if self.content_type.startswith("application/json") else None

    def get_data(self, as_text: bool = False):
        return self._response.text if as_text else self._response.content


class HttpClient:
    """Requests over HTTP, called like Flask's test client: data as bytes (with content_type) or
    as a form dict whose (file, filename, content type) tuples are files; json; headers."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, headers: dict | None = None) -> Answer:
        import requests

        return Answer(requests.get(self.url + path, headers=headers, timeout=30))

    def post(self, path: str, data=None, json=None, content_type: str | None = None,
             headers: dict | None = None) -> Answer:
        import requests

        headers = dict(headers or {})
        files = None
        if isinstance(data, dict):  # multipart, even without a file part
            files = [(name, (value[1], value[0], value[2]) if isinstance(value, tuple) else (None, value))
                     for name, value in data.items()]
            data = None
        elif content_type:
            headers["Content-Type"] = content_type
        return Answer(requests.post(self.url + path, data=data, json=json, files=files, headers=headers, timeout=30))

"""Who may push: the OIDC token Pub/Sub attaches to push requests, checked like Google's samples do.

A push subscription with an authentication service account sends
`Authorization: Bearer <Google-signed ID token>` whose audience is the one configured on the
subscription and whose email is that service account. With WORKER_HTTP_PUSH_AUDIENCE set, a push
without such a token is refused (401 no or bad token, 403 someone else's token).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CERTS_CACHE_S = 300.0  # Google rotates its signing keys over days; its certs answer says max-age ~6 h
CLOCK_SKEW_S = 10

# (token, audience) -> claims; raises ValueError / google.auth exceptions like id_token.verify_token.
TokenDecoder = Callable[[str, str], Mapping[str, object]]


class PushAuthError(Exception):
    """The push request is not allowed (401/403) or cannot be checked now (503)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


class PushTokenVerifier:
    def __init__(self, audience: str, service_account: str = "", decode: TokenDecoder | None = None,
                 certs_url: str = "https://www.googleapis.com/oauth2/v1/certs"):
        self._audience = audience
        self._service_account = service_account
        self._decode = decode or google_token_decoder(certs_url)

    def verify(self, authorization: str | None) -> Mapping[str, object]:
        """The token's claims, or PushAuthError."""
        from google.auth import exceptions

        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise PushAuthError(401, "missing_token", "push requests must carry 'Authorization: Bearer <OIDC token>' "
                                "(configure the push subscription with an authentication service account)")
        try:
            claims = self._decode(token.strip(), self._audience)
        except exceptions.TransportError as exc:
            raise PushAuthError(503, "certs_unavailable", f"cannot fetch Google's signing certificates: {exc}")
        except (ValueError, exceptions.GoogleAuthError) as exc:
            raise PushAuthError(401, "invalid_token", f"the token does not verify for audience "
                                f"{self._audience!r}: {exc}")
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise PushAuthError(401, "invalid_token", f"the token's issuer {claims.get('iss')!r} is not Google")
        if self._service_account and not (claims.get("email") == self._service_account
                                          and claims.get("email_verified") is True):
            raise PushAuthError(403, "wrong_identity", f"the token belongs to {claims.get('email')!r}, not the "
                                f"push service account {self._service_account!r}")
        return claims


def google_token_decoder(certs_url: str, cache_s: float = CERTS_CACHE_S, transport=None) -> TokenDecoder:
    """Verify with google.oauth2.id_token against the certificates at certs_url, fetched at most
    once per cache_s (id_token alone fetches them on every call). transport: a google.auth
    transport Request (default: google.auth.transport.requests.Request())."""
    from google.oauth2 import id_token

    if transport is None:
        from google.auth.transport.requests import Request

        transport = Request()
    request = _CachingGetRequest(transport, cache_s)

    def decode(token: str, audience: str) -> Mapping[str, object]:
        return id_token.verify_token(token, request, audience=audience, certs_url=certs_url,
                                     clock_skew_in_seconds=CLOCK_SKEW_S)

    return decode


class _CachingGetRequest:
    """A google.auth transport Request that remembers successful GET answers for cache_s."""

    def __init__(self, inner, cache_s: float, clock: Callable[[], float] = time.monotonic):
        self._inner = inner
        self._cache_s = cache_s
        self._clock = clock
        self._answers: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        if method != "GET" or body is not None:
            return self._inner(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        with self._lock:
            cached = self._answers.get(url)
        if cached and self._clock() - cached[0] < self._cache_s:
            return cached[1]
        response = self._inner(url, method=method, headers=headers, timeout=timeout or 10, **kwargs)
        if response.status == 200:
            with self._lock:
                self._answers[url] = (self._clock(), response)
        return response

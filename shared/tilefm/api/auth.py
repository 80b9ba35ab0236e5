"""API keys: only their sha256 is configured; a presented key is hashed and compared in constant
time against every configured hash. Sent as `Authorization: Bearer KEY` or `X-API-Key: KEY` (HTTP
headers, or the same gRPC metadata: `tilefm.api.grpc_auth`)."""

from __future__ import annotations

import hashlib
import hmac
import logging

from fastapi import Depends, HTTPException, Request, params

from tilefm.settings import Settings

log = logging.getLogger(__name__)

READ, WRITE = "jobs:read", "jobs:write"


class Unauthenticated(Exception):
    """No API key, or one that is not configured (HTTP 401, gRPC UNAUTHENTICATED)."""


class Forbidden(Exception):
    """A known API key without the scope the call needs (HTTP 403, gRPC PERMISSION_DENIED)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, settings: Settings):
        self.disabled = settings.auth_disabled
        self.keys = [
            (k["sha256"].lower(), set(k.get("scopes", [READ, WRITE])), k.get("name", ""))
            for k in settings.api_keys
        ]
        if self.disabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (TILEFM_AUTH_DISABLED=true): anyone who can reach this port can "
                "submit jobs"
            )
        elif not self.keys:
            log.warning("no API keys configured (TILEFM_API_KEYS): every request will be refused with 401")

    def scopes_for(self, presented: str) -> set[str] | None:
        digest = hash_key(presented)
        found = None
        for h, scopes, _name in self.keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, h):
                found = scopes
        return found

    def authorize(self, key: str | None, scope: str) -> None:
        """Whether a call presenting `key` may use `scope`.

        Args:
            key: the presented key (None: none was sent).
            scope: READ or WRITE.

        Raises:
            Unauthenticated: no key, or an unknown one (unless authentication is disabled).
            Forbidden: the key lacks `scope`.
        """
        if self.disabled:
            return
        if key is None:
            raise Unauthenticated("missing API key: send Authorization: Bearer KEY or X-API-Key: KEY")
        scopes = self.scopes_for(key)
        if scopes is None:
            raise Unauthenticated("unknown API key")
        if scope not in scopes:
            raise Forbidden(f"this API key lacks the scope {scope!r}")


def key_from(authorization: str | None, api_key: str | None) -> str | None:
    """The key a caller presents: `Authorization: Bearer KEY` first, else `X-API-Key: KEY`."""
    auth = authorization or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return api_key or None


def presented_key(request: Request) -> str | None:
    return key_from(request.headers.get("authorization"), request.headers.get("x-api-key"))


def require(scope: str) -> params.Depends:
    async def dependency(request: Request) -> None:  # async: no thread-pool hop for a hash and a compare
        ring: KeyRing = request.app.state.keyring
        try:
            ring.authorize(presented_key(request), scope)
        except Unauthenticated as e:
            raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None
        except Forbidden as e:
            raise HTTPException(403, str(e)) from None

    dep: params.Depends = Depends(dependency)  # typed as returning Any
    return dep

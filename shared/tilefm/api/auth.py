"""API keys: only their sha256 is configured; a presented key is hashed and compared in constant
time against every configured hash. Sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request

from tilefm.settings import Settings

log = logging.getLogger(__name__)

READ, WRITE = "jobs:read", "jobs:write"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, settings: Settings):
        self.disabled = settings.auth_disabled
        self.keys = [(k["sha256"].lower(), set(k.get("scopes", [READ, WRITE])), k.get("name", "")) for k in settings.api_keys]
        if self.disabled:
            log.warning("AUTHENTICATION IS DISABLED (TILEFM_AUTH_DISABLED=true): anyone who can reach this port can submit jobs")
        elif not self.keys:
            log.warning("no API keys configured (TILEFM_API_KEYS): every request will be refused with 401")

    def scopes_for(self, presented: str) -> set[str] | None:
        digest = hash_key(presented)
        found = None
        for h, scopes, _name in self.keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, h):
                found = scopes
        return found


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def require(scope: str) -> Callable[..., None]:
    async def dependency(request: Request) -> None:  # async: no thread-pool hop for a hash and a compare
        ring: KeyRing = request.app.state.keyring
        if ring.disabled:
            return
        key = presented_key(request)
        if key is None:
            raise HTTPException(401, "missing API key: send Authorization: Bearer KEY or X-API-Key: KEY", headers={"WWW-Authenticate": "Bearer"})
        scopes = ring.scopes_for(key)
        if scopes is None:
            raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        if scope not in scopes:
            raise HTTPException(403, f"this API key lacks the scope {scope!r}")

    return Depends(dependency)

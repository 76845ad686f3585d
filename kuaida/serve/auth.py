"""API-key check for the /v1 routes, and who owns a session.

With keys configured (one per user, comma-separated), every /v1 request needs `Authorization: Bearer
KEY` with one of them, and sessions belong to sha256(KEY): the store never sees a key itself, and
another key's sessions answer 404. Without keys the server is open (bind it to 127.0.0.1) and every
session has the same owner, None.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kuaida.errors import KuaidaError


class AuthenticationError(KuaidaError):
    """Missing or wrong API key (the server answers 401)."""


# auto_error=False: we answer a missing header ourselves, with an OpenAI-style 401 rather than a 403.
bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key / KUAIDA_API_KEY).")


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(spec: str | None) -> tuple[str, ...]:
    """"KEY" or "KEY1,KEY2" -> the keys; None -> () (no authentication)."""
    return tuple(k.strip() for k in (spec or "").split(",") if k.strip())


def check_key(keys: tuple[str, ...], given: str | None) -> str | None:
    """-> the owner of the caller's sessions; raises AuthenticationError when no key matches."""
    if not keys:
        return None
    if given is None:
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer YOUR_KEY'")
    # Constant-time comparisons against every key: neither the key nor which one matched leaks by timing.
    if not sum(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise AuthenticationError("incorrect API key")
    return owner_of(given)


def request_owner(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str | None:
    """FastAPI dependency of every /v1 route."""
    return check_key(request.app.state.config.api_keys, credentials.credentials if credentials else None)

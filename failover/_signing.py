"""Webhook signatures: ``sha256=`` and the hex HMAC-SHA256 of the body under a shared
secret, in one header; shared by the httpx kit, the simulated channels and the gateway
simulator."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def signed(secret: str | bytes, headers: Mapping[str, str], body: bytes,
           header: str = "X-Signature") -> bool:
    """Whether ``headers`` carry the signature of ``body`` under ``secret`` (the header
    name matched ignoring case, compared in constant time)."""
    given = next((v for k, v in headers.items() if k.lower() == header.lower()), "")
    return hmac.compare_digest(given.encode(), sign(secret, body).encode())

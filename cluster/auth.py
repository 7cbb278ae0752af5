"""API keys: `ct2i_<random>` secrets of which only a hash is stored; scope `tenant` or `admin`; revocable.

The hash is HMAC-SHA256 keyed by `CT2I_KEY_PEPPER` when one is configured (a stolen database alone then
cannot be used to test guesses), plain SHA-256 otherwise. Keys carry 256 bits of randomness, so a fast
hash is enough; lookups go by the hash's unique index.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cluster.db import ApiKey

KEY_PREFIX = "ct2i_"


@dataclass(frozen=True)
class Principal:
    key_id: str
    scope: str
    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def hash_key(secret: str, pepper: str = "") -> str:
    if pepper:
        return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key-" + secrets.token_hex(6)


def authenticate(session: Session, secret: str | None, pepper: str = "") -> Principal | None:
    """The principal of a live key, or None for a missing, unknown or revoked one."""
    if not secret or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        return None
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(secret, pepper))).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, scope=row.scope, tenant=row.tenant)


def revoke(session: Session, key_id: str, now: float) -> bool:
    result = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now))
    return result.rowcount == 1


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None

"""Tenants and their API keys.

A key is `fd2_<8 hex prefix>_<43 random chars>`: the prefix finds the row (and names the key in
listings and revocations), and only the SHA-256 of the whole key is stored, compared in constant
time. A tenant's row also serves as its lock (`lock_tenant`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import ApiKey, Tenant, utcnow

KEY_PATTERN = re.compile(r"^(fd2_[0-9a-f]{8})_[A-Za-z0-9_-]{20,}$")
PREFIX_PATTERN = re.compile(r"^fd2_[0-9a-f]{8}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str | None:
    """The stored prefix of a well-formed key, None for anything else."""
    match = KEY_PATTERN.match(key)
    return match.group(1) if match else None


def get_or_create_tenant(session: Session, tenant_name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    return tenant


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise the tenant's check-then-write steps until the caller's transaction ends.

    A no-op write to the tenant's row: on PostgreSQL it takes the row lock (FOR NO KEY UPDATE, so
    inserts whose foreign key names the tenant still pass), on SQLite the database's write lock,
    which `SELECT … FOR UPDATE` would not. Take it before reading what the check depends on, so the
    reads see every write of the previous holder (a fresh snapshot on both databases).
    """
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
                    .execution_options(synchronize_session=False))


def create_tenant_key(session: Session, tenant_name: str) -> str:
    """Create a key for `tenant_name` (creating the tenant if missing); the plaintext is returned
    only here."""
    tenant_name = tenant_name.strip()
    if not tenant_name:
        raise ValueError("tenant name must not be empty")
    tenant = get_or_create_tenant(session, tenant_name)
    while True:
        prefix = f"fd2_{secrets.token_hex(4)}"
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    key = f"{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key)))
    session.flush()
    return key


def revoke_key(session: Session, key_or_prefix: str) -> bool:
    """Revoke a key given whole or by its `fd2_xxxxxxxx` prefix; False when no active key
    matched."""
    text = key_or_prefix.strip()
    prefix = text if PREFIX_PATTERN.match(text) else key_prefix(text)
    if prefix is None:
        return False
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
    if row is None:
        return False
    if prefix != text and not hmac.compare_digest(row.key_hash, hash_key(text)):
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant owning an active `key`, or None (unknown, malformed or revoked)."""
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(key)) or row.revoked_at is not None:
        return None
    return row.tenant


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None


def list_keys(session: Session, tenant_name: str | None = None) -> list[KeyInfo]:
    """Keys (never their secrets) for an operator listing, oldest first."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [KeyInfo(k.prefix, name, k.created_at, k.revoked_at) for k, name in session.execute(query)]

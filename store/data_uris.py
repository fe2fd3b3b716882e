"""Which buckets and prefixes each tenant's jobs may read by reference (`s3://bucket/prefix`).

The operator grants them (`fd2 uris allow <tenant> s3://…`); a tenant without a grant may reference
nothing, and a reference is checked against its grants before any call to the store
(`fd2_core.data.object_uris.allowed_by`), so a refused reference reveals nothing about the bucket.
References are stored as the caller normalised them (`parse_object_uri`, which this layer does not
import).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from store.keys import get_or_create_tenant
from store.models import DataUriGrant, Tenant


@dataclass(frozen=True)
class Grant:
    tenant: str
    uri: str
    created_at: datetime


def allow_uri(session: Session, tenant_name: str, uri: str) -> str:
    """Grant `tenant_name` (created when new) reads under `uri`, a normalised `s3://bucket/prefix`;
    returns it. Raises ValueError for an empty tenant name."""
    tenant_name = tenant_name.strip()
    if not tenant_name:
        raise ValueError("tenant name must not be empty")
    tenant = get_or_create_tenant(session, tenant_name)
    if session.get(DataUriGrant, (tenant.id, uri)) is None:
        session.add(DataUriGrant(tenant_id=tenant.id, uri=uri))
        session.flush()
    return uri


def revoke_uri(session: Session, tenant_name: str, uri: str) -> bool:
    """Withdraw one grant; False when the tenant had no such grant."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name.strip()))
    if tenant is None:
        return False
    removed = session.execute(delete(DataUriGrant).where(DataUriGrant.tenant_id == tenant.id,
                                                         DataUriGrant.uri == uri))
    return bool(removed.rowcount)


def list_grants(session: Session, tenant_name: str | None = None) -> list[Grant]:
    """Every grant (or one tenant's), by tenant then reference."""
    query = select(Tenant.name, DataUriGrant.uri, DataUriGrant.created_at).join(
        Tenant, Tenant.id == DataUriGrant.tenant_id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name.strip())
    return [Grant(*row) for row in session.execute(query.order_by(Tenant.name, DataUriGrant.uri))]


def tenant_grants(session: Session, tenant_id: str) -> list[str]:
    """The references a tenant's jobs may read under."""
    return list(session.scalars(select(DataUriGrant.uri).where(DataUriGrant.tenant_id == tenant_id)))

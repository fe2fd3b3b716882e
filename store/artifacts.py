"""Artifacts: files a job produced, registered with size and SHA-256 so downloads can be verified.

Only registered names are ever served, so a download URL cannot reach any other file on disk.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, contains_eager

from store.models import Artifact, Job, is_public_id

CHUNK_BYTES = 1024 * 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MEDIA_TYPES: dict[str, str] = {
    ".tar.gz": "application/gzip",
    ".tgz": "application/gzip",
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".png": "image/png",
    ".csv": "text/csv",
    ".txt": "text/plain",
}


def media_type_for(name: str) -> str:
    lowered = name.lower()
    for suffix, media_type in MEDIA_TYPES.items():
        if lowered.endswith(suffix):
            return media_type
    return "application/octet-stream"


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) read in chunks, so multi-gigabyte files never sit in memory."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def register_artifact(session: Session, job_id: str, name: str, path: str | Path) -> Artifact:
    """Record (or replace, on a re-run) the artifact `name` of a job, hashing the file at `path`."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"artifact name must be a plain file name: {name!r}")
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    size, sha256 = file_digest(path)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        artifact = Artifact(job_id=job_id, name=name)
        session.add(artifact)
    artifact.path = str(path)
    artifact.size = size
    artifact.sha256 = sha256
    artifact.media_type = media_type_for(name)
    session.flush()
    return artifact


def register_artifacts(session: Session, job_id: str, artifacts: dict[str, str | Path]) -> None:
    """`register_artifact` for each `{name: path}` of a finished run, in name order."""
    for name, path in sorted(artifacts.items()):
        register_artifact(session, job_id, name, path)


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_tenant_artifact(session: Session, tenant_id: str, job_id: str, name: str) -> Artifact | None:
    """The artifact only if its job belongs to the tenant (else None, like an
    unknown name), with its job loaded (`artifact.job.artifacts_expired_at`
    says whether the file was removed for age)."""
    if not is_public_id(job_id) or not NAME_PATTERN.fullmatch(name):
        return None
    return session.scalar(
        select(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .options(contains_eager(Artifact.job))
        .where(Artifact.job_id == job_id, Artifact.name == name, Job.tenant_id == tenant_id)
    )

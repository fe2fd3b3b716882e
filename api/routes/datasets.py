"""Dataset upload, listing, reading and deletion (async routes, blocking work in one thread-pool
call)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.dataset_intake import receive_dataset
from api.deps import ReaderDep, SessionDep, SettingsDep, TenantDep
from api.errors import ApiError, error_responses, not_found
from api.schemas import DatasetOut, DatasetPage
from api.storage_errors import DELETE_PENDING_RESPONSE, deletion_pending
from fd2_config.settings import Settings
from store.datasets import (
    DatasetInUse,
    delete_unused_dataset,
    get_tenant_dataset,
    list_datasets,
    remove_dataset_files,
)
from store.models import Dataset
from store.pagination import InvalidCursor, Page
from store.resources import dataset_resource

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "A .zip, .tar or .tar.gz/.tgz archive of images in one folder "
                                 "per class (<class>/<image>, or train/<class>/<image> with "
                                 "test/<class>/<image>). The only field that takes a file."},
                        "name": {"type": "string", "maxLength": 200,
                                 "description": "Display name (default: the archive's file name)."},
                        "drop_duplicates": {
                            "type": "boolean", "default": False,
                            "description": "Drop images whose decoded pixels repeat another image of their split "
                            "(the first by path is kept) and test images whose pixels occur in train; dropped "
                            "files are listed in `errors`. Counted in `duplicates` either way.",
                        },
                    },
                }
            }
        },
    }
}
ERRORS = error_responses(404, 409)
UPLOAD_ERRORS = error_responses(400, 408, 415, 503)


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=UPLOAD_BODY, responses=UPLOAD_ERRORS,
             summary="Upload an image archive as a dataset")
async def upload_dataset(request: Request, session: SessionDep, settings: SettingsDep,
                         tenant: TenantDep) -> dict[str, Any]:
    """Stream the archive to disk (413 past the size limit), extract it safely, check every image,
    count duplicates and test images that occur in train (dropped with `drop_duplicates=true`), and
    answer with the ready dataset; on any failure nothing is kept."""
    dataset = await receive_dataset(request, session, settings, tenant)
    return dataset_resource(dataset)


@router.get("", response_model=DatasetPage, responses=ERRORS, summary="List datasets, newest first")
async def read_datasets(
    reader: ReaderDep,
    settings: SettingsDep,
    tenant: TenantDep,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    limit = min(limit or settings.page_size_default, settings.page_size_max)
    try:
        page: Page[Dataset] = await reader.run(list_datasets, tenant.id, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise ApiError(422, "invalid_cursor", str(exc), {"field": "cursor"}) from None
    return {"items": [dataset_resource(d) for d in page.items], "next_cursor": page.next_cursor}


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS, summary="Read a dataset")
async def read_dataset(dataset_id: str, reader: ReaderDep, tenant: TenantDep) -> dict[str, Any]:
    dataset = await reader.run(get_tenant_dataset, tenant.id, dataset_id)
    if dataset is None:
        raise not_found("dataset")
    return dataset_resource(dataset)


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses={**ERRORS, **DELETE_PENDING_RESPONSE},
               summary="Delete a dataset and its files (409 while a queued or running job uses it)")
async def remove_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep,
                         tenant: TenantDep) -> Response:
    """204 once row and files are gone; 202 when the disk (read-only) kept the files: the dataset
    is gone all the same and the storage sweep removes its folder later."""
    if not await run_in_threadpool(_delete_unused_dataset, session, settings, tenant.id, dataset_id):
        return deletion_pending(dataset_id, "dataset")
    return Response(status_code=204)


def _delete_unused_dataset(session: Session, settings: Settings, tenant_id: str, dataset_id: str) -> bool:
    """The check for active jobs and the delete are one store call under the tenant's lock, so a job
    submitted at the same moment is either refused (dataset gone) or makes this answer 409.
    Returns whether the files are gone too."""
    try:
        deleted = delete_unused_dataset(session, tenant_id, dataset_id)
    except DatasetInUse:
        session.rollback()
        raise ApiError(409, "dataset_in_use", "a queued or running job uses this dataset; cancel the job or wait "
                       "until it ends, then delete the dataset") from None
    if not deleted:
        session.rollback()
        raise not_found("dataset")
    session.commit()
    return remove_dataset_files(settings, dataset_id)

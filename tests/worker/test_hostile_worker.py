"""Defence in depth on the worker: data changed after submission cannot lead a job outside its
folders or past the operator's limits.
Each case tampers with files after the job was queued, then runs the real `JobRunner`, which must
fail the job with a clear code before any stage starts (or skip the bad file)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_corpus import image_bytes, png_header_only, tree
from pipeline_helpers import tiny_spec
from service_harness import embedded_settings

from fd2_config.settings import Settings
from fd2_core.spec_resolution import resolve_spec
from store.datasets import create_dataset, dataset_path
from store.db import dispose_engines, migrate, session_scope
from store.job_states import worker_identity
from store.jobs import create_job, get_job, job_source, job_workdir, list_events
from store.keys import get_or_create_tenant
from store.models import Dataset, new_id
from worker.celery_app import WorkerState
from worker.job_runner import JobRunner
from worker.source_check import JobSource, prepare_source

CLASSES = {"wren": 6, "finch": 6}


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    allowed = tmp_path / "shared"
    allowed.mkdir()
    settings = embedded_settings(tmp_path / "home", allowed_data_roots=[allowed])
    migrate(settings)
    yield settings
    dispose_engines()


def write_tree(folder: Path, classes: dict[str, int] = CLASSES) -> Path:
    for member, data in tree(classes).items():
        (folder / member).parent.mkdir(parents=True, exist_ok=True)
        (folder / member).write_bytes(data)
    return folder


def queued_upload_job(settings: Settings) -> tuple[str, Path]:
    """A queued job over an uploaded dataset stored where the API puts it;
    returns (job id, data folder)."""
    dataset_id = new_id("ds")
    folder = write_tree(dataset_path(settings, dataset_id) / "data")
    with session_scope(settings) as session:
        tenant = get_or_create_tenant(session, "acme")
        summary = {"num_classes": 2, "classes": sorted(CLASSES), "splits": {"train": 10, "test": 2},
                   "per_class": {name: {"train": n - 1, "test": 1} for name, n in CLASSES.items()}}
        create_dataset(session, dataset_id=dataset_id, tenant_id=tenant.id, name="birds", summary=summary,
                       path=folder, size_bytes=1, has_test_split=False)
        job = create_job(session, tenant_id=tenant.id, spec=resolve_spec(tiny_spec()).model_dump(mode="json"),
                         queue="fd2.cpu", dataset_id=dataset_id)
        return job.id, folder


def queued_manifest_job(settings: Settings) -> tuple[str, Path]:
    """A queued manifest job as the API stores it; returns (job id, stored manifest file)."""
    root = write_tree(settings.allowed_data_roots[0] / "birds")
    items = [{"path": member, "label": member.split("/")[0]} for member in tree(CLASSES)]
    with session_scope(settings) as session:
        tenant = get_or_create_tenant(session, "acme")
        job_id = new_id("job")
        manifest = job_workdir(settings, job_id) / "manifest.json"
        manifest.parent.mkdir(parents=True)
        manifest.write_text(json.dumps({"root": str(root), "items": items}))
        create_job(session, job_id=job_id, tenant_id=tenant.id, queue="fd2.cpu", manifest_path=str(manifest),
                   spec=resolve_spec(tiny_spec()).model_dump(mode="json"))
    return job_id, manifest


def run_job(settings: Settings, job_id: str) -> dict[str, Any]:
    runner = JobRunner(WorkerState.create(settings), worker_identity())
    assert runner.run(job_id) == "failed"
    with session_scope(settings) as session:
        job = get_job(session, job_id)
        stages = [e.stage for e in list_events(session, job_id, limit=1000) if e.stage]
        assert job is not None
        assert stages == [], "no stage may start on data that failed its checks"
        return dict(job.error or {})


def swap_folder_for_link(settings: Settings, folder: Path) -> None:
    outside = settings.home.parent / "elsewhere"
    write_tree(outside)
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)


def point_at_other_dataset(settings: Settings, job_id: str) -> None:
    other = write_tree(dataset_path(settings, new_id("ds")) / "data")
    with session_scope(settings) as session:
        job = get_job(session, job_id)
        assert job is not None and job.dataset_id is not None
        dataset = session.get(Dataset, job.dataset_id)
        assert dataset is not None
        dataset.path = str(other)


def add_files(count: int) -> Callable[[Settings, Path], None]:
    def tamper(settings: Settings, folder: Path) -> None:
        for i in range(count):
            (folder / "wren" / f"extra{i}.png").write_bytes(image_bytes(color=(i % 256, 0, 0)))
    return tamper


UPLOAD_TAMPERING: list[tuple[str, Callable[..., None], dict[str, Any], str]] = [
    ("dataset_folder_swapped_for_a_link", lambda s, f, j: swap_folder_for_link(s, f), {}, "path_escape"),
    ("row_pointed_at_another_dataset", lambda s, f, j: point_at_other_dataset(s, j), {}, "path_escape"),
    ("dataset_folder_deleted", lambda s, f, j: shutil.rmtree(f), {}, "not_found"),
    ("files_added_past_the_file_limit", lambda s, f, j: add_files(30)(s, f), {"max_archive_members": 20},
     "too_many_files"),
    ("files_added_past_the_memory_limit", lambda s, f, j: add_files(30)(s, f),
     {"max_dataset_memory_bytes": 40_000}, "dataset_too_large"),
    ("files_added_past_the_cost_limit", lambda s, f, j: add_files(30)(s, f), {"max_job_cost": 250},
     "cost_too_high"),
]


@pytest.mark.parametrize(("tamper", "overrides", "code"), [case[1:] for case in UPLOAD_TAMPERING],
                         ids=[case[0] for case in UPLOAD_TAMPERING])
def test_tampered_upload_fails_before_any_stage(settings: Settings, tamper: Callable[..., None],
                                                overrides: dict[str, Any], code: str) -> None:
    job_id, folder = queued_upload_job(settings)
    tamper(settings, folder, job_id)
    error = run_job(settings.model_copy(update=overrides), job_id)
    assert error["code"] == code
    assert str(settings.home) not in error["message"]


def _set_root(root: str) -> Callable[[Settings, Path], None]:
    def tamper(settings: Settings, manifest: Path) -> None:
        stored = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**stored, "root": root}))
    return tamper


def _escaping_row(settings: Settings, manifest: Path) -> None:
    stored = json.loads(manifest.read_text())
    secret = settings.allowed_data_roots[0].parent / "secret.png"
    secret.write_bytes(image_bytes())
    stored["items"].append({"path": "../../secret.png", "label": "wren"})
    manifest.write_text(json.dumps(stored))


def _moved_manifest(settings: Settings, manifest: Path) -> None:
    elsewhere = settings.home / "elsewhere.json"
    shutil.copy(manifest, elsewhere)
    manifest.unlink()
    manifest.symlink_to(elsewhere)


MANIFEST_TAMPERING: list[tuple[str, Callable[[Settings, Path], None], dict[str, Any], str]] = [
    ("manifest_root_moved_outside_allowed_roots", _set_root("/etc"), {}, "data_root_not_allowed"),
    ("manifest_row_leading_out_of_the_root", _escaping_row, {}, "path_escape"),
    ("manifest_file_replaced_by_a_link", _moved_manifest, {}, "not_found"),
    ("manifest_file_inflated", lambda s, m: m.write_text(m.read_text() + " " * 5000), {"max_manifest_bytes": 2000},
     "too_large"),
    ("manifest_file_garbled", lambda s, m: m.write_text("[" * 100_000), {}, "bad_manifest"),
    ("worker_no_longer_allows_the_root", lambda s, m: None, {"allowed_data_roots": []}, "data_root_not_allowed"),
]


@pytest.mark.parametrize(("tamper", "overrides", "code"), [case[1:] for case in MANIFEST_TAMPERING],
                         ids=[case[0] for case in MANIFEST_TAMPERING])
def test_tampered_manifest_job_fails_before_any_stage(settings: Settings, tamper: Callable[[Settings, Path], None],
                                                      overrides: dict[str, Any], code: str) -> None:
    job_id, manifest = queued_manifest_job(settings)
    tamper(settings, manifest)
    error = run_job(settings.model_copy(update=overrides), job_id)
    assert error["code"] == code


def test_links_and_bombs_planted_in_a_dataset_are_skipped_not_read(settings: Settings) -> None:
    """Files that cannot escape or blow memory are contained: listed as errors, never decoded."""
    from fd2_core.data.dataset import load_dataset

    _, folder = queued_upload_job(settings)
    secret = settings.home / "secret.png"
    secret.write_bytes(image_bytes(color=(255, 0, 0)))
    os.symlink(secret, folder / "wren" / "planted.png")
    (folder / "finch" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    spec = resolve_spec(tiny_spec())
    source = prepare_source(settings, "job_x", JobSource("dataset", str(folder), folder.parent.name), spec)
    data = load_dataset(source, 16)
    reasons = {e.path: e.reason for e in data.errors}
    assert "link" in reasons["wren/planted.png"] and "pixels" in reasons["finch/bomb.png"]
    assert len(data.train_labels) + len(data.test_labels) == sum(CLASSES.values())


def test_untampered_sources_pass_the_same_limits(settings: Settings) -> None:
    """The limits used above refuse only the tampered data: the data as submitted passes them."""
    tight = settings.model_copy(update={"max_archive_members": 20, "max_dataset_memory_bytes": 40_000,
                                        "max_job_cost": 250, "max_manifest_bytes": 2000})
    spec = resolve_spec(tiny_spec())
    job_id, folder = queued_upload_job(settings)
    dataset_id = folder.parent.name
    layout = prepare_source(tight, job_id, JobSource("dataset", str(folder), dataset_id), spec)
    assert layout.root == folder and len(layout.items) == sum(CLASSES.values())
    job_id, manifest = queued_manifest_job(settings)
    stored = prepare_source(tight, job_id, JobSource("manifest", str(manifest)), spec)
    assert stored.kind == "manifest" and len(stored.items) == sum(CLASSES.values())


def test_the_worker_scans_once_and_the_pipeline_decodes_that_layout(settings: Settings, monkeypatch) -> None:
    """The layout `prepare_source` checked is what the loader decodes: no
    second scan in the same process."""
    from fd2_core.data import dataset as dataset_module
    from fd2_core.data.layout import DatasetLayout

    job_id, folder = queued_upload_job(settings)
    layout = prepare_source(settings, job_id, JobSource("dataset", str(folder), folder.parent.name),
                            resolve_spec(tiny_spec()))
    assert isinstance(layout, DatasetLayout)

    def no_second_scan(*args, **kwargs):
        raise AssertionError("the loader scanned the source again")

    monkeypatch.setattr(dataset_module, "scan_source", no_second_scan)
    data = dataset_module.load_dataset(layout, 16)
    assert data.classes == layout.classes
    assert len(data.train_labels) == layout.splits["train"] and len(data.test_labels) == layout.splits["test"]


def test_names_decoded_at_upload_are_reported_by_the_job(settings: Settings) -> None:
    """A rescan of an unpacked upload sees decoded names only: the dataset's name warnings travel
    with the job into the loaded data (and so into report.json and the job's warning events);
    duplicate warnings do not, since the job's loader finds those itself."""
    from fd2_core.data.dataset import load_dataset

    job_id, folder = queued_upload_job(settings)
    names = {"code": "names_code_page", "message": "2 names were decoded as cp1252", "details": {"count": 2}}
    leak = {"code": "test_in_train", "message": "1 test image also occurs in train", "details": {}}
    with session_scope(settings) as session:
        session.get(Dataset, folder.parent.name).warnings = [names, leak]
    with session_scope(settings) as session:
        source = job_source(session, settings, job_id)
    assert source is not None and source.warnings == (names,)
    layout = prepare_source(settings, job_id, source, resolve_spec(tiny_spec()))
    assert [w.as_dict() for w in load_dataset(layout, 16).warnings][:1] == [names]

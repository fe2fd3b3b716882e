"""Every case of the hostile corpus through the real API: a documented 4xx with nothing left behind, or a
ready dataset that names each skipped file. Runs on SQLite and, when reachable, on PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from api_helpers import BACKENDS, database_url, make_settings, new_tenant, running_client, tenant_id
from hostile_corpus import BASE, CASES, CORPUS_SETTINGS, Case, Corpus, image_bytes, tree, zip_of
from sqlalchemy import func, select

from fd2_config.queues import GPU_QUEUE
from fd2_config.settings import Settings
from store.artifacts import register_artifact
from store.db import session_scope
from store.jobs import create_job
from store.models import Dataset, Job

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md"


def _data_roots(folder: Path) -> tuple[Path, Path]:
    """An allowed root with two classes, a lone `heron` image and a link leading out; and a folder outside."""
    outside = folder / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes(color=(0, 0, 0)))
    root = folder / "shared" / "birds"
    for member, data in {**tree({"wren": 4, "finch": 4}), "heron/0.png": image_bytes()}.items():
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(data)
    (root / "wren" / "link.png").symlink_to(outside / "secret.png")
    return root, outside


def _ready(corpus_client: Any, headers: dict[str, str], classes: dict[str, int]) -> str:
    response = corpus_client.post("/v1/datasets", headers=headers,
                                  files={"file": ("d.zip", zip_of(tree(classes)), "application/zip")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _job_with_artifact(settings: Settings, headers: dict[str, str], folder: Path) -> tuple[str, int]:
    payload = bytes(range(256)) * 40
    (folder / "report.json").write_bytes(payload)
    with session_scope(settings) as session:
        job = create_job(session, tenant_id=tenant_id(settings, headers), spec={"ipc": 1}, queue=GPU_QUEUE)
        register_artifact(session, job.id, "report.json", folder / "report.json")
        return job.id, len(payload)


@pytest.fixture(scope="module", params=BACKENDS)
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    home = tmp_path_factory.mktemp(f"hostile-{request.param}")
    data_root, outside = _data_roots(home)
    with database_url(request.param, home) as url:
        settings = make_settings(home / "service", url, allowed_data_roots=[data_root.parent.resolve()],
                                 **CORPUS_SETTINGS)
        with running_client(settings) as client:
            caller, victim = new_tenant(settings, "caller"), new_tenant(settings, "victim")
            job_id, size = _job_with_artifact(settings, caller, home)
            victim_job, _ = _job_with_artifact(settings, victim, home)
            yield Corpus(
                client=client, settings=settings, caller=caller,
                dataset_id=_ready(client, caller, {"wren": 8, "finch": 8, "tit": 8}),
                singles_id=_ready(client, caller, {"wren": 1, "finch": 1}),
                job_id=job_id, artifact="report.json", artifact_size=size, victim=victim,
                victim_dataset=_ready(client, victim, BASE), victim_job=victim_job,
                data_root=data_root, outside=outside,
            )


@contextmanager
def service_for(corpus: Corpus, case: Case) -> Iterator[Corpus]:
    """The shared service, or a fresh one on the same database when the case needs other limits."""
    if not case.settings:
        yield corpus
        return
    settings = corpus.settings.model_copy(update=dict(case.settings))
    with running_client(settings) as client:
        yield replace(corpus, client=client, settings=settings)


def footprint(settings: Settings) -> dict[str, Any]:
    """Rows and files a request could leave behind."""
    assert settings.datasets_dir is not None and settings.jobs_dir is not None
    with session_scope(settings) as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset))
        jobs = session.scalar(select(func.count()).select_from(Job))
    incoming = settings.datasets_dir / ".incoming"
    return {
        "datasets": datasets,
        "jobs": jobs,
        "dataset_files": sorted(p.name for p in settings.datasets_dir.iterdir() if p.name != ".incoming"),
        "incoming": sorted(p.name for p in incoming.iterdir()) if incoming.exists() else [],
        "job_folders": sorted(p.name for p in settings.jobs_dir.iterdir()) if settings.jobs_dir.exists() else [],
    }


def check_rejected(case: Case, response: Any, before: dict, after: dict) -> None:
    error = response.json()["error"]
    assert error["code"] == case.expect.code, error
    assert error["message"] and "Traceback" not in error["message"]
    assert after == before, "a rejected input left rows or files behind"


def check_contained(case: Case, corpus: Corpus, response: Any, before: dict, after: dict) -> None:
    body = response.json()
    assert body["status"] == "ready"
    reported = [e["path"] for e in body["errors"]]
    assert all(len(e["path"]) <= 300 and len(e["reason"]) <= 300 for e in body["errors"]), "unbounded error text"
    for path in case.expect.skipped:
        assert path in reported, f"{path!r} is not named in errors: {reported}"
    for path in case.expect.not_reported:
        assert not any(r == path or r.startswith(path + "/") for r in reported), reported
    if case.expect.classes is not None:
        assert tuple(body["classes"]) == case.expect.classes
    for name, count in (case.expect.class_sizes or {}).items():
        assert sum(body["per_class"][name].values()) == count, body["per_class"]
    for key, value in (case.expect.duplicates or {}).items():
        assert body["duplicates"][key] == value, body["duplicates"]
    codes = [w["code"] for w in body["warnings"]]
    assert set(case.expect.warnings) <= set(codes), body["warnings"]
    names_codes = [c for c in codes if c.startswith("names_")]
    assert names_codes == [c for c in case.expect.warnings if c.startswith("names_")], body["warnings"]
    assert after["datasets"] == before["datasets"] + 1 and after["jobs"] == before["jobs"]
    assert set(after["dataset_files"]) - set(before["dataset_files"]) == {body["id"]}
    assert after["incoming"] == [] and after["job_folders"] == before["job_folders"]
    stored = corpus.settings.datasets_dir / body["id"]
    assert all(not p.is_symlink() for p in stored.rglob("*")), "a link was extracted"
    assert corpus.client.delete(f"/v1/datasets/{body['id']}", headers=corpus.caller).status_code == 204


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_is_rejected_or_contained(corpus: Corpus, case: Case) -> None:
    with service_for(corpus, case) as service:
        before = footprint(service.settings)
        response = case.send(service)
        after = footprint(service.settings)
        assert response.status_code == case.expect.status, response.text[:500]
        for header in case.expect.headers:
            assert header in response.headers, f"missing {header} header"
        if response.status_code >= 400:
            check_rejected(case, response, before, after)
        else:
            check_contained(case, service, response, before, after)
        if case.after is not None:
            case.after(service)


def test_security_doc_quotes_the_corpus_size() -> None:
    text = SECURITY_DOC.read_text(encoding="utf-8")
    match = re.search(r"(\d+) hostile inputs tried", text)
    assert match, "docs/SECURITY.md must say how many hostile inputs the corpus tries"
    assert int(match.group(1)) == len(CASES)

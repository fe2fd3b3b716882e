"""Deep JSON: a body nested past `MAX_JSON_DEPTH` answers 400 `json_too_deep` before any other
work (no key check, parse, validation, idempotency hash, row or file), however deep it is; a body
at the limit goes on to be judged by the schema."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from api_helpers import client, new_tenant, ready_dataset, settings  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import api.body_limits
from api.body_limits import INLINE_SCAN_BYTES, MAX_JSON_DEPTH, json_depth_exceeds
from fd2_config.settings import Settings
from store.db import session_scope
from store.models import Job

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tenant(settings: Settings) -> dict[str, str]:  # noqa: F811
    return new_tenant(settings)


@pytest.fixture(scope="module")
def dataset_id(client: TestClient, tenant: dict[str, str]) -> str:  # noqa: F811
    return ready_dataset(client, tenant)["id"]


def arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def job_body(dataset_id: str, nested: str) -> bytes:
    """A job body (2 levels: the body and its spec) whose spec holds `nested` under an extra
    field."""
    return f'{{"dataset": {{"id": "{dataset_id}"}}, "spec": {{"ipc": 1, "deep": {nested}}}}}'.encode()


def left_behind(settings: Settings) -> dict[str, Any]:  # noqa: F811
    """What a refused body must not change: job rows, job folders, queued messages."""
    assert settings.jobs_dir is not None
    with session_scope(settings) as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
    folders = sorted(p.name for p in settings.jobs_dir.iterdir()) if settings.jobs_dir.exists() else []
    queue = settings.broker_dir / "queue"
    messages = sorted(p.name for p in queue.glob("*.msg")) if queue.exists() else []
    return {"jobs": jobs, "job_folders": folders, "queued": messages}


def assert_too_deep(response: Any) -> None:
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "json_too_deep" and error["details"] == {"max_depth": MAX_JSON_DEPTH}
    assert str(MAX_JSON_DEPTH) in error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("shape", [arrays, objects], ids=["arrays", "objects"])
def test_a_spec_at_the_limit_is_judged_by_the_schema_and_one_past_it_is_refused(
    client: TestClient, settings: Settings,  # noqa: F811
    tenant: dict[str, str], dataset_id: str, shape: Any,
) -> None:
    at_limit = client.post("/v1/jobs", headers={**tenant, **JSON},
                           content=job_body(dataset_id, shape(MAX_JSON_DEPTH - 2)))
    assert at_limit.status_code == 422 and at_limit.json()["error"]["code"] == "invalid_spec", at_limit.text[:300]
    before = left_behind(settings)
    for key in (None, f"deep-{shape.__name__}"):
        headers = {**tenant, **JSON, **({"Idempotency-Key": key} if key else {})}
        assert_too_deep(client.post("/v1/jobs", headers=headers,
                                    content=job_body(dataset_id, shape(MAX_JSON_DEPTH - 1))))
    assert left_behind(settings) == before


def test_the_reported_body_answers_400_not_500(
    client: TestClient, settings: Settings, tenant: dict[str, str], dataset_id: str,  # noqa: F811
) -> None:
    """The issue's case: a body of some 600 bytes whose spec nests arrays 256 deep, sent with and
    without a key (the idempotency hash used to fail serialising it: a 500)."""
    before = left_behind(settings)
    body = job_body(dataset_id, arrays(256))
    assert len(body) < 1024
    for headers in ({**tenant, **JSON}, {**tenant, **JSON, "Idempotency-Key": "issue-256"}):
        assert_too_deep(client.post("/v1/jobs", headers=headers, content=body))
    assert left_behind(settings) == before


@pytest.mark.parametrize("nested", [arrays(100_000), objects(100_000), "[" * 100_000, '{"a":' * 100_000,
                                    arrays(INLINE_SCAN_BYTES)],
                         ids=["arrays", "objects", "unclosed_arrays", "unclosed_objects", "scanned_in_a_thread"])
def test_a_very_deep_body_is_refused_however_it_arrives(
    client: TestClient, settings: Settings,  # noqa: F811
    tenant: dict[str, str], dataset_id: str, nested: str,
) -> None:
    before = left_behind(settings)
    body = job_body(dataset_id, nested)
    key = {"Idempotency-Key": "very-deep"}
    chunks = [body[i:i + 65_536] for i in range(0, len(body), 65_536)]
    answers = [
        client.post("/v1/jobs", headers={**tenant, **JSON, **key}, content=body),
        client.post("/v1/jobs", headers={**tenant, **JSON, **key}, content=iter(chunks)),  # chunked
        client.post("/v1/jobs", headers={**tenant, "Content-Type": "application/json; charset=utf-8"}, content=body),
        # untyped: FastAPI would parse it as JSON
        client.post("/v1/jobs", headers=tenant, content=body),
        # no key: refused before the key is looked up
        client.post("/v1/jobs", content=body, headers=JSON),
        client.post("/v1/jobs/job_unknown/cancel", headers={**tenant, **JSON}, content=body),
    ]
    for response in answers:
        assert_too_deep(response)
    assert left_behind(settings) == before


def test_brackets_inside_strings_do_not_count(
    client: TestClient, tenant: dict[str, str], dataset_id: str,  # noqa: F811
) -> None:
    for text in ("[" * 1000, '\\"' + "{" * 1000, "\\\\" + "[" * 1000 + '\\"'):
        body = f'{{"dataset": {{"id": "{dataset_id}"}}, "spec": {{"preset": "{text}"}}}}'.encode()
        response = client.post("/v1/jobs", headers={**tenant, **JSON}, content=body)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_spec", response.text


def test_shallow_bodies_still_arrive_whole(
    client: TestClient, settings: Settings, tenant: dict[str, str], dataset_id: str,  # noqa: F811
) -> None:
    """The depth check reads the body before the route does: what it hands on must be the same
    body, sent whole or in chunks."""
    body = json.dumps({"dataset": {"id": dataset_id}, "spec": {"ipc": 1, "device": "cpu"}}).encode()
    headers = {**tenant, **JSON, "Idempotency-Key": "shallow-chunked"}
    first = client.post("/v1/jobs", headers=headers, content=iter([body[:7], body[7:]]))
    assert first.status_code == 202, first.text
    replay = client.post("/v1/jobs", headers=headers, content=body)
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]


def test_the_parser_giving_up_answers_the_same(
    client: TestClient, settings: Settings, tenant: dict[str, str], dataset_id: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should a deep body ever get past the scan, Python's parser raises RecursionError: the same
    answer, and still nothing stored."""
    monkeypatch.setattr(api.body_limits, "json_depth_exceeds", lambda body, limit=MAX_JSON_DEPTH: False)
    before = left_behind(settings)
    assert_too_deep(client.post("/v1/jobs", headers={**tenant, **JSON},
                                content=job_body(dataset_id, arrays(100_000))))
    assert left_behind(settings) == before


def depth_of(value: Any) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def random_json(rng: random.Random, budget: int) -> Any:
    """A random value whose strings and keys are full of brackets, quotes and backslashes."""
    pick = rng.random()
    text = "".join(rng.choice('[]{}"\\ab,:') for _ in range(rng.randrange(6)))
    if budget <= 0 or pick < 0.3:
        return rng.choice([text, 1, 2.5, None, True])
    if pick < 0.65:
        return [random_json(rng, budget - 1) for _ in range(rng.randrange(4))]
    return {text + str(i): random_json(rng, budget - 1) for i in range(rng.randrange(4))}


def test_the_scan_agrees_with_the_parsed_depth() -> None:
    rng = random.Random(7)
    for _ in range(500):
        value = random_json(rng, rng.randrange(12))
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        depth = depth_of(json.loads(text))
        for limit in (max(depth - 1, 0), depth):
            assert json_depth_exceeds(text, limit) == (depth > limit), (text, depth, limit)

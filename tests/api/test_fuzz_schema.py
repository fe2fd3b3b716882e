"""Schema-driven fuzzing of every `/v1` route with schemathesis: no 5xx, and every answer matches the
service's own OpenAPI schema (documented status, body shape, content type).

Bounded for CI: a fixed number of examples per operation, derandomized so a run is repeatable, against a
service whose limits are small and whose data is a few tiny images.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from api_helpers import database_url, make_settings, new_tenant, ready_dataset, running_client, submit
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app

EXAMPLES_PER_OPERATION = 25
FUZZ_LIMITS: dict[str, Any] = {
    "max_upload_bytes": 256 * 1024,
    "max_json_body_bytes": 64 * 1024,
    "max_extracted_bytes": 1024**2,
    "max_archive_members": 200,
    "rate_limit_per_minute": 0.0,
    "callback_allow_hosts": ["hooks.example.com"],
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A service with one tenant, a tiny dataset and a queued job, so ids and lists are not always empty."""
    home = tmp_path_factory.mktemp("fuzz")
    with database_url("sqlite", home) as url:
        service_settings = make_settings(home, url, **FUZZ_LIMITS)
        with running_client(service_settings) as client:
            headers = new_tenant(service_settings)
            dataset = ready_dataset(client, headers, {"wren": 3, "finch": 3})
            job = submit(client, headers, dataset["id"])
            assert job.status_code == 202
        known_ids = {"dataset_id": dataset["id"], "job_id": job.json()["id"], "name": "report.json"}
        # A second app on the same database: schemathesis runs its lifespan itself.
        yield {"app": create_app(service_settings), "headers": headers, "known_ids": known_ids}


def fuzz_operation(operation: Any, mode: GenerationMode, headers: dict[str, str],
                   known_ids: dict[str, str] | None = None) -> None:
    """Run one operation's generated cases; hypothesis raises with the smallest failing request."""
    names = {parameter.name for parameter in operation.path_parameters}
    fixed = {name: value for name, value in (known_ids or {}).items() if name in names} or None

    @given(case=operation.as_strategy(generation_mode=mode, headers=dict(headers), path_parameters=fixed))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(headers=dict(headers), checks=CHECKS)

    try:
        check()
    except Unsatisfiable:
        # Negative mode on an operation whose only inputs are free-form strings: nothing can violate them.
        assert mode is GenerationMode.NEGATIVE, f"no cases could be generated for {operation.label}"


def v1_operations(app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex=r"^/v1/")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize(("mode", "with_known_ids"), [
    (GenerationMode.POSITIVE, False), (GenerationMode.POSITIVE, True), (GenerationMode.NEGATIVE, False),
], ids=["positive", "positive-known-ids", "negative"])
def test_v1_routes_never_fail_and_match_the_schema(fuzz_service: dict[str, Any], mode: GenerationMode,
                                                   with_known_ids: bool) -> None:
    """Random ids mostly meet 404s; with the ids of real resources the deeper code paths run too."""
    operations = v1_operations(fuzz_service["app"])
    assert len(operations) >= 10, "every /v1 operation should be fuzzed"
    known_ids = fuzz_service["known_ids"] if with_known_ids else None
    failures = []
    for operation in operations:
        try:
            fuzz_operation(operation, mode, fuzz_service["headers"], known_ids)
        except Exception as exc:  # collected so one run reports every operation that fails
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)

"""Is this spec runnable on this data?
Answered at submit time, so a job never fails an hour later for it.

The spec is resolved with the one schema (`fd2_core.spec`), and the user's
own values must also have the right JSON type: the schema's lax mode would
read `true` as 1 or `"5"` as 5, which hides client bugs.
Then the data decides, by the one admission rule (`fd2_core.admission`: classes, ipc, test split,
cost and decoded size against the operator's limits), whose problems answer here as 422s, and a
`label_budget_bytes` becomes the encoding it fits (`fd2_core.spec_resolution.fit_label_budget`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.errors import ApiError, validation_details
from fd2_config.settings import Settings
from fd2_core.admission import JobCounts, Problem, admission_problems
from fd2_core.spec import JobSpec
from fd2_core.spec_errors import describe_spec_error
from fd2_core.spec_resolution import LabelBudgetError, fit_label_budget, resolve_spec

_INTEGER_TYPES = (int, int | None)


def _invalid_spec(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_input=False)
    details = validation_details(errors, prefix=("body", "spec"))
    first = details[0]
    where = f"spec.{first['field']}" if first["field"] else "spec"
    text = describe_spec_error(errors[0])
    if first["type"] == "extra_forbidden":
        text += "; remove it (the spec fields, their defaults and ranges are listed at /docs)"
    return ApiError(422, "invalid_spec", f"{where}: {text}", details)


def _integral_floats_as_ints(raw: dict[str, Any]) -> dict[str, Any]:
    """JSON has one number type: `2.0` is a fine value for an integer field, `2.5` is not."""
    fields = JobSpec.model_fields
    return {
        key: int(value)
        if key in fields and fields[key].annotation in _INTEGER_TYPES and isinstance(value, float)
        and value.is_integer()
        else value
        for key, value in raw.items()
    }


def resolve_job_spec(raw: dict[str, Any]) -> JobSpec:
    """The resolved spec, or 422 `invalid_spec` naming the first offending field."""
    raw = _integral_floats_as_ints(raw)
    try:
        spec = resolve_spec(raw)
        # The user's values once more in strict mode: right JSON types only
        # (the resolved ones already are).
        JobSpec.model_validate({**spec.model_dump(), **raw}, strict=True)
    except ValidationError as exc:
        raise _invalid_spec(exc) from None
    return spec


def problem_error(problem: Problem) -> ApiError:
    """An admission problem as a 422 whose `details.field` names the field
    as the request does (`spec.ipc`)."""
    details = {"field": f"spec.{problem.field}", **problem.details} if problem.field else dict(problem.details)
    return ApiError(422, problem.code, problem.message, details or None)


def check_runnable(settings: Settings, spec: JobSpec, counts: JobCounts) -> JobSpec:
    """The spec to store: 422 with the first admission problem of `spec` on data the job will see as
    `counts`, else `spec` with its label budget turned into an encoding (422 when none fits)."""
    problems = admission_problems(spec, counts, settings)
    if problems:
        raise problem_error(problems[0])
    try:
        return fit_label_budget(spec, len(counts.train_per_class), class_names=list(counts.train_per_class))
    except LabelBudgetError as exc:
        raise ApiError(422, exc.code, exc.message, {"field": f"spec.{exc.field}", **exc.details}) from None

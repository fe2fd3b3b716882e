"""Is this spec runnable on this data? Answered at submit time, so a job never fails an hour later for it.

The spec is resolved with the one schema (`fd2_core.spec`), and the user's own values must also have the
right JSON type: the schema's lax mode would read `true` as 1 or `"5"` as 5, which hides client bugs. Then
the data decides: every class needs `ipc` training images, evaluation needs a test split, and the estimated
cost (`fd2_core.cost`) and decoded size must stay within the operator's limits.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.errors import ApiError, validation_details
from fd2_core.cost import DatasetSize, decoded_dataset_bytes, estimate_cost
from fd2_core.spec import JobSpec, describe_spec_error, resolve_spec
from store.settings import Settings


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
        if key in fields and fields[key].annotation is int and isinstance(value, float) and value.is_integer()
        else value
        for key, value in raw.items()
    }


def resolve_job_spec(raw: dict[str, Any]) -> JobSpec:
    """The resolved spec, or 422 `invalid_spec` naming the first offending field."""
    raw = _integral_floats_as_ints(raw)
    try:
        spec = resolve_spec(raw)
        # The user's values once more in strict mode: right JSON types only (the resolved ones already are).
        JobSpec.model_validate({**spec.model_dump(), **raw}, strict=True)
    except ValidationError as exc:
        raise _invalid_spec(exc) from None
    return spec


def check_ipc(spec: JobSpec, train_counts: dict[str, int]) -> None:
    """Each class needs at least `ipc` training images (ipc real images initialise the synthetic ones)."""
    if not train_counts:
        return
    smallest = min(train_counts, key=lambda name: train_counts[name])
    if spec.ipc > train_counts[smallest]:
        raise ApiError(
            422,
            "ipc_too_large",
            f"ipc={spec.ipc} is larger than the {train_counts[smallest]} training images of class {smallest!r}; "
            f"lower spec.ipc to at most {train_counts[smallest]}, or add training images to {smallest!r}",
            {"field": "spec.ipc", "ipc": spec.ipc, "smallest_class": smallest,
             "smallest_class_train_images": train_counts[smallest]},
        )


def check_runnable(settings: Settings, spec: JobSpec, train_counts: dict[str, int], test_images: int) -> None:
    """422 when the spec cannot run on data with these per-class training counts and test images."""
    check_ipc(spec, train_counts)
    if spec.evaluate and test_images == 0:
        raise ApiError(422, "no_test_split", "evaluation needs test images; set spec.evaluate=false or add a test "
                       "split", {"field": "spec.evaluate"})
    size = DatasetSize(len(train_counts), sum(train_counts.values()), test_images)
    estimate = estimate_cost(spec, size)
    if estimate.cost > settings.max_job_cost:
        raise ApiError(
            422, "cost_too_high",
            f"the job's estimated cost of {estimate.cost:.3g} image passes is above the limit of "
            f"{settings.max_job_cost:.3g}; lower ipc, iterations, epochs or image_size",
            {"estimated_cost": estimate.cost, "max_job_cost": settings.max_job_cost,
             "stage_image_passes": estimate.stage_passes, "pixel_factor": estimate.pixel_factor},
        )
    memory = decoded_dataset_bytes(spec, size)
    if memory > settings.max_dataset_memory_bytes:
        raise ApiError(
            422, "dataset_too_large",
            f"the dataset decodes to {memory} bytes at {spec.image_size} px, above the limit of "
            f"{settings.max_dataset_memory_bytes}; lower image_size or use fewer images",
            {"decoded_bytes": memory, "max_dataset_memory_bytes": settings.max_dataset_memory_bytes},
        )

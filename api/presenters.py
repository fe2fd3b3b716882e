"""Response shapes used by the routes; they live in `store.resources` so the worker's callbacks share them."""

from store.resources import dataset_resource, event_resource, job_resource

__all__ = ["dataset_resource", "event_resource", "job_resource"]

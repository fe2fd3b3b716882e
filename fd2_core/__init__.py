"""FD²: fine-grained dataset distillation — data, models, losses, stages, pipeline and artifacts."""

__version__ = "0.1.0"

"""Tasks bundle a model with its training objective; the engine only sees `Task.training_step`."""

from crossmatch.tasks.base import Task, build_task

__all__ = ["Task", "build_task"]

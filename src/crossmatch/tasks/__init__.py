"""Tasks bundle a model with its training objective; the engine only sees `Task.training_step`.
Importing this package registers every objective with its model family."""

from crossmatch.tasks import albef, contrastive, identity, triplet, vilt  # noqa: F401  (registers the tasks)
from crossmatch.tasks.base import Task, build_task, register_task, task_class

__all__ = ["Task", "build_task", "register_task", "task_class"]

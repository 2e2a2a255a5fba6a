"""Tasks bundle a model with its training objective; the engine only sees `Task.training_step`.
Importing this package imports every module in it, so each objective registers with the model family (and
loss.name) it trains: a new objective is a new module here, and no list elsewhere names it."""

import importlib
import pkgutil

from crossmatch.tasks.base import Task, build_task, register_task, task_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # runs its @register_task

__all__ = ["Task", "build_task", "register_task", "task_class"]

"""Tasks: model factory, loss, metrics and data schema, shared by the server and the nodes."""

from flowerbed.tasks.device import resolve_device
from flowerbed.tasks.registry import is_builtin, resolve_task
from flowerbed.tasks.task import DataSchema, SiteData, Task

__all__ = ["DataSchema", "SiteData", "Task", "is_builtin", "resolve_device", "resolve_task"]

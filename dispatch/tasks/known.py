"""Which tasks a process knows: those of the modules it loaded at start.

A task's path arrives from peers (a request's ``task`` field, a job row), so it is
never imported on their word: a path names a task only if its module is loaded
already. A fleetworker and a broker load, at start, every installed app's ``tasks``
module and those ``settings.DISPATCH_TASK_MODULES`` names (``BROKER_TASK_MODULES``
in brokersite); a web process has loaded the tasks it enqueues.
"""

from __future__ import annotations

import importlib
import sys

from .compat import Task


def load_task_modules(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import the project's task modules; the names of those loaded."""
    from django.conf import settings
    from django.utils.module_loading import autodiscover_modules

    autodiscover_modules("tasks")
    names = [*getattr(settings, "DISPATCH_TASK_MODULES", ()), *extra]
    for name in names:
        importlib.import_module(name)
    apps = [m for m in sys.modules if m.endswith(".tasks") or m == "tasks"]
    return sorted({*names, *apps})


def loaded_task(path: str) -> Task | None:
    """The task at ``path`` (``module.function``) if its module is loaded here."""
    module_name, _, name = path.rpartition(".")
    module = sys.modules.get(module_name)
    task = getattr(module, name, None) if module is not None and name else None
    return task if isinstance(task, Task) else None

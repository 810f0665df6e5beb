"""Which optional stacks this install has, and the one message a role gets when it lacks the one it needs.

darkroom installs by role (pyproject extras): the base package is the API, the job store, the SDK and the CLI, with no
torch; `darkroom[worker]` adds the ML stack. A worker started on a base install should say that in one line, before
any work, instead of dying on an ImportError deep inside the engine. `find_spec` looks for a module without importing
it, so the check costs nothing on an install that has everything.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

WORKER_MODULES = ("torch", "diffusers", "transformers", "numpy", "scipy", "psutil")
"""What the engine, its samplers and the watermark import; all come with `darkroom[worker]`."""


class MissingExtra(ImportError):
    """A role was started on an install without the extra it needs; the message says which one to install."""


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of `modules` that cannot be imported here."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def require(extra: str, modules: Iterable[str], purpose: str) -> None:
    """Raise MissingExtra naming `extra` when any of `modules` is absent."""
    absent = missing(modules)
    if absent:
        raise MissingExtra(
            f"{purpose} needs {', '.join(absent)}, which this install lacks: "
            f"install darkroom[{extra}] (pip install 'darkroom[{extra}]')"
        )


def require_worker() -> None:
    """Before a worker starts: the engine's stack must be installed."""
    require("worker", WORKER_MODULES, "a worker")

"""One log format for every process: time, level, process role, logger, message, as text or as JSON lines.

JSON (`--log-format json`) is for log pipelines: one object per line with `request_id`, `job_id`, `tenant` and
`worker_id` on every line that concerns them. Those come from `context` (contextvars), set where a request enters
(api/edge.py) and where a worker takes up a job (worker/loop.py), so no log call has to pass them. A request's
context is one mutable dict: what a later stage learns (the tenant, once the key is checked, on a thread of the
request pool that copied the context) is seen by every line of that request.

A start-up should say what an operator needs (where the data is, which models, which address) and nothing else, so
the libraries' own chatter is turned down here, once, before they are imported: Alembic's per-step INFO lines (a real
migration is reported in one line by darkroom.jobs.db), transformers/diffusers advisories and progress bars, and
Python warnings raised inside third-party packages (deprecations meant for library authors, not for operators)."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal

LogFormat = Literal["text", "json"]
ACCESS_LOGGER = "darkroom.access"  # one line per request (api/edge.py): on in JSON mode, off in text mode
FORMAT_ENV = "DARKROOM_LOG_FORMAT"  # the children of `darkroom serve` inherit the server's format through it
CONTEXT_FIELDS = ("request_id", "job_id", "tenant", "worker_id")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("darkroom_log_context", default=None)

# Loggers that speak only when something is wrong (or, for the HTTP ones, is about to be).
_QUIET = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "alembic": logging.WARNING,
    "transformers": logging.ERROR,
    "diffusers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
    "torch": logging.ERROR,
}
# Read by transformers / diffusers / huggingface_hub when they are first imported.
_LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
THIRD_PARTY_MODULES = (
    r"(torch|torchsde|diffusers|transformers|accelerate|huggingface_hub|safetensors|scipy|numpy)(\.|$)"
)


def setup(level: str = "INFO", role: str = "darkroom", fmt: str | None = None) -> LogFormat:
    """Configure the root logger once per process; `fmt` (text | json) defaults to `DARKROOM_LOG_FORMAT`, then text.
    Returns the format used, which is also left in the environment for child processes."""
    chosen = resolve_format(fmt)
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if chosen == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        text = f"%(asctime)s %(levelname)-7s {role}[%(process)d] %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(text))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    os.environ[FORMAT_ENV] = chosen
    quiet_libraries()
    # Access lines belong in a log pipeline (JSON), not on an operator's terminal (text, where start-up is quiet).
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if chosen == "json" else logging.WARNING)
    return chosen


def resolve_format(fmt: str | None) -> LogFormat:
    value = (fmt or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {value!r}")
    return "json" if value == "json" else "text"


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Add fields (request_id, job_id, tenant, worker_id) to every log line of this block, on this thread or task
    and whatever copies its context; None values are left out. Yields the block's (mutable) context dict."""
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current context in place (a request learns its tenant after its id): seen by every copy."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


def current() -> dict[str, Any]:
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the context's fields onto each record (`record.request_id`, …), so both formats can use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, role, pid, logger, msg, the context fields present, any
    `extra` given to the call (e.g. an access line's method, path, status), and the exception's text."""

    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in self._STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def quiet_libraries() -> None:
    """Turn the libraries down (env defaults, logger levels, warning filters); an explicit env setting wins."""
    for name, value in _LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
    # Deprecations surface at the caller's line (stacklevel), which may be ours; they are for developers, who see
    # them in the test suite, not in a server's log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.captureWarnings(True)  # what is left arrives in the log format above

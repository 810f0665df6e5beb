"""OpenTelemetry spans for a job's path: request → claim → job → load → denoise → encode → store (optional extra).

Off unless configured: with `observability.otlp_endpoint` set and the `tracing` extra installed (opentelemetry-api,
-sdk, -exporter-otlp-proto-http), `configure` installs a tracer provider that exports by OTLP/HTTP; otherwise every
helper here is a no-op that costs a flag check, and the extra is never imported.

One trace per request id. The API process and the worker that runs the job are different processes and the job row
carries the request id, not a trace context, so both derive the same trace from it (`request_context`): a remote
parent whose trace id and span id are hashes of the request id. The API's `request` span and the worker's `claim`
and `job` spans hang under it; `load` and `denoise` (device thread) and `encode` and `store` (post-processing pool)
under `job`. `claim` and `load` are recorded after the fact from measured times (the claim is made before the job,
and so its request, is known; the engine reports its load time)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

from darkroom.config import Settings

log = logging.getLogger("darkroom.tracing")

_tracer: Any = None  # an opentelemetry Tracer once configured; None: tracing off


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings, service: str) -> bool:
    """Export spans by OTLP/HTTP to `observability.otlp_endpoint`; False (tracing off) without an endpoint or the
    extra. Call once per process, at start."""
    endpoint = settings.observability.otlp_endpoint
    if not endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("observability.otlp_endpoint is set but the tracing extra is not installed: no spans exported")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": f"darkroom-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    use_provider(provider)
    return True


def use_provider(provider: Any | None) -> None:
    """Trace with this tracer provider (tests: an SDK provider with an in-memory exporter); None turns tracing off."""
    global _tracer
    _tracer = provider.get_tracer("darkroom") if provider is not None else None


def _ids(request_id: str) -> tuple[int, int]:
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def trace_id_for(request_id: str) -> int:
    """The trace id every span of this request's job carries, in whichever process."""
    return _ids(request_id)[0]


def request_context(request_id: str | None) -> Any:
    """The OpenTelemetry context whose (remote, never exported) parent stands for the request id; None when off or
    without a request id (the spans then start a trace of their own)."""
    if _tracer is None or not request_id:
        return None
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id, span_id = _ids(request_id)
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


@contextlib.contextmanager
def span(name: str, context: Any = None, **attributes: Any) -> Iterator[Any]:
    """A span around the block, child of `context` (or of the current span); yields it (None when off)."""
    if _tracer is None:
        yield None
        return
    attrs = {f"darkroom.{k}": v for k, v in attributes.items() if v is not None}
    with _tracer.start_as_current_span(name, context=context, attributes=attrs) as current:
        yield current


def context_of(current: Any) -> Any:
    """The context in which `current` (a span from `span`) is the parent, for work that continues on another thread."""
    if current is None:
        return None
    from opentelemetry import trace

    return trace.set_span_in_context(current)


def record(name: str, start_ns: int, end_ns: int, context: Any = None, **attributes: Any) -> None:
    """A span measured already (start and end in `time.time_ns()`), child of `context`."""
    if _tracer is None:
        return
    attrs = {f"darkroom.{k}": v for k, v in attributes.items() if v is not None}
    done = _tracer.start_span(name, context=context, attributes=attrs, start_time=start_ns)
    done.end(end_time=max(start_ns, end_ns))


def set_attributes(current: Any, **attributes: Any) -> None:
    if current is not None:
        current.set_attributes({f"darkroom.{k}": v for k, v in attributes.items() if v is not None})

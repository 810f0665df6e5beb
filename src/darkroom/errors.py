"""Typed errors. Each carries the HTTP status and the field it is about; the API maps them once.

Engine errors are split as vLLM does: a *recoverable* error fails one job, a *fatal* one means the worker's engine is
unusable and the worker should stop claiming.
"""

from __future__ import annotations


class DarkroomError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class InvalidRequest(DarkroomError):
    status = 422
    code = "invalid_request"


class Unauthorized(DarkroomError):
    """No key, or a key that is unknown, expired or revoked. The message never says which."""

    status = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(DarkroomError):
    """The key is valid but its role may not do this."""

    status = 403
    code = "forbidden"


class HeldForReview(DarkroomError):
    """The output safety checker (or the tenant's policy) holds the image until an operator approves it."""

    status = 403
    code = "held_for_review"


class PromptBlocked(DarkroomError):
    """A tenant's prompt rule or the prompt classifier refused the prompt; the message is the rule's reason."""

    status = 422
    code = "prompt_blocked"


class RateLimited(DarkroomError):
    """A rate limit or quota is used up. `limit` names it; `retry_after` is when it frees up."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, limit: dict, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, field=limit.get("name"), code=code)
        self.limit = limit
        self.retry_after = max(1, retry_after)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "limit": self.limit}


class NotFound(DarkroomError):
    status = 404
    code = "not_found"


class NotAcceptable(DarkroomError):
    """The response the caller's `Accept` asks for cannot be given for this request (e.g. one PNG for n > 1)."""

    status = 406
    code = "not_acceptable"


class Conflict(DarkroomError):
    status = 409
    code = "conflict"


class PayloadTooLarge(DarkroomError):
    status = 413
    code = "payload_too_large"


class ServiceUnavailable(DarkroomError):
    status = 503
    code = "unavailable"


class JobTimeout(DarkroomError):
    status = 504
    code = "timeout"


# --- errors raised on the GPU side ---------------------------------------------------------------------------------


class EngineError(DarkroomError):
    """A job failed; the worker goes on. `permanent` errors are not retried."""

    code = "engine_error"
    permanent = True


class ModelLoadError(EngineError):
    code = "model_load_failed"


class JobCancelled(EngineError):
    code = "cancelled"


class EngineOutOfMemory(EngineError):
    """The device ran out of memory. The engine splits the batch and retries first; what reaches the worker is
    either transient (retry, perhaps on a larger worker) or, for a single image that cannot fit, permanent."""

    code = "out_of_memory"

    def __init__(self, message: str, *, field: str | None = None, permanent: bool = False) -> None:
        super().__init__(message, field=field)
        self.permanent = permanent


class Draining(EngineError):
    """The worker is shutting down and the job cannot finish in time: give it back to the queue untouched."""

    code = "draining"


class LeaseLost(EngineError):
    """Another worker owns the job now (our lease expired); drop the work without writing results."""

    code = "lease_lost"


class TransientEngineError(EngineError):
    """A failure of unknown cause: the job is retried with backoff, since nothing says the request is at fault."""

    code = "engine_transient"
    permanent = False


class FatalEngineError(DarkroomError):
    """The engine itself is broken (driver gone, CUDA context lost, device-side assert). The job is not at fault:
    it goes back to the queue without being charged an attempt, and the worker marks itself unhealthy, drops its
    engine and claims again only after a backoff (see `darkroom.worker.health`)."""

    status = 503
    code = "engine_fatal"


# --- storage -----------------------------------------------------------------------------------------------------


class StorageUnavailable(DarkroomError):
    """The blob store cannot take or give bytes right now (S3 down, disk unmounted, I/O error). It is the node's
    problem, not the request's: the API answers 503 with Retry-After, and a worker gives the job back uncharged and
    pauses for minutes rather than burning every attempt in seconds."""

    status = 503
    code = "storage_unavailable"
    retry_after = 30


class StorageFull(StorageUnavailable):
    """The blob store's disk is full (ENOSPC, EDQUOT): 507 Insufficient Storage, otherwise like `StorageUnavailable`."""

    status = 507
    code = "storage_full"
    retry_after = 60

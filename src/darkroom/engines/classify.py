"""Which failures of a pipeline run are the request's, the device's, or nobody's in particular.

A worker must treat them differently (vLLM splits errors the same way):
- the *request* is at fault (a size or value the pipeline refuses, mismatched shapes it causes): fail the job for
  good, retrying cannot help → `InvalidRequest` / permanent `EngineError`;
- the *device* is broken (CUDA errors, device-side asserts, a lost driver or NVML): every job on this worker would fail
  the same way, so the job is not charged and the worker stops claiming until its engine is rebuilt →
  `FatalEngineError`;
- anything else is *transient* until proven otherwise: retried with backoff → `TransientEngineError`.
Out-of-memory errors never reach this function: the engine splits the batch first (see `DiffusersEngine._run`).
"""

from __future__ import annotations

import re

import torch

from darkroom.errors import DarkroomError, EngineError, FatalEngineError, InvalidRequest, TransientEngineError

# Messages of the CUDA runtime, cuDNN/cuBLAS, NVML and the driver, as torch surfaces them in RuntimeErrors.
DEVICE_FAILURE = re.compile(
    r"CUDA error|CUDA driver|cudaError|device-side assert|illegal memory access|unspecified launch failure"
    r"|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NVML|no CUDA-capable device|CUDA-capable device\(s\) is/are busy"
    r"|driver shutting down|uncorrectable ECC error|GPU is lost|HIP error|NCCL error",
    re.IGNORECASE,
)
# Shape and size mismatches a request's width, height or images cause (a model's own bugs would fail every request
# alike, and retrying would not fix them either).
BAD_INPUT = re.compile(
    r"size of tensor \w+ \(\d+\) must match|shape .* is invalid for input|mat1 and mat2 shapes cannot be"
    r"|Expected size|sizes of tensors must match|must be divisible by",
    re.IGNORECASE,
)
DEVICE_ERROR_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None), getattr(torch.cuda, "CudaError", None)) if t is not None
)


def classify(exc: BaseException) -> DarkroomError:
    """The typed error a worker acts on for an exception raised inside a pipeline call."""
    if isinstance(exc, DarkroomError):
        return exc
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, DEVICE_ERROR_TYPES) or DEVICE_FAILURE.search(str(exc)):
        return FatalEngineError(f"the device failed: {message}")
    if isinstance(exc, ValueError):  # diffusers' own input checks name the argument
        return InvalidRequest(f"the pipeline refused the request: {exc}")
    if isinstance(exc, RuntimeError) and BAD_INPUT.search(str(exc)):
        return EngineError(f"the pipeline cannot run this request: {message}", code="invalid_input")
    return TransientEngineError(f"generation failed: {message}")

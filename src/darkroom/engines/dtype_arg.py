"""The keyword diffusers' loaders take the weights' dtype by.

diffusers renamed `torch_dtype` to `dtype` (the old name still works and warns with a FutureWarning on every load);
the older releases darkroom supports know only `torch_dtype`. The releases that know `dtype` are the ones that carry
the deprecation's message, so that is what is looked for: a release without it gets the old name, which it accepts.
Filtering the warning instead (`warnings.catch_warnings`) changes process-wide state and let it through when two
threads loaded at once.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _name() -> str:
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """`{"dtype": dtype}` or `{"torch_dtype": dtype}`, as this diffusers release wants it."""
    return {_name(): dtype}

"""Output safety: a pluggable image checker, and the decision whether an image is held for review.

The checker is `settings.security.output_checker`, a `module:callable` with the signature of `OutputChecker`: it gets
each generated image, the job's request (a dict) and the tenant, and returns None (release) or the reason to hold the
image. darkroom ships no content classifier (bring one: NudeNet, a CLIP-based scorer, a call to your moderation
service); what it ships is `blank_image`, which catches the blank outputs real pipelines produce.

A flagged image, or any image of a tenant whose policy says `require_review`, is stored with `review_state` pending:
the tenant cannot download it until an operator approves it (`darkroom.safety.review`). A checker that raises holds
the image too, so nothing unchecked is ever released.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from PIL import Image

from darkroom.auth.tenants import TenantPolicy
from darkroom.config import Settings
from darkroom.safety.policy import OUTPUT_CHECKER, cached_hook

log = logging.getLogger("darkroom.safety")

OutputChecker = Callable[[Image.Image, dict[str, Any], str], str | None]
"""checker(image, request, tenant) → None (release) or the reason to hold the image for review."""

REQUIRE_REVIEW = "require_review"  # the reason when only the tenant's policy holds the image
MAX_REASON = 500  # the images.review_reason column
BLANK_MAX_LEVEL = 4  # 8-bit: brightest channel value still counted as black (JPEG-free PNGs: 0 in practice)


def load_checker(settings: Settings) -> OutputChecker | None:
    """The configured checker (imported once per process), or None when none is configured."""
    path = settings.security.output_checker
    return cached_hook(path, OUTPUT_CHECKER) if path else None


def review_decision(
    checker: OutputChecker | None,
    tenant_policy: TenantPolicy,
    image: Image.Image,
    request: dict[str, Any],
    tenant: str,
) -> tuple[str, str | None]:
    """("pending", reason) to hold the image, ("none", None) to release it. The checker runs even when the tenant
    reviews everything, so the operator sees why an image stands out."""
    reason = run_checker(checker, image, request, tenant) if checker is not None else None
    if reason is not None:
        return "pending", reason[:MAX_REASON]
    if tenant_policy.require_review:
        return "pending", REQUIRE_REVIEW
    return "none", None


def run_checker(checker: OutputChecker, image: Image.Image, request: dict[str, Any], tenant: str) -> str | None:
    """The checker's reason, or None. Errors and odd answers flag the image rather than release it unchecked."""
    try:
        verdict = checker(image, request, tenant)
    except Exception as exc:
        log.exception("output checker failed; holding the image for review")
        return f"checker error: {type(exc).__name__}: {exc}"
    if verdict is None or verdict is False:
        return None
    return verdict if isinstance(verdict, str) and verdict.strip() else "flagged by the output checker"


def blank_image(image: Image.Image, request: dict[str, Any], tenant: str) -> str | None:
    """Flag an all-black image (`darkroom.safety.checker:blank_image`).

    That is what diffusers' own safety checker puts in place of an image it refuses, and what a numerical failure
    (NaNs from fp16 overflow in the VAE) decodes to: either way the tenant should not be handed it silently.
    It is a cheap heuristic, not a content classifier."""
    extrema = cast("tuple[tuple[int, int], ...]", image.convert("RGB").getextrema())  # per band, for RGB
    if all(high <= BLANK_MAX_LEVEL for _, high in extrema):
        return "blank output: all black (a pipeline safety checker or a numerical failure blanked it)"
    return None

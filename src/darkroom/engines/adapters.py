"""LoRAs and textual-inversion embeddings, active for one pipeline pass and gone afterwards.

A cached pipeline is shared by every job that names its model, so an adapter must never outlive the pass that asked
for it: `activate` loads the request's LoRAs through diffusers/PEFT (`load_lora_weights`, `set_adapters`) and the
embeddings whose token appears in a prompt (`load_textual_inversion`), and on the way out, whatever happened, removes
them again (`unload_lora_weights`, `unload_textual_inversion`). PEFT keeps the base weights untouched (the LoRA is a
side branch scaled by its weight), so after unloading the pipeline computes exactly what it did before; a weight of 0
adds exactly zero. If the pipeline cannot be put back, the error is fatal to the engine: the worker drops it and
loads the model afresh rather than let a later job see a stale adapter.

A batch runs with one LoRA set (the set is part of the batch key). Embeddings need no such rule: a loaded token only
changes prompts that contain it, so the union of every prompt's embeddings is loaded for the pass. The API pins them
(`request.embeddings`, found from the prompt at submit); a request that was never pinned is matched here the same way.

Failures name the file: one missing since submit, changed since submit (its sha256 no longer matches the pinned one),
or that is not an adapter for this model's family (shapes or module names that do not match) fails the job for good.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from darkroom.engines.classify import classify
from darkroom.errors import DarkroomError, EngineError, FatalEngineError
from darkroom.models.registry import ModelRegistry, token_pattern
from darkroom.schemas import AdapterInfo, GenerationRequest, LoraSpec

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "darkroom_lora_"  # PEFT adapter names end up as module keys: plain identifiers only
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # SDXL embeddings carry one tensor per text encoder


class AdapterError(EngineError):
    """The request's adapter cannot run on this model: retrying would fail the same way."""

    code = "adapter_incompatible"
    permanent = True


@dataclass(frozen=True)
class ActiveLora:
    spec: LoraSpec
    info: AdapterInfo
    adapter_name: str


@contextlib.contextmanager
def activate(
    pipe: Any, registry: ModelRegistry, requests: Sequence[GenerationRequest], lock: threading.Lock | None = None
) -> Iterator[None]:
    """The requests' LoRAs and prompt embeddings loaded into `pipe` for the body of the `with`, removed after it.
    `lock`: held while weights load (diffusers may build modules on the meta device, which is process-wide)."""
    loras = resolve_loras(registry, requests)
    embeddings = resolve_embeddings(registry, requests)
    if not loras and not embeddings:
        yield
        return
    added_tokens: list[tuple[Any, Any, list[str]]] = []
    try:
        with lock if lock is not None else contextlib.nullcontext():
            _load_loras(pipe, loras)
            for info in embeddings:
                added_tokens += _load_embedding(pipe, info)
        yield
    finally:
        _restore(pipe, bool(loras), added_tokens)


# --- which adapters -------------------------------------------------------------------------------------------------


def resolve_loras(registry: ModelRegistry, requests: Sequence[GenerationRequest]) -> list[ActiveLora]:
    """The batch's one LoRA set, each file found and checked against the version pinned at submit."""
    if not requests:
        return []
    specs = requests[0].loras
    if any(_set(r.loras) != _set(specs) for r in requests[1:]):
        raise EngineError("jobs with different LoRA sets cannot share a pass", field="loras", code="adapter_mismatch")
    active: list[ActiveLora] = []
    for i, spec in enumerate(specs):
        try:
            info = registry.lora(spec.name)
        except DarkroomError as exc:
            raise AdapterError(f"LoRA {spec.name!r} is no longer in the loras folder: {exc}", field="loras") from None
        if spec.sha256 and spec.sha256 != info.sha256:
            raise AdapterError(
                f"LoRA {spec.name!r} changed since the job was queued (now {info.sha256[:12]}, "
                f"queued with {spec.sha256[:12]}); submit the job again",
                field="loras",
            )
        active.append(ActiveLora(spec=spec, info=info, adapter_name=f"{ADAPTER_PREFIX}{i}"))
    return active


def resolve_embeddings(registry: ModelRegistry, requests: Sequence[GenerationRequest]) -> list[AdapterInfo]:
    """The union of the requests' embeddings: the pinned ones checked against their files, the rest matched from the
    prompts (an embedding's name as a word of the prompt or negative prompt, as A1111 matches them)."""
    wanted: dict[str, AdapterInfo] = {}
    for request in requests:
        if request.embeddings is None:
            texts = [text for text in (request.prompt, request.negative_prompt) if text]
            for name in registry.embedding_names():
                if name not in wanted and any(token_pattern(name).search(text) for text in texts):
                    wanted[name] = _embedding(registry, name)
            continue
        for spec in request.embeddings:
            info = _embedding(registry, spec.name)
            if info.sha256 != spec.sha256:
                raise AdapterError(
                    f"embedding {spec.name!r} changed since the job was queued (now {info.sha256[:12]}, "
                    f"queued with {spec.sha256[:12]}); submit the job again",
                    field="prompt",
                )
            wanted[spec.name] = info
    return list(wanted.values())


def _embedding(registry: ModelRegistry, name: str) -> AdapterInfo:
    try:
        return registry.embedding(name)
    except DarkroomError as exc:
        raise AdapterError(f"embedding {name!r} cannot be used: {exc}", field="prompt") from None


def _set(specs: list[LoraSpec]) -> list[tuple[str, float, str | None]]:
    return sorted((s.name, s.weight, s.sha256) for s in specs)


# --- loading --------------------------------------------------------------------------------------------------------


def _load_loras(pipe: Any, loras: list[ActiveLora]) -> None:
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise AdapterError(f"{type(pipe).__name__} cannot load LoRA adapters", field="loras")
    for lora in loras:
        try:
            with warnings.catch_warnings():  # PEFT warns on every adapter after the first; several are the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
                pipe.load_lora_weights(lora.info.path, adapter_name=lora.adapter_name)
        except Exception as exc:
            raise _not_an_adapter(lora.info, exc) from exc
        if lora.adapter_name not in _loaded_adapters(pipe):
            raise AdapterError(
                f"LoRA {lora.info.name!r} ({lora.info.relpath}) holds no weights for this model's modules: it is not "
                "a LoRA for this model's family",
                field="loras",
            )
    pipe.set_adapters([lora.adapter_name for lora in loras], adapter_weights=[lora.spec.weight for lora in loras])


def _loaded_adapters(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _not_an_adapter(info: AdapterInfo, exc: Exception) -> DarkroomError:
    """A broken device stays fatal; anything else a file does on loading is the file's (and so the request's) fault."""
    if isinstance(fatal := classify(exc), FatalEngineError):
        return fatal
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    kind = "LoRA" if info.kind == "lora" else "embedding"
    return AdapterError(
        f"{kind} {info.name!r} ({info.relpath}) does not fit this model (another model family, or not a supported "
        f"adapter format): {type(exc).__name__}: {first_line}",
        field="loras" if info.kind == "lora" else "prompt",
    )


def _load_embedding(pipe: Any, info: AdapterInfo) -> list[tuple[Any, Any, list[str]]]:
    """Loads one embedding into each text encoder it has a tensor for; returns (tokenizer, encoder, new tokens)."""
    from safetensors.torch import load_file

    try:
        state = load_file(info.path)
    except Exception as exc:
        raise _not_an_adapter(info, exc) from exc
    targets: list[tuple[Any, Any, Any]]  # (weights, tokenizer, text encoder)
    if all(key in state for key in SDXL_EMBEDDING_KEYS):
        pairs = [("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2")]
        targets = [(state[key], getattr(pipe, tok, None), getattr(pipe, enc, None)) for key, tok, enc in pairs]
        if any(tokenizer is None or encoder is None for _, tokenizer, encoder in targets):
            raise AdapterError(f"embedding {info.name!r} is for SDXL, and this model is not", field="prompt")
    else:
        targets = [(state, pipe.tokenizer, pipe.text_encoder)]
    added: list[tuple[Any, Any, list[str]]] = []
    for weights, tokenizer, encoder in targets:
        before = set(tokenizer.get_vocab())
        try:
            pipe.load_textual_inversion(weights, token=info.name, tokenizer=tokenizer, text_encoder=encoder)
        except Exception as exc:
            raise _not_an_adapter(info, exc) from exc
        finally:  # a partial load is undone with the rest
            new = [t for t in tokenizer.get_vocab() if t not in before]
            if new:
                added.append((tokenizer, encoder, new))
    return added


# --- restoring --------------------------------------------------------------------------------------------------------


def _restore(pipe: Any, had_loras: bool, added_tokens: list[tuple[Any, Any, list[str]]]) -> None:
    """Back to the base weights. A failure here leaves the cached pipeline in an unknown state: fatal to the engine
    (the worker rebuilds it), so no later job can run with a stale adapter."""
    try:
        if had_loras:  # also after a partial load: unloading removes every LoRA layer, loaded or half-loaded
            pipe.unload_lora_weights()
        for tokenizer, encoder, tokens in reversed(added_tokens):
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tokenizer, text_encoder=encoder)
    except Exception as exc:
        log.exception("could not remove adapters from the pipeline")
        raise FatalEngineError(f"could not restore the model's base weights after adapters: {exc}") from exc

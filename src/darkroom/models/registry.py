"""The models folder as a list of approved models, with content hashes and detected architectures.

The API process reads this, so it must stay light: no torch, diffusers, safetensors or numpy imports (an API-only
install has none of them). A safetensors header is read directly: the format is an 8-byte little-endian length, then
that many bytes of JSON naming every tensor.

What counts as a model (top level of the models dir only; hidden entries are ignored):
- a diffusers folder: a directory holding `model_index.json`;
- a single-file checkpoint: `NAME.safetensors` whose keys hold an LDM UNet (`model.diffusion_model.*`). Its optional
  sidecars are `NAME.json` (darkroom metadata) and `NAME.config/` (a diffusers config folder, see the engine).
Pickled checkpoints (`.ckpt`, `.pt`, `.bin`, `.pth`) can run code when loaded, so they are not listed or added, unless
an admin sets `security.allow_pickle_models` (`allow_pickle=True` here): then a single-file `NAME.ckpt` (`.pt`, `.pth`)
counts like a `.safetensors` one. Even so its keys are read by an allow-listed unpickler (`darkroom.models.pickled`)
and the engine loads it with `torch.load(weights_only=True)`, so a checkpoint that would run code is still refused.

`darkroom.json` in a diffusers folder (or `NAME.json` beside a single file) may hold
`{"description": "...", "smoke_test": true}`; that is how the smoke-test model is labelled.

Adapters live in two subfolders of the models dir (searched recursively, `.safetensors` only, never listed as
models): `loras/` (LoRA / LyCORIS files, A1111/kohya or diffusers/PEFT keys) and `embeddings/` (textual inversion).
Each is named by its file stem, as A1111 names them, and hashed like a checkpoint; whether a file fits a model's
family is only known when the engine loads it into that model (a mismatch fails the job for good).

Hashing GBs of weights takes a while, so file hashes are kept in a JSON cache keyed by path, size and mtime_ns, and a
scan's result is reused until some file's size or mtime changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkroom.config import Settings
from darkroom.errors import Conflict, InvalidRequest, ServiceUnavailable
from darkroom.models import controlnets
from darkroom.models.controlnets import CONTROLNET_DIR, ControlNetInfo
from darkroom.schemas import AdapterInfo, EmbeddingSpec, LoraSpec, ModelDefaults, ModelInfo

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
PICKLE_CHECKPOINT_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})  # single files an admin may allow (`.bin` are parts)
PICKLE_HINT = "convert it to .safetensors, or have an admin set DARKROOM_SECURITY__ALLOW_PICKLE_MODELS=true"
DARKROOM_META = "darkroom.json"
SIDECAR_CONFIG_SUFFIX = ".config"
LDM_UNET_PREFIX = "model.diffusion_model."
# Key prefixes that tell the Stable Diffusion families apart in an original (LDM / sgm) single-file checkpoint.
SINGLE_FILE_ARCH_MARKERS: tuple[tuple[str, str], ...] = (
    ("conditioner.embedders.1", "sdxl"),
    ("conditioner.embedders.0.model.", "sdxl-refiner"),  # the refiner has only OpenCLIP-G, as embedder 0
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)
HASH_CHUNK = 8 * 1024 * 1024
LORAS_DIR = "loras"
EMBEDDINGS_DIR = "embeddings"
ADAPTER_DIRS = {"lora": LORAS_DIR, "embedding": EMBEDDINGS_DIR}
UPSCALERS_DIR = "upscalers"  # ESRGAN-family models (safetensors only), run by engines/upscalers.py

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class _FileStat:
    size: int
    mtime_ns: int


def slugify(name: str) -> str:
    """Model ids appear in URLs, job rows and PNG metadata: keep them lowercase ASCII without separators to escape."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_name.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-.")
    return slug or "model"


class ModelRegistry:
    SERVICE_RESCAN_SECONDS = 1.0  # what the API and worker processes set `rescan_seconds` to

    def __init__(self, models_dir: Path, cache_file: Path, *, allow_pickle: bool = False) -> None:
        """`allow_pickle`: list and add single-file pickled checkpoints (`security.allow_pickle_models`)."""
        self.models_dir = Path(models_dir)
        self.cache_file = Path(cache_file)
        self.allow_pickle = allow_pickle
        self._lock = threading.RLock()
        self._fingerprint: Fingerprint | None = None
        self._top: int | None = None  # the models folder's mtime at the last full look
        self._looked = 0.0  # time.monotonic() of the last full look
        self.rescan_seconds = 0.0  # see `scan`
        self._models: list[ModelInfo] = []
        self._hashes: dict[str, dict[str, Any]] | None = None
        self._hashes_dirty = False
        self._adapter_infos: dict[tuple[str, int, int], AdapterInfo] = {}  # (path, size, mtime_ns) → listing
        self._controlnet_infos: dict[tuple[str, int, int], ControlNetInfo] = {}  # the same for ControlNets

    @classmethod
    def for_settings(cls, settings: Settings) -> ModelRegistry:
        """The registry of a deployment: its models folder, the hash cache in its data dir, its pickle setting."""
        return cls(
            settings.resolved_models_dir,
            settings.data_dir / "model-hashes.json",
            allow_pickle=settings.security.allow_pickle_models,
        )

    # --- queries ---------------------------------------------------------------------------------------------------

    def rescan(self) -> list[ModelInfo]:
        """`scan` with a full look now, whatever `rescan_seconds` says (A1111's refresh-checkpoints)."""
        with self._lock:
            self._looked = -math.inf  # not 0.0: the monotonic clock starts near 0 at boot
            return self.scan()

    def scan(self) -> list[ModelInfo]:
        """All models, sorted by id. Cheap when nothing changed: one stat per file, no hashing, no parsing; and
        within `rescan_seconds` of the last look, one stat of the folder itself. The API and the workers set that
        (every submit without a `model` asks for the default, and every job for its model; a full look stats every
        file of every model): a model added or removed changes the folder's mtime and shows at once, weights replaced
        inside a model's own folder show within the interval (workers check hashes themselves before they serve a
        model: `models.verify`). 0, the default, looks every time."""
        if (models := self._fresh()) is not None:  # the common case, without the lock every submit would queue on
            return models
        with self._lock:
            if (models := self._fresh()) is not None:
                return models
            now, top = time.monotonic(), _mtime(self.models_dir)
            fingerprint = self._fingerprint_now()
            if fingerprint != self._fingerprint:
                self._models = self._build_infos()
                self._fingerprint = fingerprint
            self._top, self._looked = top, now  # last: a reader that sees them fresh sees these models
            return list(self._models)

    def fresh(self) -> bool:
        """Whether `scan` would answer from the last look now (one stat, no hashing): what lets a submit run its
        checks on the API's event loop (`api.v1.checks_on_loop`)."""
        return self._fresh() is not None

    def _fresh(self) -> list[ModelInfo] | None:
        """The last look's models when it is recent enough (`rescan_seconds`) and the folder's mtime has not moved."""
        looked, top, models = self._looked, self._top, self._models
        if (
            self._fingerprint is None
            or _mtime(self.models_dir) != top
            or time.monotonic() - looked >= self.rescan_seconds
        ):
            return None
        return list(models)

    def get(self, model_id: str) -> ModelInfo:
        for info in self.scan():
            if info.id == model_id:
                return info
        known = ", ".join(m.id for m in self._models) or "none"
        raise InvalidRequest(f"unknown model {model_id!r} (available: {known})", field="model")

    def default(self) -> ModelInfo:
        """A real model when there is one: the smoke model only checks the plumbing."""
        models = self.scan()
        if not models:
            raise ServiceUnavailable(f"no models in {self.models_dir}; add one with `darkroom models add PATH`")
        real = [m for m in models if not m.smoke_test and m.arch != "sdxl-refiner"]  # a refiner cannot start a picture
        return min(real or models, key=lambda m: (m.name.lower(), m.id))

    @staticmethod
    def has_models(models_dir: Path) -> bool:
        """Whether anything in the folder would be listed; decides if the smoke model is needed. No hashing."""
        if not models_dir.is_dir():
            return False
        return any(_is_listable(p) for p in _visible_entries(models_dir))

    # --- adapters ----------------------------------------------------------------------------------------------------

    def loras(self) -> list[AdapterInfo]:
        """LoRA files in `models/loras/`, by name. One stat per file when nothing changed."""
        return self._adapters("lora")

    def embeddings(self) -> list[AdapterInfo]:
        """Textual-inversion embeddings in `models/embeddings/`; each one's name is its prompt token."""
        return self._adapters("embedding")

    def lora(self, name: str) -> AdapterInfo:
        """A LoRA by exact name, else by a unique case-insensitive match (A1111 prompts are typed by hand). Only this
        file is hashed: a submit must not wait for a whole LoRA library to be hashed."""
        paths = self._adapter_paths("lora")
        found = paths.get(name)
        if found is None:
            folded = [path for known, path in paths.items() if known.casefold() == name.casefold()]
            found = folded[0] if len(folded) == 1 else None
        if found is None:
            known = ", ".join(sorted(paths, key=str.casefold)) or "none"
            raise InvalidRequest(f"unknown LoRA {name!r} (available in {LORAS_DIR}/: {known})", field="loras")
        return self._adapter("lora", found)

    def embedding(self, name: str) -> AdapterInfo:
        """An embedding by its exact name (its prompt token)."""
        found = self._adapter_paths("embedding").get(name)
        if found is None:
            raise InvalidRequest(f"unknown embedding {name!r} (in {EMBEDDINGS_DIR}/)", field="prompt")
        return self._adapter("embedding", found)

    def embedding_names(self) -> list[str]:
        """Names only: one stat per file, nothing read or hashed."""
        return list(self._adapter_paths("embedding"))

    def pin_loras(self, specs: list[LoraSpec]) -> list[LoraSpec]:
        """The request's LoRAs checked against the folder and pinned to the file versions found (their sha256): what
        the batch key, the worker and the provenance use. A client's own pin must match the file."""
        pinned: list[LoraSpec] = []
        for spec in specs:
            info = self.lora(spec.name)
            if spec.sha256 and spec.sha256 != info.sha256:
                raise InvalidRequest(
                    f"LoRA {spec.name!r} is version {info.sha256[:12]} here, not {spec.sha256[:12]}", field="loras"
                )
            pinned.append(LoraSpec(name=info.name, weight=spec.weight, sha256=info.sha256))
        return pinned

    def pin_embeddings(self, *prompts: str) -> list[EmbeddingSpec]:
        """The embeddings these prompts use (their name as a word, as A1111 matches them), with their sha256."""
        texts = [text for text in prompts if text]
        used = [name for name in self.embedding_names() if any(token_pattern(name).search(t) for t in texts)]
        return [EmbeddingSpec(name=name, sha256=self.embedding(name).sha256) for name in used]

    # --- upscalers ---------------------------------------------------------------------------------------------------

    def upscaler_files(self) -> dict[str, Path]:
        """Upscaler models in `models/upscalers/` by name (file name without .safetensors): stats only, nothing read.
        Pickled `.pth` files are never listed: loading one can run code."""
        paths: dict[str, Path] = {}
        for path in _adapter_files(self.models_dir / UPSCALERS_DIR):
            paths.setdefault(path.stem, path)
        return paths

    def file_sha256(self, path: Path) -> str:
        """A file's sha256 from the hash cache (hashed once per size and mtime): what pins an upscaler at submit."""
        with self._lock:
            digest = self._file_sha256(path)
            self._save_hash_cache()
        return digest

    def _adapter_paths(self, kind: str) -> dict[str, Path]:
        """name → file; of two files with one name (in different subfolders) the first by path wins."""
        paths: dict[str, Path] = {}
        for path in _adapter_files(self.models_dir / ADAPTER_DIRS[kind]):
            if path.stem in paths:
                log.warning("%s %s is taken by %s; ignoring %s", kind, path.stem, paths[path.stem], path)
                continue
            paths[path.stem] = path
        return paths

    def _adapter(self, kind: str, path: Path) -> AdapterInfo:
        root = self.models_dir / ADAPTER_DIRS[kind]
        with self._lock:
            try:
                info = self._adapter_info(kind, root, path)
            except Exception as exc:
                field = "loras" if kind == "lora" else "prompt"
                raise InvalidRequest(f"{path.name} is not a readable safetensors file: {exc}", field=field) from exc
            self._save_hash_cache()
        return info

    def _adapters(self, kind: str) -> list[AdapterInfo]:
        root = self.models_dir / ADAPTER_DIRS[kind]
        out: list[AdapterInfo] = []
        with self._lock:
            for path in self._adapter_paths(kind).values():
                try:
                    out.append(self._adapter_info(kind, root, path))
                except Exception as exc:  # a truncated download must not hide the others
                    log.warning("skipping %s: not a readable safetensors file: %s", path, exc)
            self._save_hash_cache()
        return sorted(out, key=lambda a: a.name.casefold())

    def _adapter_info(self, kind: str, root: Path, path: Path) -> AdapterInfo:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        hit = self._adapter_infos.get(key)
        if hit is not None and hit.kind == kind:
            return hit
        metadata = safetensors_metadata(path)
        info = AdapterInfo(
            kind=kind,
            name=path.stem,
            alias=metadata.get("ss_output_name") or path.stem,
            path=str(path.resolve()),
            relpath=path.relative_to(root).as_posix(),
            sha256=self._file_sha256(path),
            size_bytes=st.st_size,
            metadata=metadata,
        )
        self._adapter_infos[key] = info
        return info

    # --- ControlNet -------------------------------------------------------------------------------------------------

    def controlnets(self) -> list[ControlNetInfo]:
        """ControlNet models in `models/controlnet/` (see models/controlnets.py), by name; unreadable ones skipped."""
        out: list[ControlNetInfo] = []
        with self._lock:
            for name, (path, fmt) in controlnets.candidates(self.models_dir / CONTROLNET_DIR).items():
                try:
                    info = self._controlnet_info(name, path, fmt)
                except Exception as exc:  # a truncated download must not hide the others
                    log.warning("skipping ControlNet %s: %s", path, exc)
                    continue
                if info is not None:
                    out.append(info)
            self._save_hash_cache()
        return sorted(out, key=lambda c: c.name.casefold())

    def controlnet(self, name: str) -> ControlNetInfo:
        """A ControlNet by name: exact, then A1111's `name [hash8]` title, then a unique case-insensitive match. Only
        this one is hashed."""
        found = controlnets.candidates(self.models_dir / CONTROLNET_DIR)
        bare = re.sub(r"\s*\[[0-9a-f]{8,}\]$", "", name.strip())
        key = bare if bare in found else None
        if key is None:
            folded = [known for known in found if known.casefold() == bare.casefold()]
            key = folded[0] if len(folded) == 1 else None
        info = None
        if key is not None:
            with self._lock:
                try:
                    info = self._controlnet_info(key, *found[key])
                except Exception as exc:
                    raise InvalidRequest(f"ControlNet {name!r} is not readable: {exc}", field="controlnet") from exc
                self._save_hash_cache()
        if info is None:
            known = ", ".join(sorted(found, key=str.casefold)) or "none"
            raise InvalidRequest(
                f"unknown ControlNet model {name!r} (available in {CONTROLNET_DIR}/: {known})", field="controlnet"
            )
        return info

    def _controlnet_info(self, name: str, path: Path, fmt: str) -> ControlNetInfo | None:
        files = controlnets.folder_files(path) if fmt == "diffusers" else [path]
        stats = [(f, f.stat()) for f in files]
        key = (str(path), sum(st.st_size for _, st in stats), max((st.st_mtime_ns for _, st in stats), default=0))
        hit = self._controlnet_infos.get(key)
        if hit is not None:
            return hit
        if fmt == "diffusers":
            arch: str | None = controlnets.folder_arch(path)
            sha = self._folder_sha256(path, files)
        else:
            arch = controlnets.single_file_arch(safetensors_header(path))
            if arch is None:
                log.info("skipping %s: not a ControlNet (no conditioning-image encoder in its keys)", path)
                return None
            sha = self._file_sha256(path)
        info = ControlNetInfo(
            name=name,
            format="diffusers" if fmt == "diffusers" else "single_file",
            arch=arch or "unknown",
            path=str(path.resolve()),
            relpath=path.relative_to(self.models_dir / CONTROLNET_DIR).as_posix(),
            sha256=sha,
            size_bytes=key[1],
        )
        self._controlnet_infos[key] = info
        return info

    # --- adding ------------------------------------------------------------------------------------------------------

    def add(self, path: Path, name: str | None = None) -> ModelInfo:
        """Copy a checkpoint or diffusers folder into the models dir and return what the registry makes of it.

        The copy goes to a hidden temporary name first and is renamed into place, so a concurrent scan never lists a
        half-written model.
        """
        if name:
            _check_name(name)
        path = Path(path).expanduser().resolve()
        kind = _validate_source(path, self.allow_pickle)
        stem = slugify(name) if name else slugify(path.stem if kind == "single_file" else path.name)
        dest = self.models_dir / (f"{stem}{path.suffix.lower()}" if kind == "single_file" else stem)
        if dest.exists() or any(m.id == stem for m in self.scan()):
            raise Conflict(f"a model named {stem!r} already exists in {self.models_dir}", field="name")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        if kind == "single_file":
            self._copy_single_file(path, dest)
        else:
            _atomic_copy(path, dest)
        for info in self.scan():
            if Path(info.path) == dest.resolve():
                return info
        raise InvalidRequest(f"{path} was copied to {dest} but is not recognised as a model", field="path")

    def _copy_single_file(self, src: Path, dest: Path) -> None:
        """Sidecars travel with the checkpoint; the checkpoint goes last because its arrival is what a scan sees."""
        meta = src.with_suffix(".json")
        if meta.is_file():
            _atomic_copy(meta, dest.with_suffix(".json"))
        config = src.with_name(src.stem + SIDECAR_CONFIG_SUFFIX)
        if config.is_dir():
            _atomic_copy(config, dest.with_name(dest.stem + SIDECAR_CONFIG_SUFFIX))
        _atomic_copy(src, dest)

    # --- scanning ----------------------------------------------------------------------------------------------------

    def _fingerprint_now(self) -> Fingerprint:
        if not self.models_dir.is_dir():
            return ()
        rows: list[tuple[str, int, int]] = []
        for entry in _visible_entries(self.models_dir):
            files = _walk_files(entry) if (entry / "model_index.json").is_file() else [entry]
            for f in files:
                st = _stat(f)
                if st is not None:
                    rows.append((str(f.relative_to(self.models_dir)), st.size, st.mtime_ns))
        return tuple(rows)

    def _build_infos(self) -> list[ModelInfo]:
        infos: list[ModelInfo] = []
        taken: set[str] = set()
        for entry in _visible_entries(self.models_dir):
            kind = _model_kind(entry, self.allow_pickle)
            if kind is None:
                continue
            try:
                info = self._describe(entry, kind)
            except Exception as exc:  # one unreadable file (a truncated download) must not hide the others
                log.warning("skipping %s: %s", entry, exc)
                continue
            if info is None:
                continue
            info = _unique_id(info, taken)
            taken.add(info.id)
            infos.append(info)
            log.info("model %s: %s %s, %.1f MB, sha256 %s", info.id, info.format, info.arch, *_size_and_hash(info))
        self._save_hash_cache()
        return sorted(infos, key=lambda m: m.id)

    def _describe(self, entry: Path, kind: str) -> ModelInfo | None:
        if kind == "diffusers":
            if not _diffusers_weights_are_safe(entry):
                return None
            arch: str | None = diffusers_arch(entry)
            meta = _read_meta(entry / DARKROOM_META)
            files = _model_files(entry)
            sha = self._folder_sha256(entry, files)
            size = sum(f.stat().st_size for f in files)
            name = entry.name
        else:
            arch = single_file_arch(entry)
            if arch is None:
                log.info("skipping %s: not a Stable Diffusion checkpoint (no %s keys)", entry, LDM_UNET_PREFIX)
                return None
            meta = _read_meta(entry.with_suffix(".json"))
            sha = self._file_sha256(entry)
            size = entry.stat().st_size
            name = entry.stem
        return ModelInfo(
            id=slugify(name),
            name=name,
            format="diffusers" if kind == "diffusers" else "single_file",
            arch=arch,
            path=str(entry.resolve()),
            sha256=sha,
            size_bytes=size,
            smoke_test=bool(meta.get("smoke_test", False)),
            description=str(meta.get("description", "")),
            defaults=_defaults(meta, entry),
        )

    # --- hashing -----------------------------------------------------------------------------------------------------

    def _folder_sha256(self, folder: Path, files: list[Path]) -> str:
        """Over sorted (relative path, file hash) pairs: renaming a component changes the version, like its bytes."""
        digest = hashlib.sha256()
        for f in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
            digest.update(f"{f.relative_to(folder).as_posix()}\0{self._file_sha256(f)}\n".encode())
        return digest.hexdigest()

    def _file_sha256(self, path: Path) -> str:
        cache = self._hash_cache()
        st = path.stat()
        key = str(path.resolve())
        hit = cache.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit["sha256"])
        log.debug("hashing %s (%d bytes)", path, st.st_size)
        with path.open("rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        self._hashes_dirty = True
        return sha

    def _hash_cache(self) -> dict[str, dict[str, Any]]:
        if self._hashes is None:
            self._hashes = _read_json(self.cache_file)
        return self._hashes

    def _save_hash_cache(self) -> None:
        """Merge with what is on disk, then replace atomically: the API and worker processes share this file."""
        if self._hashes is None or not self._hashes_dirty:
            return
        merged = {**_read_json(self.cache_file), **self._hashes}
        live = {k: v for k, v in merged.items() if isinstance(v, dict) and Path(k).exists()}
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=self.cache_file.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(live, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_file)
            self._hashes, self._hashes_dirty = live, False
        except OSError as exc:
            log.warning("could not write the hash cache %s: %s", self.cache_file, exc)


# --- detection (module functions: the engine and `add` use them too) -------------------------------------------------


def single_file_arch(path: Path) -> str | None:
    """sd1 | sd2 | sdxl | unknown from the tensor names alone; None when the file holds no SD UNet (a LoRA, a VAE)."""
    keys = checkpoint_keys(path)
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return None
    for prefix, arch in SINGLE_FILE_ARCH_MARKERS:
        if any(k.startswith(prefix) for k in keys):
            return arch
    return "unknown"


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names: the safetensors header, or a pickle read by the allow-listed unpickler (no code runs)."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        from darkroom.models.pickled import pickle_keys

        return pickle_keys(path)
    return safetensors_keys(Path(path))


SAFETENSORS_MAX_HEADER = 100_000_000  # the limit the safetensors library itself enforces


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors header; ValueError for a file that is not one."""
    return [key for key in safetensors_header(path) if key != "__metadata__"]


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header: tensor name → {dtype, shape, data_offsets}, and `__metadata__`; ValueError if not one."""
    with path.open("rb") as fh:
        prefix = fh.read(8)
        size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= size <= SAFETENSORS_MAX_HEADER:
            raise ValueError(f"{path.name}: not a safetensors file (header length {size})")
        raw = fh.read(size)
    try:
        header = json.loads(raw) if len(raw) == size else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: not a safetensors file (unreadable header)")
    return header


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's `__metadata__` (kohya writes its training settings there); reading it checks the header too."""
    meta = safetensors_header(Path(path)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def token_pattern(name: str) -> re.Pattern[str]:
    """An embedding's name as a word of a prompt: not inside a longer word (`-` counts as part of a word)."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


def _adapter_files(root: Path) -> list[Path]:
    """`*.safetensors` under an adapter folder, hidden files and folders skipped (pickled adapters are never used)."""
    if not root.is_dir():
        return []
    return [f for f in _walk_files(root) if f.suffix.lower() == ".safetensors"]


def diffusers_arch(folder: Path) -> str:
    """SD 2 differs from SD 1 only in sizes: a 1024-wide cross-attention (OpenCLIP-H) and linear projections."""
    index = json.loads((folder / "model_index.json").read_text())
    cls = str(index.get("_class_name", ""))
    if cls.startswith("StableDiffusionXL"):  # the refiner: no first text encoder, only OpenCLIP-G
        refiner = "text_encoder" in index and (index["text_encoder"] or [None])[0] is None  # saved as [null, null]
        return "sdxl-refiner" if refiner else "sdxl"
    if not cls.startswith("StableDiffusion"):
        return "unknown"
    unet = _read_json(folder / "unet" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    if unet.get("cross_attention_dim") == 1024 or text.get("hidden_size") == 1024 or unet.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def _is_listable(entry: Path) -> bool:
    kind = _model_kind(entry)
    if kind == "diffusers":
        return _diffusers_weights_are_safe(entry)
    if kind == "single_file":
        try:
            return single_file_arch(entry) is not None
        except Exception:
            return False
    return False


def _model_kind(entry: Path, allow_pickle: bool = False) -> str | None:
    if entry.is_dir():
        if entry.name.endswith(SIDECAR_CONFIG_SUFFIX):
            return None  # a single file's config sidecar (weights-less), not a model of its own
        return "diffusers" if (entry / "model_index.json").is_file() else None
    suffix = entry.suffix.lower()
    if allow_pickle and suffix in PICKLE_CHECKPOINT_SUFFIXES:
        return "single_file"
    if suffix in PICKLE_SUFFIXES:
        log.warning("ignoring %s: pickled checkpoints can run code when loaded; %s", entry, PICKLE_HINT)
        return None
    return "single_file" if suffix == ".safetensors" else None


def _visible_entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _model_files(folder: Path) -> list[Path]:
    """Every file that makes up a diffusers model; darkroom's own metadata is not part of the weights' identity."""
    return [f for f in _walk_files(folder) if f != folder / DARKROOM_META]


def _walk_files(folder: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return out


def _diffusers_weights_are_safe(folder: Path) -> bool:
    """Each component folder must carry safetensors weights; one that only has pickles refuses the whole model."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in sub.rglob("*") if f.is_file()]
        pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(f.suffix == ".safetensors" for f in files):
            log.warning("ignoring %s: %s has only pickled weights (%s)", folder, sub.name, pickles[0].name)
            return False
    if not any(folder.rglob("*.safetensors")):
        log.warning("ignoring %s: no .safetensors weights in it", folder)
        return False
    return True


def _validate_source(path: Path, allow_pickle: bool = False) -> str:
    if not path.exists():
        raise InvalidRequest(f"{path} does not exist", field="path")
    pickled = path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES
    if pickled and not (allow_pickle and path.suffix.lower() in PICKLE_CHECKPOINT_SUFFIXES):
        raise InvalidRequest(
            f"{path.name} is a pickled checkpoint, which can run code when loaded; {PICKLE_HINT}", field="path"
        )
    kind = _model_kind(path, allow_pickle)
    if kind is None:
        raise InvalidRequest(
            f"{path} is neither a .safetensors checkpoint nor a diffusers folder (with model_index.json)", field="path"
        )
    if kind == "diffusers" and not _diffusers_weights_are_safe(path):
        raise InvalidRequest(
            f"{path} has no safetensors weights (pickles are refused); save it with safe_serialization=True",
            field="path",
        )
    if kind == "single_file":
        try:
            arch = single_file_arch(path)
        except Exception as exc:  # safetensors raises its own error type for a corrupt header
            what = "weights-only checkpoint" if pickled else "safetensors file"
            raise InvalidRequest(f"{path.name} is not a readable {what}: {exc}", field="path") from exc
        if arch is None:
            raise InvalidRequest(f"{path.name} holds no Stable Diffusion UNet ({LDM_UNET_PREFIX}*)", field="path")
    return kind


def _check_name(name: str) -> None:
    """A name that looks like a path is refused, not quietly slugified: `--name ../evil` is a mistake or an attack."""
    if any(sep in name for sep in ("/", "\\", "\0")) or name.strip() in (".", ".."):
        raise InvalidRequest(f"model name {name!r} must be a plain name, not a path", field="name")


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".adding-{dest.name}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def _unique_id(info: ModelInfo, taken: set[str]) -> ModelInfo:
    """`Foo.safetensors` and a `foo/` folder would share an id; the later one (by name) gets a numbered suffix."""
    if info.id not in taken:
        return info
    n = 2
    while f"{info.id}-{n}" in taken:
        n += 1
    log.warning("model id %s is taken; listing %s as %s-%d", info.id, info.path, info.id, n)
    return info.model_copy(update={"id": f"{info.id}-{n}"})


def _defaults(meta: dict[str, Any], entry: Path) -> ModelDefaults:
    """The metadata's `defaults`; a bad one is logged and ignored rather than hiding the model."""
    try:
        return ModelDefaults.model_validate(meta.get("defaults") or {})
    except ValueError as exc:
        log.warning("%s: ignoring its defaults: %s", entry, exc)
        return ModelDefaults()


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not data:
        log.warning("ignoring %s: not a JSON object", path)
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stat(path: Path) -> _FileStat | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return _FileStat(st.st_size, st.st_mtime_ns)


def _size_and_hash(info: ModelInfo) -> tuple[float, str]:
    """For the one start-up line per model (file by file hashing is logged at DEBUG)."""
    return info.size_bytes / 1e6, info.sha256[:12]


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None

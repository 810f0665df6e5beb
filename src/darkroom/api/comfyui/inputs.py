"""ComfyUI's input folder, per tenant: images uploaded with `/upload/image` and `/upload/mask`, named as the client
named them, for LoadImage nodes to refer to. The bytes live in the blob store (content-addressed, like every upload)
and the names in the settings table, so every API process and node sees the same folder; a tenant never sees
another tenant's names."""

from __future__ import annotations

import re
from typing import Any

from darkroom.errors import InvalidRequest
from darkroom.kv import SettingsKV
from darkroom.service import Services

MAX_INPUTS = 500  # names kept per tenant; the oldest goes first
_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,200}$")


def _key(tenant: str) -> str:
    return f"comfyui.inputs.{tenant}"


def check_name(value: str, field: str, allow_empty: bool = False) -> str:
    """A file or subfolder name as ComfyUI takes them: no path separators climbing out, no control characters."""
    if allow_empty and value == "":
        return value
    parts = value.replace("\\", "/").split("/") if field == "subfolder" else [value]
    if not all(_NAME.match(part) and part not in (".", "..") for part in parts):
        raise InvalidRequest(f"{field}: {value!r} is not a valid name", field=field)
    return value


def full_name(name: str, subfolder: str) -> str:
    return f"{subfolder.strip('/')}/{name}" if subfolder.strip("/") else name


class Inputs:
    """One tenant's uploaded inputs: name (with subfolder) → blob key."""

    def __init__(self, svc: Services, tenant: str) -> None:
        self.svc = svc
        self.tenant = tenant
        self.kv = SettingsKV(svc.store.engine)

    def names(self) -> dict[str, Any]:
        stored = self.kv.get(_key(self.tenant), {}) or {}
        return dict(stored)

    def add(self, name: str, subfolder: str, data: bytes, content_type: str, overwrite: bool) -> str:
        """Store the bytes under `name` (made unique as ComfyUI does, `name (1).png`, unless `overwrite`)."""
        _, key = self.svc.blobs.put(data, content_type)
        table = self.names()
        chosen = name
        if not overwrite:
            stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
            counter = 1
            while full_name(chosen, subfolder) in table and table[full_name(chosen, subfolder)] != key:
                chosen = f"{stem} ({counter}){dot}{ext}"
                counter += 1
        table.pop(full_name(chosen, subfolder), None)
        table[full_name(chosen, subfolder)] = key
        while len(table) > MAX_INPUTS:
            table.pop(next(iter(table)))
        self.kv.set(_key(self.tenant), table)
        return chosen

    def read(self, name: str) -> bytes:
        """The bytes of `name` (`sub/name.png`, or ComfyUI's annotated `name.png [input]`); KeyError if unknown."""
        clean = name.removesuffix(" [input]").strip()
        key = self.names()[clean]
        return self.svc.blobs.get(key)

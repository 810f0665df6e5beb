"""The tensor names of a pickled PyTorch checkpoint (`.ckpt`), read without torch and without running its code.

A pickle is a program: unpickling calls whatever callables it names, which is how a `.ckpt` can run code. The registry
only needs the key names (to tell a Stable Diffusion UNet and its family apart), so it unpickles `data.pkl` of the
zip container `torch.save` writes with an allow-list in the spirit of `torch.load(weights_only=True)`: dicts, plain
values, and torch's tensor-rebuild functions, which here build nothing (tensor data is never read). Any other global
(`os.system`, `builtins.exec`, a training framework's callback class) stops the read with `UnsafeCheckpoint`. The
engine later loads the weights through diffusers, which calls `torch.load(weights_only=True)`: the same rule.

The pre-1.6 (non-zip) torch format is not read; re-save such a file, or better, convert it to safetensors.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

MAX_PICKLE_BYTES = 64 * 1024 * 1024  # a real SD checkpoint's data.pkl is well under 1 MiB; a huge one is suspect


class UnsafeCheckpoint(ValueError):
    """The checkpoint is not a plain weights file: reading it would run code, or it is not torch's format."""


class _Tensor:
    """Stands in for a tensor: the registry needs names, never values."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Storage:
    """Stands in for a storage type (`torch.FloatStorage`, …) named in a persistent id."""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch._utils", "_rebuild_parameter"): _Tensor,
    ("torch._utils", "_rebuild_parameter_with_state"): _Tensor,
    ("torch", "Size"): tuple,
    ("torch.storage", "UntypedStorage"): _Storage,
}


class _NamesOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _Storage
        raise UnsafeCheckpoint(f"it calls {module}.{name}, which a weights-only load refuses")

    def persistent_load(self, pid: Any) -> Any:
        return None  # a storage reference: tensor bytes live elsewhere in the zip, and are not needed


def pickle_keys(path: Path) -> list[str]:
    """The tensor names, unwrapped from Lightning's `{"state_dict": …}` the way diffusers unwraps them."""
    data = _read_data_pkl(Path(path))
    try:
        obj = _NamesOnly(io.BytesIO(data)).load()
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # a corrupt pickle: any of pickle's many error types
        raise UnsafeCheckpoint(f"unreadable pickle: {type(exc).__name__}: {exc}") from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnsafeCheckpoint(f"holds a {type(obj).__name__}, not a dict of tensors")
    return [str(key) for key in obj]


def _read_data_pkl(path: Path) -> bytes:
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint("not a PyTorch zip checkpoint (torch >= 1.6 format); convert it to .safetensors")
    with zipfile.ZipFile(path) as archive:
        entries = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
        if len(entries) != 1:
            raise UnsafeCheckpoint("not a PyTorch checkpoint (no single data.pkl)")
        if entries[0].file_size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpoint(f"its data.pkl is {entries[0].file_size} bytes, more than a checkpoint needs")
        return archive.read(entries[0])

"""The informational corners of A1111's API that clients call on start-up (`webuiapi` and UIs built on it list
hypernetworks, face restorers, scripts, extensions, flags and memory before they generate). darkroom answers each in
A1111's shape with what it has: no hypernetworks, face restorers, scripts or extensions; `interrogate` (CLIP/DeepBooru
captioning) is a 501, never a made-up caption."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Depends, Request

from darkroom import __version__
from darkroom.auth.principal import Permission
from darkroom.errors import DarkroomError

from .auth import is_loopback, require
from .v1 import services

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(require(Permission.generate))])


class NotImplementedByDarkroom(DarkroomError):
    status = 501
    code = "not_implemented"


@router.get("/hypernetworks", summary="Hypernetworks (none: darkroom runs LoRAs, see /loras)")
def hypernetworks() -> list[dict[str, Any]]:
    return []


@router.get("/face-restorers", summary="Face restorers (none in darkroom)")
def face_restorers() -> list[dict[str, Any]]:
    return []


@router.get("/scripts", summary="Scripts per tab (none: darkroom runs no A1111 scripts)")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/script-info", summary="Script argument descriptions (none)")
def script_info() -> list[dict[str, Any]]:
    return []


@router.get("/extensions", summary="Installed extensions (none: ControlNet and hires fix are built in)")
def extensions() -> list[dict[str, Any]]:
    return []


@router.get("/cmd-flags", summary="The server's flags, in A1111's names where darkroom has an equivalent")
def cmd_flags(request: Request) -> dict[str, Any]:
    svc = services(request)
    settings = svc.settings
    return {
        "api": True,
        "nowebui": False,
        "api_auth": svc.keys.any_keys(),
        "listen": not is_loopback(settings.host),
        "port": settings.port,
        "server_name": settings.host,
        "data_dir": None,  # not shown: the API does not hand out server paths
        "ckpt_dir": None,
        "lora_dir": None,
        "xformers": False,
        "opt_sdp_attention": True,
        "skip_torch_cuda_test": True,
        "version": f"darkroom {__version__}",
    }


@router.get("/memory", summary="Memory: this API process's machine (GPUs belong to the workers: see /metrics)")
def memory(request: Request) -> dict[str, Any]:
    return {"ram": ram(), "cuda": {"error": "the API process holds no GPU; worker devices are in /metrics"}}


def ram() -> dict[str, int]:
    """Total and free bytes from the operating system (no psutil), as A1111's `ram` reports them."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return {"free": 0, "used": 0, "total": 0}
    return {"free": free, "used": total - free, "total": total}


@router.post("/interrogate", summary="Caption an image (CLIP / DeepBooru): not available in darkroom, 501")
def interrogate() -> dict[str, Any]:
    raise NotImplementedByDarkroom("interrogate (CLIP/DeepBooru captioning) is not available in darkroom")

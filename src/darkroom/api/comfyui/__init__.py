"""ComfyUI-compatible API: workflows compiled into darkroom jobs (`compile`), ComfyUI's routes (`routes`), its
WebSocket (`ws`) and node catalogue (`nodes`)."""

from .routes import router, socket_router

__all__ = ["router", "socket_router"]

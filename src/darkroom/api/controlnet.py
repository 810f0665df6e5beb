"""ControlNet units and the SDXL refiner at submit, and A1111's ControlNet extension API.

At submit (every API ends in `v1.submit`): each unit's preprocessor and model are checked (422 naming them, and the
model's family against the request's model), the model pinned by sha256, and the control image checked by the same
upload limits as an init image before any pixel is decoded, then stored like one (`blob:<sha256>`, written only once
the job is admitted). The refiner must be a registered SDXL model or refiner, pinned the same way.

A1111's extension: `alwayson_scripts.controlnet.args` is a list of units (`enabled`, `image` or `input_image`,
`module`, `model` as `name [hash]`, `weight`, `guidance_start/end`, `control_mode` and `resize_mode` as names or
numbers, `threshold_a/b`). Disabled units are skipped, as the extension does; `/controlnet/model_list`,
`/controlnet/module_list` and `/controlnet/version` answer in its shapes. Its low-VRAM, pixel-perfect and
processor-resolution settings have no meaning here and are ignored (maps are made at the output size).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from darkroom.auth.principal import Permission
from darkroom.config import Limits
from darkroom.engines import preprocessors
from darkroom.engines.controlnet import check_family, pin_units
from darkroom.engines.refiner import check_refiner
from darkroom.errors import InvalidRequest
from darkroom.models import access as model_access
from darkroom.models.controlnets import ControlNetInfo
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import ControlNetUnit, GenerationRequest, ModelInfo, RefinerSpec
from darkroom.service import Services
from darkroom.storage.base import content_key

from .auth import require, tenant_policy
from .uploads import decode_base64_image, load_image

EXTENSION_VERSION = 2  # the extension's API version its clients check (`/controlnet/version`)
A1111_ARGS = "alwayson_scripts.controlnet.args"
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control"}
CONTROL_MODE_NAMES = {"balanced": "balanced", "my prompt is more important": "prompt"}
CONTROL_MODE_NAMES["controlnet is more important"] = "control"
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}
RESIZE_MODE_NAMES = {"just resize": "resize", "crop and resize": "crop", "resize and fill": "fill"}
RESIZE_MODE_NAMES.update({"inner fit (scale to fit)": "crop", "outer fit (shrink to fit)": "fill"})  # older names

router = APIRouter(prefix="/controlnet", tags=["a1111"], dependencies=[Depends(require(Permission.generate))])


# --- at submit ------------------------------------------------------------------------------------------------------


def prepare(
    registry: ModelRegistry, body: GenerationRequest, model: ModelInfo, limits: Limits
) -> tuple[dict[str, Any], list[bytes]]:
    """The request's updates (pinned units with stored image references, pinned refiner) and the control images'
    PNG bytes to store once the job is admitted. Everything is checked before the first image is decoded."""
    if model.arch == "sdxl-refiner":
        raise InvalidRequest(
            f"model {model.id!r} is an SDXL refiner: it finishes another model's picture (name it as `refiner`)",
            field="model",
        )
    updates: dict[str, Any] = {}
    if body.refiner is not None:
        refiner = _registered(registry, body.refiner.model, "refiner.model")
        check_refiner(refiner, model)
        if body.refiner.sha256 and body.refiner.sha256 != refiner.sha256:
            raise InvalidRequest(f"refiner {refiner.id!r} is another version here", field="refiner.model")
        updates["refiner"] = body.refiner.model_copy(update={"model": refiner.id, "sha256": refiner.sha256})
    if not body.controlnet:
        return updates, []
    units = pin_units(registry, body.controlnet, model)
    raws = [decode_base64_image(u.image, limits, f"controlnet[{i}].image") for i, u in enumerate(units)]
    uploads = [load_image(raw, limits, f"controlnet[{i}].image") for i, raw in enumerate(raws)]
    stored = [
        u.model_copy(update={"image": f"blob:{content_key(png)[1]}"}) for u, png in zip(units, uploads, strict=True)
    ]
    updates["controlnet"] = stored
    return updates, uploads


# --- A1111's extension --------------------------------------------------------------------------------------------


def a1111_units(registry: ModelRegistry, scripts: dict[str, Any], model: ModelInfo) -> list[dict[str, Any]]:
    """`alwayson_scripts.controlnet.args` as native units, checked with the extension's field names."""
    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return []
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest(f"{A1111_ARGS} must be a list of units", field=A1111_ARGS)
    units: list[dict[str, Any]] = []
    for i, arg in enumerate(args):
        field = f"{A1111_ARGS}[{i}]"
        if not isinstance(arg, dict):
            raise InvalidRequest(f"{field} must be an object", field=field)
        if not arg.get("enabled", True):
            continue
        units.append(_a1111_unit(registry, arg, model, field))
    return units


def _a1111_unit(registry: ModelRegistry, arg: dict[str, Any], model: ModelInfo, field: str) -> dict[str, Any]:
    image = arg.get("image") if arg.get("image") is not None else arg.get("input_image")
    if isinstance(image, dict):  # the extension also takes {"image": b64, "mask": b64}
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise InvalidRequest(f"{field}.image: the unit needs a control image (base64)", field=f"{field}.image")
    module = preprocessors.resolve(str(arg.get("module") or "none"), field=f"{field}.module")
    name = str(arg.get("model") or "")
    if not name or name.lower() == "none":
        raise InvalidRequest(f"{field}.model: the unit names no ControlNet model", field=f"{field}.model")
    try:
        info = registry.controlnet(name)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=f"{field}.model") from None
    check_family(info, model, f"{field}.model")
    unit = {
        "image": image,
        "module": module,
        "model": info.name,
        "weight": arg.get("weight", 1.0),
        "guidance_start": arg.get("guidance_start", 0.0),
        "guidance_end": arg.get("guidance_end", 1.0),
        "control_mode": _mode(arg.get("control_mode", 0), CONTROL_MODES, CONTROL_MODE_NAMES, f"{field}.control_mode"),
        "resize_mode": _mode(arg.get("resize_mode", 1), RESIZE_MODES, RESIZE_MODE_NAMES, f"{field}.resize_mode"),
        "threshold_a": _threshold(arg.get("threshold_a")),
        "threshold_b": _threshold(arg.get("threshold_b")),
    }
    if arg.get("guessmode") and not arg.get("control_mode"):  # the extension's older name for the same thing
        unit["control_mode"] = "control"
    try:
        return ControlNetUnit(**unit).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"{field}.{first['loc'][0]}" if first["loc"] else field
        raise InvalidRequest(f"{where}: {first['msg']}", field=where) from None


def _mode(value: Any, numbers: dict[int, str], names: dict[str, str], field: str) -> str:
    if isinstance(value, int) and value in numbers:
        return numbers[value]
    if isinstance(value, str) and value.strip().lower() in names:
        return names[value.strip().lower()]
    if isinstance(value, str) and value.strip().lower() in numbers.values():
        return value.strip().lower()
    raise InvalidRequest(f"{field}: {value!r} is not one of {sorted(names)} or {sorted(numbers)}", field=field)


def _threshold(value: Any) -> float | None:
    """The extension sends -1 for "the module's default"."""
    if value is None or (isinstance(value, int | float) and value < 0):
        return None
    return float(value)


def _registered(registry: ModelRegistry, model_id: str, field: str) -> ModelInfo:
    try:
        return registry.get(model_id)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=field) from None


def a1111_refiner(svc: Services, checkpoint: str | None, switch_at: float | None) -> RefinerSpec | None:
    """`refiner_checkpoint` (any name A1111 clients use for a checkpoint; "None" for none) and `refiner_switch_at`
    (A1111's default 0.8)."""
    from . import compat  # it imports v1, which imports this module

    if not checkpoint or checkpoint.strip().lower() == "none":
        return None
    info = compat.find_model(svc, checkpoint, "refiner_checkpoint")
    try:
        return RefinerSpec(model=info.id, switch_at=0.8 if switch_at is None else switch_at)
    except ValidationError as exc:
        raise InvalidRequest(
            f"refiner_switch_at: {exc.errors()[0]['msg']} (between 0 and 1)", field="refiner_switch_at"
        ) from None


@router.get("/version", summary="The ControlNet extension API version darkroom speaks")
def version() -> dict[str, Any]:
    return {"version": EXTENSION_VERSION}


@router.get("/model_list", summary="ControlNet models in models/controlnet/, as `name [hash8]`")
def model_list(request: Request, update: bool = True) -> dict[str, Any]:
    """The tenant's view: ControlNets its policy does not allow are left out, as in every listing."""
    registry: ModelRegistry = request.app.state.services.registry
    listed = model_access.visible(tenant_policy(request), "controlnet", registry.controlnets(), _name)
    return {"model_list": [info.title() for info in listed]}


def _name(info: ControlNetInfo) -> str:
    return info.name


@router.get("/module_list", summary="Built-in preprocessors (none need downloaded weights)")
def module_list(alias_names: bool = False) -> dict[str, Any]:
    return {
        "module_list": list(preprocessors.MODULES),
        "module_detail": {name: module.detail() for name, module in preprocessors.MODULES.items()},
    }


def a1111_fields(
    svc: Services, scripts: dict[str, Any], refiner_checkpoint: str | None, switch_at: float | None, model_id: str
) -> dict[str, Any]:
    """The request fields A1111's ControlNet units and refiner become (none when the request uses neither)."""
    fields: dict[str, Any] = {}
    refiner = a1111_refiner(svc, refiner_checkpoint, switch_at)
    if refiner is not None:
        fields["refiner"] = refiner
    if scripts:
        units = a1111_units(svc.registry, scripts, svc.registry.get(model_id))
        if units:
            fields["controlnet"] = units
    return fields


def a1111_field_names(units: int = 4) -> dict[str, str]:
    """Internal field → A1111's, for errors raised at submit (unit i: the i-th enabled unit)."""
    names = {"refiner": "refiner_checkpoint", "refiner.model": "refiner_checkpoint"}
    names.update({"refiner.switch_at": "refiner_switch_at", "controlnet": A1111_ARGS})
    for i in range(units):
        for part in ("image", "model", "module"):
            names[f"controlnet[{i}].{part}"] = f"{A1111_ARGS}[{i}].{part}"
    return names

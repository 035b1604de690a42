"""Reading DETR checkpoints: ``{"model": state_dict, ...}`` (the official format) or a bare state dict, loaded
strictly, with every missing, unexpected and shape-mismatched key reported in one error; NaN or inf weights are
refused with the tensors named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from detr_ptq.models.build import DETRConfig, build_detr, config_from_dict, get_preset
from gmpq.errors import UserError
from gmpq.io import atomic_torch_save


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str, dict]:
    """-> (state_dict, which format was found, the whole file as a dict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise UserError(f"checkpoint {str(path)!r} cannot be read by torch.load ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint {str(path)!r} holds a {type(raw).__name__}; expected a dict with key "
                        f"'model' (the official DETR format) or a bare state dict")
    from gmpq.models.weights import check_finite_state  # late import: gmpq.models registers every model

    if "model" in raw and isinstance(raw["model"], dict):
        check_finite_state(raw["model"], f"checkpoint {str(path)!r}")
        return raw["model"], "dict with key 'model'", raw
    if raw and all(isinstance(v, Tensor) for v in raw.values()):
        check_finite_state(raw, f"checkpoint {str(path)!r}")
        return raw, "bare state dict (no 'model' key)", {"model": raw}
    raise UserError(f"checkpoint {str(path)!r} has keys {sorted(raw)[:10]} but no 'model' state dict and is not "
                    f"a bare state dict of tensors")


def _preview(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one grouped error listing every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the model ({len(own)} tensors):"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): {_preview(shapes)}")
        parts.append("  choose the config that matches the checkpoint (--config detr_r50|detr_tiny)")
        raise UserError("\n".join(parts))
    model.load_state_dict(state, strict=True)


def load_detr(path: str | Path, config: str | None = None, verbose: bool = True):
    """Build the DETR described by ``config`` (a preset name), else by the config stored in the checkpoint,
    else ``detr_r50``; load the weights strictly. -> (model, criterion, postprocessors, cfg)."""
    model, criterion, post, cfg, _ = load_detr_with_file(path, config, verbose)
    return model, criterion, post, cfg


def load_detr_with_file(path: str | Path, config: str | None = None, verbose: bool = True):
    """As ``load_detr``, also returning the whole checkpoint dict (its ``train_config``, ``metrics``...)."""
    state, found, raw = read_state_dict(path)
    if config is not None:
        cfg = get_preset(config)
    elif isinstance(raw.get("config"), dict):
        cfg = config_from_dict(raw["config"])
    else:
        cfg = get_preset("detr_r50")
    if verbose:
        print(f"checkpoint {path}: found a {found}; config {cfg.name}")
    model, criterion, post = build_detr(cfg)
    if isinstance(raw.get("qat"), dict):  # a ``detr-ptq qat`` result: rebuild its quantizers first
        from detr_ptq.qat.quantize import quantize_like

        quantize_like(model, raw["qat"], cfg.name)
        if verbose:
            print(f"checkpoint {path}: quantization-aware trained ({raw['qat']['policy']['created_by']['method']})")
    load_state_strict(model, state, f"checkpoint {str(path)!r}")
    return model, criterion, post, cfg, raw


def save_detr(path: str | Path, model: nn.Module, cfg: DETRConfig, **extra) -> Path:
    """Atomic ``{"model": fp32 state dict, "config": dict, **extra}``."""
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    return atomic_torch_save({"model": state, "config": dataclasses.asdict(cfg), **extra}, path)

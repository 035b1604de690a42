"""Load a local checkpoint into a model, with errors that name the file and list every mismatch at once; weights
that are not finite (NaN, inf) are refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.paths import expand_path


def _torch_load(path: Path) -> object:
    """``weights_only=True`` first (safe); fall back to full unpickling only for files that need it (the CIFAR
    ResNet ``.th`` files did in older torch). Anything that is not a torch file becomes a ``UserError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise UserError(f"weights file {str(path)!r} is not a readable PyTorch checkpoint ({e})") from None
    except Exception as e:  # noqa: BLE001 - garbage bytes fail in many ways (IndexError, EOFError, zip errors)
        raise UserError(f"weights file {str(path)!r} is not a readable PyTorch checkpoint "
                        f"({type(e).__name__}: {e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt/foreign file
        raise UserError(f"weights file {str(path)!r} is not a readable PyTorch checkpoint ({e})") from None


def extract_state_dict(obj: object, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one under ``"state_dict"`` / ``"model"``; strip a ``module.`` prefix."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"weights file {str(path)!r} holds no state dict: expected a mapping of parameter names to tensors, "
            "bare or under the key 'state_dict' or 'model'"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_finite_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict holding NaN or inf in any floating tensor: such a model evaluates to garbage (or to a
    plausible-looking accuracy) without a word. The error names the tensors and how many values are bad."""
    bad = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            n = int((~torch.isfinite(v)).sum())
            if n:
                bad.append(f"{k} ({n} of {v.numel()} values)")
    if bad:
        shown = bad[:10] + ([f"... {len(bad) - 10} more"] if len(bad) > 10 else [])
        raise UserError(f"{source} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                        f"{', '.join(shown)}; the training that wrote it diverged: use an earlier checkpoint")


def stored_policy(path: str | Path) -> dict | None:
    """The policy a checkpoint stores (``gmpq finetune``'s ``model_final.pt`` and ``checkpoint.pt`` do), or None."""
    path = expand_path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist")
    obj = _torch_load(path)
    policy = obj.get("policy") if isinstance(obj, dict) else None
    return policy if isinstance(policy, dict) else None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load ``path`` into ``model`` in place.

    strict=True: any missing key, unexpected key or shape mismatch raises one ``UserError`` listing all of them,
    grouped. strict=False: loads the tensors whose name and shape match and returns what was skipped, as
    ``{"missing": [...], "unexpected": [...], "shape_mismatch": [...]}`` (e.g. a new classifier head).
    """
    path = expand_path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist")
    state = extract_state_dict(_torch_load(path), path)
    check_finite_state(state, f"weights file {str(path)!r}")
    own = model.state_dict()
    # BN step counters are bookkeeping, not weights; checkpoints from older torch (the CIFAR ResNets) lack them
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    report = {"missing": missing, "unexpected": unexpected, "shape_mismatch": mismatched}
    if strict and (missing or unexpected or mismatched):
        lines = [f"weights file {str(path)!r} does not match the model {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise UserError("\n".join(lines))
    skip = {k.split(":")[0] for k in mismatched} | set(unexpected)
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
    return report


def checkpoint_config(path: str | Path) -> dict:
    """The ``config`` a training stage stored in its checkpoint (``{}`` for a bare state dict or a foreign file)."""
    obj = _torch_load(expand_path(path))
    config = obj.get("config", {}) if isinstance(obj, dict) else {}
    return config if isinstance(config, dict) else {}


"""Name the module that breaks double backward, so a loss that is not twice differentiable fails clearly.

Autograd's own error ("trying to differentiate twice a function that was marked with @once_differentiable",
"derivative for ... is not implemented") does not say which layer of the model is at fault. On such an error
we re-run one forward pass with hooks that record each leaf module's inputs, then try a local double backward
through each module in forward order; the first module where it fails is reported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gmpq.errors import UserError


def _float_tensors(obj) -> list[Tensor]:
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _float_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _float_tensors(o)]
    return []


def _leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}


def _first_grads(module: nn.Module, pdict: dict[str, Tensor], args: tuple, kwargs: dict,
                 rs: list[Tensor] | None = None) -> tuple[tuple, list[Tensor], list[Tensor]]:
    """-> (gradients of ``sum(r * outputs)`` w.r.t. the float positional inputs and the module's own parameters,
    taken with ``create_graph=True``; the output weights ``r`` (drawn when ``rs`` is None); the variables)."""
    from torch.func import functional_call

    wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad] + list(pdict.values())
    args = tuple(a.clone() if torch.is_tensor(a) and a.requires_grad else a for a in args)  # in-place ops (ReLU)
    outs = [o for o in _float_tensors(functional_call(module, pdict, args, kwargs)) if o.requires_grad]
    if not outs or not wrt:
        return (), [], wrt
    rs = rs if rs is not None else [torch.randn_like(o) for o in outs]
    total = sum((o * r).sum() for o, r in zip(outs, rs))
    return torch.autograd.grad(total, wrt, create_graph=True, allow_unused=True), rs, wrt


def _double(obj, noise: float = 0.0):
    """Float tensors -> float64 leaves requiring grad (optionally moved by ``noise`` x their std)."""
    if torch.is_tensor(obj) and obj.is_floating_point():
        x = obj.detach().double()
        if noise:
            x = x + noise * x.std().clamp_min(1e-3) * torch.randn_like(x) if x.numel() > 1 else x
        return x.requires_grad_(True)
    if isinstance(obj, tuple):
        return tuple(_double(o, noise) for o in obj)
    return obj


def _fails_double_backward(module: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why a local double backward through ``module`` at the recorded inputs fails, or None.

    Two failure modes: autograd raises on the second backward; or a first-order gradient carries no graph
    although it changes when the inputs and parameters move slightly (a backward computed outside autograd, e.g.
    ``@once_differentiable``), which would silently drop Hessian terms. Piecewise-linear ops (ReLU, max-pool)
    also return graph-free gradients, but a 1e-6 relative move changes almost none of their entries, so a
    module is flagged only when more than 1% of a gradient's entries change (checked in float64).
    """
    m = copy.deepcopy(module).double()
    kwargs = {k: (v.detach().double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kwargs.items()}
    params = {n: _double(p) for n, p in m.named_parameters(recurse=False)}
    try:
        with torch.enable_grad():
            grads, rs, wrt = _first_grads(m, params, _double(args), kwargs)
            live = [g for g in grads if g is not None and g.requires_grad]
            if live:
                torch.autograd.grad(sum((g * torch.randn_like(g)).sum() for g in live), wrt, allow_unused=True)
            dead = [i for i, g in enumerate(grads) if g is not None and not g.requires_grad]
            if dead:
                moved = {n: _double(p, 1e-6) for n, p in params.items()}
                grads2, _, _ = _first_grads(m, moved, _double(args, 1e-6), kwargs, rs)
                for i in dead:
                    scale = grads[i].abs().max().clamp_min(1e-30)
                    changed = ((grads2[i] - grads[i]).abs() > 1e-10 * scale).double().mean()
                    if changed > 0.01:
                        return "its gradient carries no autograd graph although it depends on its inputs"
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def locate_non_twice_differentiable(model: nn.Module, run_forward: Callable[[], object]) -> tuple[str, str, str] | None:
    """-> (module name, module type, autograd's message) of the first leaf module of ``model`` that cannot be
    differentiated twice, or None. ``run_forward()`` runs the model once (e.g. on one calibration batch)."""
    leaves = _leaf_modules(model)
    recorded: dict[str, tuple[tuple, dict]] = {}

    def hook(name: str):
        def record(mod, args, kwargs):
            recorded.setdefault(name, (args, kwargs))
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in leaves.items()]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    for name, (args, kwargs) in recorded.items():  # dict order = first-call order = forward order
        err = _fails_double_backward(leaves[name], args, kwargs)
        if err is not None:
            return name, type(leaves[name]).__name__, err
    return None


def raise_not_twice_differentiable(model: nn.Module, run_forward: Callable[[], object], error: RuntimeError,
                                   what: str) -> None:
    """Turn an autograd double-backward error into a ``UserError`` naming the module (always raises)."""
    found = locate_non_twice_differentiable(model, run_forward)
    where = (f"module {found[0]!r} ({found[1]}) cannot be differentiated twice: {found[2]}" if found
             else f"autograd: {str(error).splitlines()[0]}")
    raise UserError(f"the {what} is not twice differentiable, so its Hessian cannot be estimated; {where}. "
                    f"Use modules whose backward is itself differentiable (no @once_differentiable functions or "
                    f"fused kernels without double backward)") from error

"""Build the GMPQ hypernet from any model: each searchable ``Conv2d`` (and optionally ``Linear``) becomes a mixed
layer (``gmpq.search.mixed``); everything else (BN, pooling, the first conv and the classifier by default) is kept.

Parameter names do not change (the mixed layer shares the float layer's ``weight``/``bias``), so a float checkpoint
loads into the hypernet with ``strict=False`` (only the new ``alpha_*`` and PACT parameters are extra) and the
exported policy names the model's own layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from gmpq.errors import UserError
from gmpq.quant import functional as QF
from gmpq.quant.calibrate import calibrate
from gmpq.quant.modules import quantizable_layers
from gmpq.search.mixed import DEFAULT_IMPL, MixedConv2d, MixedLinear, check_candidates, is_mixed

ARCH_PARAM_NAMES = ("alpha_w", "alpha_a")


def searchable_layers(model: nn.Module, exclude: Sequence[str] = (), include_linear: bool = False
                      ) -> dict[str, nn.Module]:
    """The quantizable layers the search decides (exact ``nn.Conv2d``, and ``nn.Linear`` if asked), minus
    ``exclude``. Unknown names in ``exclude`` raise a ``UserError`` listing the quantizable layers."""
    qlayers = quantizable_layers(model)
    unknown = [n for n in exclude if n and n not in qlayers]
    if unknown:
        raise UserError(f"layers to keep in full precision {unknown} are not quantizable layers of the model; "
                        f"quantizable layers: {list(qlayers)}")
    types = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    return {n: m for n, m in qlayers.items() if n not in exclude and type(m) in types}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_hypernet(model: nn.Module, w_bits: Sequence[int], a_bits: Sequence[int], exclude: Sequence[str] = (),
                   include_linear: bool = False, impl: str = DEFAULT_IMPL) -> nn.Module:
    """Replace every searchable layer of ``model`` by a mixed layer (in place; returns ``model``).

    ``impl``: how the mixed layers compute their mixtures (``gmpq.search.mixed.IMPLS``): ``"fused"`` (one pass, only
    the float operand kept for the backward) or ``"reference"`` (the explicit sum of quantized copies). Same values.
    """
    w_bits, a_bits = check_candidates(w_bits, "w_bits"), check_candidates(a_bits, "a_bits")
    layers = searchable_layers(model, exclude, include_linear)
    if not layers:
        raise UserError("the model has no searchable layer (all Conv2d/Linear layers are excluded)")
    for name, layer in layers.items():
        cls = MixedConv2d if isinstance(layer, nn.Conv2d) else MixedLinear
        _set_submodule(model, name, cls.from_float(layer, w_bits, a_bits, impl))
    for name, m in model.named_modules():  # name the PACT quantizers for calibration error messages
        if is_mixed(m):
            for j, q in enumerate(m.a_quants):
                q.name = f"{name}.a_quants.{j}"
    return model


def mixed_layers(model: nn.Module) -> dict[str, MixedConv2d | MixedLinear]:
    """The mixed layers by dotted name, in ``named_modules`` order (works through DDP-style wrappers)."""
    return {n: m for n, m in model.named_modules() if is_mixed(m)}


def is_arch_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ARCH_PARAM_NAMES


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The importance logits (``alpha_w``, ``alpha_a`` of every mixed layer)."""
    return [p for n, p in model.named_parameters() if is_arch_param(n)]


def expected_bits(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (E[q_w], E[q_a])}`` scalars, differentiable w.r.t. the importance logits."""
    return {n: (m.expected_w_bits(), m.expected_a_bits()) for n, m in mixed_layers(model).items()}


def argmax_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (w_bits, a_bits)}`` with the most probable candidate of each layer."""
    return {n: m.argmax_bits() for n, m in mixed_layers(model).items()}


@torch.no_grad()
def calibrate_hypernet(model: nn.Module, batches: Iterable, num_batches: int = 4, signed: str = "auto",
                       device: torch.device | str | None = None) -> None:
    """Initialise every PACT quantizer of the hypernet from a few batches (``gmpq.quant.calibrate``).

    ``signed``: ``"auto"`` makes a layer's input quantizer signed when any calibration input was negative (e.g. the
    residual stream of MobileNetV2, or the normalised image); ``"signed"``/``"unsigned"`` force one choice.
    """
    if signed not in ("auto", "signed", "unsigned"):
        raise UserError(f"hypernet.signed_acts={signed!r} is not accepted; accepted values: "
                        "['auto', 'signed', 'unsigned']")
    calibrate(model, batches, num_batches=num_batches, device=device)
    if signed != "auto":
        for m in mixed_layers(model).values():
            for q in m.a_quants:
                q.set_flag("signed", signed == "signed")


def full_precision_entry() -> dict:
    return {"w_bits": QF.FULL_PRECISION, "a_bits": None}


@torch.no_grad()
def refit_weight_steps(model: nn.Module) -> None:
    """Refit every mixed layer's MSE-optimal weight steps to the current weights (e.g. at each epoch start)."""
    for m in mixed_layers(model).values():
        m.fit_weight_steps()

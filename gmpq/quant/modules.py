"""Quantized layers and the swap of layers by dotted name.

``QConv2d`` / ``QLinear`` subclass the float layers and keep the SAME ``weight``/``bias`` Parameters (the swap
shares them), so parameter names are unchanged and float checkpoints still load. They add two submodules:
``w_quant`` (weight quantizer) and ``a_quant`` (input-activation quantizer). Other packages register their own
quantizable types (e.g. DETR attention) with ``register_quantizable``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor, nn

from gmpq.errors import UserError
from gmpq.quant import functional as F
from gmpq.quant.quantizers import ACT_METHODS, WEIGHT_METHODS, ActQuantizer, WeightQuantizer, check_method


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized. ``a_bits=None`` (or 32) leaves its input in full precision.

    ``extra`` carries type-specific settings (e.g. ``{"attn_bits": 8}`` for attention layers).
    """

    w_bits: int = F.FULL_PRECISION
    a_bits: int | None = None
    w_method: str = "symmetric"
    a_method: str = "pact"
    per_channel: bool = True
    extra: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        F.check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            F.check_bits(self.a_bits, "a_bits")
        check_method(self.w_method, WEIGHT_METHODS, "w_method")
        check_method(self.a_method, ACT_METHODS, "a_method")

    @property
    def is_full_precision(self) -> bool:
        return self.w_bits == F.FULL_PRECISION and self.a_bits in (None, F.FULL_PRECISION)

    def get(self, key: str, default=None):
        return dict(self.extra).get(key, default)


def make_quantizers(layer: nn.Module, spec: LayerSpec, out_channels: int) -> None:
    """Attach ``w_quant`` and ``a_quant`` to ``layer`` according to ``spec``."""
    layer.spec = spec
    layer.w_quant = WeightQuantizer(spec.w_bits, spec.w_method, spec.per_channel, out_channels)
    layer.a_quant = ActQuantizer(spec.a_bits or F.FULL_PRECISION, spec.a_method)
    layer.w_quant.init_mse(layer.weight) if spec.get("w_init") == "mse" else layer.w_quant.init_from(layer.weight)


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input. Shapes as ``nn.Conv2d``: ``[N, C_in, H, W]``."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerSpec) -> QConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias  # share, do not copy: names and storage unchanged
        q.train(conv.training)
        make_quantizers(q, spec, conv.out_channels)
        return q.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.a_quant(x), self.w_quant(self.weight), self.bias)


class QLinear(nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input. Input ``[..., in_features]``."""

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerSpec) -> QLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        make_quantizers(q, spec, linear.out_features)
        return q.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.a_quant(x), self.w_quant(self.weight), self.bias)


# Exact-type registry: a subclass with a different forward (e.g. timm's Conv2dSame) must not be swapped silently.
_QUANTIZABLE: dict[type, Callable[[nn.Module, LayerSpec], nn.Module]] = {
    nn.Conv2d: QConv2d.from_float,
    nn.Linear: QLinear.from_float,
    nn.modules.linear.NonDynamicallyQuantizableLinear: QLinear.from_float,
    QConv2d: QConv2d.from_float,
    QLinear: QLinear.from_float,
}


def register_quantizable(float_cls: type, factory: Callable[[nn.Module, LayerSpec], nn.Module],
                         quant_cls: type | None = None) -> None:
    """Make ``float_cls`` quantizable: ``factory(module, spec)`` returns its quantized replacement.

    Register ``quant_cls`` too (the type the factory returns) so an already-quantized model can be re-quantized.
    """
    _QUANTIZABLE[float_cls] = factory
    if quant_cls is not None:
        _QUANTIZABLE[quant_cls] = factory


def is_quantizable(module: nn.Module) -> bool:
    return type(module) in _QUANTIZABLE


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable layer by dotted name, in ``named_modules`` order (nested quantizers excluded)."""
    return {name: m for name, m in model.named_modules() if name and is_quantizable(m)}


def is_quantized(module: nn.Module) -> bool:
    return isinstance(getattr(module, "w_quant", None), WeightQuantizer)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_layers(model: nn.Module, specs: dict[str, LayerSpec]) -> nn.Module:
    """Replace each named layer by its quantized version (in place; returns ``model``).

    Raises ``UserError`` listing every unknown name and every non-quantizable target at once.
    """
    modules = dict(model.named_modules())
    unknown = sorted(n for n in specs if n not in modules or not n)
    wrong = sorted(f"{n} ({type(modules[n]).__name__})" for n in specs if n in modules and n
                   and not is_quantizable(modules[n]))
    if unknown or wrong:
        parts = []
        if unknown:
            parts.append(f"unknown module names: {unknown}")
        if wrong:
            parts.append(f"not quantizable (accepted types: {sorted(t.__name__ for t in _QUANTIZABLE)}): {wrong}")
        raise UserError("cannot quantize: " + "; ".join(parts))
    for name, spec in specs.items():
        layer = modules[name]
        _set_submodule(model, name, _QUANTIZABLE[type(layer)](layer, spec))
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            m.name = name
    return model


def quantizers(model: nn.Module, kind: type = nn.Module) -> dict[str, nn.Module]:
    """All ``WeightQuantizer``/``ActQuantizer`` submodules (filter with ``kind``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (WeightQuantizer, ActQuantizer)) and isinstance(m, kind)}


class quantizers_disabled:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager: every quantizer in ``model`` passes its input through unchanged (e.g. to count MACs)."""

    def __init__(self, model: nn.Module):
        self.qs = list(quantizers(model).values())

    def __enter__(self):
        self.saved = [q.enabled for q in self.qs]
        for q in self.qs:
            q.enabled = False
        return self

    def __exit__(self, *exc):
        for q, e in zip(self.qs, self.saved):
            q.enabled = e
        return False


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    """The spec of every quantized layer of ``model``."""
    return {n: m.spec for n, m in model.named_modules() if is_quantized(m) and hasattr(m, "spec")}


def count_quantized(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_quantized(m))


__all__ = [
    "LayerSpec", "QConv2d", "QLinear", "register_quantizable", "is_quantizable", "quantizable_layers",
    "swap_layers", "quantizers", "quantizers_disabled", "layer_specs", "is_quantized",
]

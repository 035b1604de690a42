"""Model registry: ``@register_model(name, spec)`` on a builder ``fn(num_classes) -> nn.Module``.

    model = create_model("resnet20", weights="${GMPQ_DATA}/cifar_resnets/resnet20-12fca82f.th")
    spec = model_spec("resnet20")   # input size, normalization, first conv / classifier / Grad-CAM layer

Unknown names raise a ``UserError`` listing every registered name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from gmpq.errors import UserError

Builder = Callable[[int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of gmpq needs to know about a registered model.

    ``input_size`` is (C, H, W) in pixels, used for MAC counting. ``mean``/``std`` are the per-channel
    normalization (on [0, 1] pixels) that the weights expect. ``first_layer`` / ``classifier`` are module names
    of the first conv and the final Linear; ``feature_layer`` is the module whose output is the last
    convolutional feature map [B, C, h, w] (the default Grad-CAM layer). ``head == "gap_linear"`` when the
    logits are ``classifier(global_avg_pool(feature_layer output))``, which gives a closed-form CAM.
    """

    name: str
    input_size: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    first_layer: str
    classifier: str
    feature_layer: str
    head: str = "gap_linear"

    def __post_init__(self) -> None:
        if self.head not in ("gap_linear", "other"):
            raise ValueError(f"ModelSpec {self.name!r}: head={self.head!r}, expected 'gap_linear' or 'other'")
        if not (len(self.mean) == len(self.std) == self.input_size[0]):
            raise ValueError(f"ModelSpec {self.name!r}: mean/std need one value per input channel")


_REGISTRY: dict[str, tuple[ModelSpec, Builder]] = {}


def register_model(name: str, spec: ModelSpec) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes) -> nn.Module`` under ``name``."""
    if spec.name != name:
        raise ValueError(f"register_model({name!r}): spec.name is {spec.name!r}")

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = (spec, builder)
        return builder

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[ModelSpec, Builder]:
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_spec(name: str) -> ModelSpec:
    return _lookup(name)[0]


def create_model(name: str, num_classes: int | None = None, weights: str | Path | None = None) -> nn.Module:
    """Build a registered model with random init (never downloads), then load ``weights`` strictly if given.

    ``num_classes`` defaults to the spec's; ``weights`` may use ``${GMPQ_DATA}``.
    """
    from gmpq.models.weights import load_weights  # local import: weights.py has no registry dependency

    spec, builder = _lookup(name)
    n = spec.num_classes if num_classes is None else int(num_classes)
    if n < 1:
        raise UserError(f"create_model({name!r}): num_classes={num_classes!r}, expected a positive integer")
    model = builder(n)
    if weights is not None:
        load_weights(model, weights, strict=True)
    return model

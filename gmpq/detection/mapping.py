"""From classification-network names to detector names: a policy searched on ``resnet18`` / ``vgg16`` /
``mobilenetv2`` (or their weights) applied to the backbone of Faster R-CNN / SSD300 / SSDLite.

Name rules (pure functions; ``None`` means "dropped: the detector has no such layer"):

===================  ==========================================  ==============================================
source (gmpq model)  source name                                 detector name
===================  ==========================================  ==============================================
resnet18 (timm)      ``conv1``, ``bn1``, ``layer{1-4}.*``         ``backbone.body.<same>`` (Faster R-CNN FPN)
resnet18             ``fc``, ``global_pool``                      dropped
vgg16 (torchvision)  ``features.N.*``, N <= 22 (conv1_1..conv4_3)  ``backbone.features.N.*`` (SSD300)
vgg16                ``features.N.*``, 23 <= N <= 29 (pool4,       ``backbone.extra.0.<N - 23>.*``, i.e. conv5_1..3
                     conv5_1..conv5_3)                            = ``features.24/26/28`` -> ``extra.0.1/3/5``
vgg16                ``features.30`` (pool5), ``classifier.*``    dropped (SSD has its own pool5, fc6 and fc7)
mobilenetv2          ``features.N.*``                            ``backbone.features.N.*`` (SSDLite)
(torchvision, TF                                                 ``backbone.body.N.*`` (Faster R-CNN FPN)
'SAME' padding)      ``classifier.*``                            dropped
===================  ==========================================  ==============================================

The rules work on module names and on state-dict keys alike (a key is a module name plus ``.param``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant import FULL_PRECISION, make_policy, quantizable_layers, resolve_policy

RESNET_STEMS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
SSD_POOL4 = 23  # index of VGG-16's 4th max-pool: SSD's backbone.features stops before it, backbone.extra.0 starts
VGG_POOL5 = 30


def resnet18_to_fasterrcnn(name: str) -> str | None:
    head = name.split(".")[0]
    if head in ("fc", "global_pool"):
        return None
    if head in RESNET_STEMS:
        return f"backbone.body.{name}"
    raise KeyError(name)


def vgg16_to_ssd(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "classifier" or parts[0] == "avgpool":
        return None
    if parts[0] != "features" or len(parts) < 2 or not parts[1].isdigit():
        raise KeyError(name)
    i, rest = int(parts[1]), parts[2:]
    if i < SSD_POOL4:
        return ".".join(["backbone", "features", str(i), *rest])
    if i < VGG_POOL5:
        return ".".join(["backbone", "extra", "0", str(i - SSD_POOL4), *rest])
    if i == VGG_POOL5:
        return None
    raise KeyError(name)


def _mobilenetv2_rule(prefix: str) -> Callable[[str], str | None]:
    """``features.N.rest`` -> ``<prefix>N.rest``; the classifier is dropped."""

    def rule(name: str) -> str | None:
        parts = name.split(".")
        if parts[0] == "classifier":
            return None
        if parts[0] != "features" or len(parts) < 2 or not parts[1].isdigit():
            raise KeyError(name)
        return prefix + ".".join(parts[1:])

    return rule


mobilenetv2_to_ssdlite = _mobilenetv2_rule("backbone.features.")
mobilenetv2_to_fasterrcnn = _mobilenetv2_rule("backbone.body.")

# detector name -> (source gmpq model, name rule)
RULES: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "fasterrcnn_resnet18_fpn": ("resnet18", resnet18_to_fasterrcnn),
    "ssd300_vgg16": ("vgg16", vgg16_to_ssd),
    "ssdlite_mobilenet_v2": ("mobilenetv2", mobilenetv2_to_ssdlite),
    "fasterrcnn_mobilenet_v2_fpn": ("mobilenetv2", mobilenetv2_to_fasterrcnn),
}


def _rule(detector: str) -> tuple[str, Callable[[str], str | None]]:
    if detector not in RULES:
        raise UserError(f"unknown detector {detector!r}; accepted detectors: {sorted(RULES)}")
    return RULES[detector]


def source_model(detector: str) -> str:
    """The classification network whose policies and weights map onto ``detector``'s backbone."""
    return _rule(detector)[0]


def map_name(detector: str, name: str) -> str | None:
    """Detector name of the source layer/key ``name``; ``None`` if the detector drops it (the classifier)."""
    try:
        return _rule(detector)[1](name)
    except KeyError:
        raise UserError(f"{name!r} is not a layer of {source_model(detector)!r} that maps onto {detector!r}") from None


def source_network(detector: str) -> nn.Module:
    """The source classification network, built on the meta device (no memory, no init): names only."""
    from gmpq.models import create_model

    with torch.device("meta"):
        return create_model(source_model(detector))


def map_policy(policy: dict, detector: str, model: nn.Module, rest_w_bits: int = FULL_PRECISION,
               rest_a_bits: int | None = None, source: str = "policy") -> dict:
    """Turn a policy of the source network into a policy of ``model`` (the detector, float, named as torchvision).

    Every quantizable layer of the source network must be covered (or the policy has a ``default``); the classifier
    is dropped. Detector layers without a source layer (FPN, RPN, ROI heads, SSD extra layers and heads) get
    ``rest_w_bits``/``rest_a_bits`` (full precision by default). One ``UserError`` lists every name that does not fit.
    """
    src_name, _ = _rule(detector)
    entries = resolve_policy(policy, source_network(detector), source, model_name=src_name)
    det_layers = quantizable_layers(model)
    layers, dropped, problems = {}, [], []
    for name, entry in entries.items():
        target = map_name(detector, name)
        if target is None:
            dropped.append(name)
        elif target not in det_layers:
            problems.append(f"{name} -> {target}")
        else:
            layers[target] = dict(entry, source_layer=name)
    if problems:
        raise UserError(f"{source} does not fit the backbone of {detector!r}: these layers map to names that are not "
                        f"quantizable layers of the detector: {problems}")
    rest = {"w_bits": rest_w_bits, "a_bits": rest_a_bits}
    for name in det_layers:
        layers.setdefault(name, dict(rest))
    summary = {"mapped_layers": len(entries) - len(dropped), "dropped_layers": dropped,
               "rest_layers": len(det_layers) - (len(entries) - len(dropped)), "rest_bits": rest}
    return make_policy(detector, layers, policy["created_by"].get("method", "unknown"), summary,
                       mapped_from=src_name, source_policy=policy.get("summary", {}))


def map_state_dict(detector: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a source-network state dict to detector keys. -> (mapped, dropped keys). Quantizer state
    (``*.w_quant.*``/``*.a_quant.*`` of a fine-tuned quantized classifier) is dropped: the detector is calibrated
    afresh. Keys that belong to no layer of the source network raise one ``UserError`` listing them."""
    mapped, dropped, unknown = {}, [], []
    for key, value in state.items():
        if ".w_quant." in key or ".a_quant." in key:
            dropped.append(key)
            continue
        try:
            target = _rule(detector)[1](key)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            dropped.append(key)
        else:
            mapped[target] = value
    if unknown:
        raise UserError(f"{len(unknown)} weight(s) are not parameters of {source_model(detector)!r} and cannot map "
                        f"onto {detector!r}: {unknown[:20]}")
    return mapped, dropped

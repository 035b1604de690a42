"""Turn a float DETR into the Q-DETR student through ``gmpq.quant``: the policy (from a file or the uniform
settings), LSQ weights (learnable per-output-channel step), LSQ+ activations (learnable step and offset) at the
input of every quantized convolution/linear, quantized q/k/softmax/v in attention, optional query embeddings and
distribution alignment; then the explicit calibration pass.

Layer parts (``layer_part``): ``first_conv`` (the backbone's stem convolution), ``backbone``, ``input_proj``,
``encoder``, ``decoder_attn`` (self- and cross-attention with their output projections), ``decoder_mlp`` (the
decoder feed-forward linears), ``head`` (``class_embed``, ``bbox_embed``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

import detr_ptq.models.qattention  # noqa: F401  (registers the attention with gmpq.quant)
from detr_ptq.models.attention import MultiheadAttention
from detr_ptq.qat.config import QATConfig
from gmpq.errors import UserError
from gmpq.quant.calibrate import calibrate
from gmpq.quant.functional import ALLOWED_BITS, FULL_PRECISION
from gmpq.quant.modules import quantizable_layers, quantizers
from gmpq.quant.policy import apply_policy, check_schema, load_policy, make_policy, resolve_policy
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer

_PART_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("first_conv", re.compile(r"backbone\.0\.body\.conv1$")),
    ("backbone", re.compile(r"backbone\.")),
    ("input_proj", re.compile(r"input_proj$")),
    ("encoder", re.compile(r"transformer\.encoder\.")),
    ("decoder_attn", re.compile(r"transformer\.decoder\.layers\.\d+\.(self_attn|multihead_attn)")),
    ("decoder_mlp", re.compile(r"transformer\.decoder\.layers\.\d+\.linear\d")),
    ("head", re.compile(r"(class_embed|bbox_embed)")),
)


# Parts whose layers see sequence-first activations (transformer ``[L, B, E]``, heads ``[layers, B, Q, E]``):
# their input quantizers have batch dimension 1 (LSQ's gradient scale counts the values of one image).
SEQUENCE_FIRST_PARTS = ("encoder", "decoder_attn", "decoder_mlp", "head")


def attention_bits(cfg: QATConfig) -> int:
    """Bits of the attention operands (q, k, softmax map, v): ``attn_bits``, or the activation bits when 0."""
    return cfg.attn_bits or cfg.a_bits


def layer_part(name: str) -> str:
    """The part of a DETR a quantizable layer belongs to (see the module docstring)."""
    for part, pattern in _PART_RULES:
        if pattern.match(name):
            return part
    raise UserError(f"layer {name!r} is not in any DETR part; known parts: {[p for p, _ in _PART_RULES]}")


def _entry(w: int, a: int | None, part: str, attn: int | None = None) -> dict:
    if w == FULL_PRECISION:
        return {"w_bits": FULL_PRECISION, "a_bits": None, "part": part}
    entry = {"w_bits": w, "a_bits": None if a == FULL_PRECISION else a, "part": part}
    if attn is not None:
        entry["attn_bits"] = None if attn == FULL_PRECISION else attn
    return entry


def uniform_qat_policy(model: nn.Module, model_name: str, cfg: QATConfig) -> dict:
    """The policy of the uniform settings: ``cfg.quantize`` parts at ``w_bits``/``a_bits`` (attention operands at
    ``attn_bits``), the first convolution at ``first_conv_bits`` with the backbone, the input projection at
    ``input_proj_bits`` with the encoder, the heads at ``head_bits``; everything else full precision."""
    layers = {}
    for name, module in quantizable_layers(model).items():
        part = layer_part(name)
        attn = attention_bits(cfg) if isinstance(module, MultiheadAttention) else None
        if part == "first_conv":
            bits = cfg.first_conv_bits if "backbone" in cfg.quantize else FULL_PRECISION
            layers[name] = _entry(bits, bits, part)
        elif part == "input_proj":
            bits = cfg.input_proj_bits or cfg.w_bits
            a = cfg.input_proj_bits or cfg.a_bits
            layers[name] = _entry(bits if "encoder" in cfg.quantize else FULL_PRECISION, a, part)
        elif part == "head":
            layers[name] = _entry(cfg.head_bits, cfg.head_bits, part)
        elif part in cfg.quantize:
            layers[name] = _entry(cfg.w_bits, cfg.a_bits, part, attn)
        else:
            layers[name] = _entry(FULL_PRECISION, None, part)
    return make_policy(model_name, layers, "uniform-qat", w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                       attn_bits=attention_bits(cfg), quantize=list(cfg.quantize), first_conv_bits=cfg.first_conv_bits,
                       head_bits=cfg.head_bits)


def policy_from_file(path: str, model: nn.Module, model_name: str, cfg: QATConfig) -> dict:
    """Read a policy, check it against the model and fill null activation / attention bits when asked
    (``fill_a_bits``, ``fill_attn_bits``): a weight-only Hessian-ILP policy can seed W/A QAT."""
    source = f"policy file {path!r}"
    policy = load_policy(path)
    resolved = resolve_policy(policy, model, source, model_name)
    attention = {n for n, m in quantizable_layers(model).items() if isinstance(m, MultiheadAttention)}
    layers = {}
    for name, entry in resolved.items():
        entry = dict(entry)
        if entry["w_bits"] < FULL_PRECISION and entry.get("a_bits") is None and cfg.fill_a_bits:
            entry["a_bits"] = cfg.fill_a_bits
        if name in attention and entry["w_bits"] < FULL_PRECISION and entry.get("attn_bits") is None \
                and cfg.fill_attn_bits:
            entry["attn_bits"] = cfg.fill_attn_bits
        layers[name] = entry
    out = dict(policy, layers=layers)
    out.pop("default", None)
    check_schema(out, source)
    check_attention_bits(out, attention, source)
    return out


def check_attention_bits(policy: dict, attention: set[str], source: str) -> None:
    """Refuse ``attn_bits`` the QAT quantizers cannot use: on a layer without attention operands, or outside
    LSQ+'s bit-widths; one ``UserError`` names every such layer, the field and the accepted values."""
    accepted = f"{list(ALLOWED_BITS)} or null (32/null = float operands)"
    problems = []
    for name, entry in policy["layers"].items():
        if "attn_bits" not in entry:
            continue
        bits = entry["attn_bits"]
        if name not in attention:
            problems.append(f"layers[{name!r}]: attn_bits={bits!r} is given to a layer without attention operands; "
                            f"only attention layers take attn_bits")
        elif bits is not None and (isinstance(bits, bool) or bits not in ALLOWED_BITS):
            problems.append(f"layers[{name!r}]: attn_bits={bits!r} is not accepted by the QAT quantizers (LSQ+); "
                            f"accepted values: {accepted}")
    if problems:
        raise UserError(f"{source}: attention bits the QAT quantizers cannot use:\n  - " + "\n  - ".join(problems))


class QueryQuantizer(nn.Module):
    """LSQ fake quantization of the query embeddings ``weight [Q, d]`` (one step per query)."""

    def __init__(self, bits: int, num_queries: int, per_channel: bool) -> None:
        super().__init__()
        self.quant = WeightQuantizer(bits, "lsq", per_channel, out_channels=num_queries)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quant(weight)


def build_student(model: nn.Module, policy: dict, cfg: QATConfig, model_name: str) -> nn.Module:
    """Quantize ``model`` in place: LSQ weights (per channel), LSQ+ activations, attention operands per the
    policy's ``attn_bits``, query embeddings at ``query_embed_bits``, alignment modules when ``cfg.align``.
    Weight steps are initialised from the weights (``cfg.w_init``); activations still need ``calibrate_student``.
    """
    apply_policy(model, policy, w_method="lsq", a_method="lsq+", per_channel=cfg.per_channel,
                 source="QAT policy", model_name=model_name)
    set_input_batch_dims(model)
    if cfg.query_embed_bits < FULL_PRECISION:
        model.query_quant = QueryQuantizer(cfg.query_embed_bits, model.num_queries, cfg.per_channel)
    if cfg.align:
        from detr_ptq.qat.align import install_query_align, is_decoder_cross_attention

        install_query_align(model, is_decoder_cross_attention, init=cfg.align_init)
    for q in quantizers(model, ActQuantizer).values():
        q.init = cfg.a_init  # used by the calibration pass
    init_weight_steps(model, cfg.w_init)
    return model


def set_input_batch_dims(model: nn.Module) -> int:
    """Give the input quantizer of every sequence-first Conv/Linear (``SEQUENCE_FIRST_PARTS``) batch dimension 1;
    attention inputs and operands get theirs from ``quantize_attention``. Returns how many were set."""
    n = 0
    for name, module in quantizable_layers(model).items():
        q = getattr(module, "a_quant", None)
        if isinstance(q, ActQuantizer) and layer_part(name) in SEQUENCE_FIRST_PARTS:
            q.batch_dim = 1
            n += 1
    return n


def _weight_sources(model: nn.Module) -> dict[str, tuple[WeightQuantizer, torch.Tensor]]:
    """``{quantizer name: (weight quantizer, the weight it quantizes)}``."""
    out = {}
    for name, module in model.named_modules():
        q = getattr(module, "w_quant", None)
        if isinstance(q, WeightQuantizer):
            w = module.in_proj_weight if isinstance(module, MultiheadAttention) else module.weight
            out[f"{name}.w_quant"] = (q, w)
    if isinstance(getattr(model, "query_quant", None), QueryQuantizer):
        out["query_quant.quant"] = (model.query_quant.quant, model.query_embed.weight)
    return out


@torch.no_grad()
def init_weight_steps(model: nn.Module, method: str, only: Callable[[str], bool] = lambda name: True) -> int:
    """(Re)initialise the LSQ weight steps from the current weights; returns how many were set."""
    n = 0
    for name, (q, w) in _weight_sources(model).items():
        if only(name):
            q.init_mse(w) if method == "mse" else q.init_from(w)
            n += 1
    return n


def detr_forward(device: torch.device | str) -> Callable[[nn.Module, tuple], dict]:
    """``forward(model, (images, mask, targets))`` for ``gmpq.quant.calibrate`` (DETR needs the padding mask)."""

    def run(model: nn.Module, batch: tuple) -> dict:
        images, mask = batch[0], batch[1]
        return model(images.to(device), mask.to(device))

    return run


def calibrate_student(model: nn.Module, batches: Iterable, num_batches: int, device: torch.device | str,
                      only: Iterable[str] | None = None) -> dict[str, dict]:
    """The explicit LSQ+ initialisation pass (activation steps/offsets from observed ranges, alignment
    statistics); ``only`` restricts it to these quantizer names."""
    if num_batches < 1:
        raise UserError("calib_batches must be >= 1 to calibrate the activation quantizers")
    return calibrate(model, batches, num_batches, device, forward=detr_forward(device),
                     only=set(only) if only is not None else None)


def quantizer_part(quantizer_name: str) -> str:
    """The part of the layer a quantizer belongs to (``query_embed`` for the query-embedding quantizer)."""
    layer = quantizer_name.rsplit(".", 1)[0]  # attention operands hang off the attention (``...self_attn.q_quant``)
    return "query_embed" if layer.startswith("query_quant") else layer_part(layer)


def set_parts_enabled(model: nn.Module, enabled: Callable[[str], bool]) -> list[str]:
    """Enable the quantizers whose layer ``enabled(layer_part)`` accepts, disable the rest (two-stage QAT);
    returns the names of the disabled quantizers."""
    disabled = []
    for name, q in quantizers(model).items():
        q.enabled = enabled(quantizer_part(name))
        if not q.enabled:
            disabled.append(name)
    return disabled



def quantize_like(model: nn.Module, qat_state: dict, model_name: str) -> nn.Module:
    """Rebuild the quantized structure a QAT ``final.pth`` was saved with (its ``qat`` entry), so its state dict
    loads strictly; steps, offsets and calibration flags then come from the checkpoint."""
    cfg = QATConfig(query_embed_bits=qat_state.get("query_embed_bits", FULL_PRECISION),
                    align=qat_state.get("align", False), per_channel=qat_state.get("per_channel", True),
                    w_init="lsq")
    return build_student(model, qat_state["policy"], cfg, model_name)

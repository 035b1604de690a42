"""``QATConfig``: every setting of ``detr-ptq qat`` (recipes supply values, ``--set key=value`` overrides).

Bits: a policy file (``policy``) or the uniform settings ``w_bits``/``a_bits``/``attn_bits`` (or the shorthand
``bits: "4-4-8"`` = weights-activations-attention). 32 means full precision. ``quantize`` lists the parts of the
network that are quantized (the module ablation); the special layers have their own bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gmpq.errors import UserError
from gmpq.quant.functional import ALLOWED_BITS

# The parts of a DETR a uniform QAT setting can quantize (Q-DETR's module ablation), in ablation order.
PARTS = ("backbone", "encoder", "decoder_attn", "decoder_mlp")


@dataclass
class QATConfig:
    checkpoint: str = "detr_ptq/assets/detr_tiny_digits.pth"  # the float model: student init (and teacher)
    teacher: str = ""  # the frozen full-precision teacher; "" = ``checkpoint``
    config: str = ""  # DETR preset name; "" = the config stored in the checkpoint
    data_format: Literal["coco", "voc"] = "coco"
    data_dir: str = "runs/digits"  # coco: annotations/instances_{split}.json + {split}/; voc: a VOC20XX folder
    train_split: str = "train"
    val_split: str = "val"
    out_dir: str = "runs/qat/detr_tiny_w4a4"
    # --- bits ----------------------------------------------------------------------------------------
    policy: str = ""  # a gmpq-policy/1 file (Hessian-ILP, GMPQ, hand-written); "" = uniform settings below
    bits: str = ""  # shorthand "W-A-ATTN", e.g. "4-4-8"; overrides w_bits, a_bits, attn_bits
    w_bits: int = 4
    a_bits: int = 4
    attn_bits: int = 8  # q, k, softmax map and v of every quantized attention
    quantize: list[str] = field(default_factory=lambda: list(PARTS))  # uniform setting: the parts quantized
    first_conv_bits: int = 8  # backbone.0.body.conv1 (weights and its input image), when the backbone is quantized
    input_proj_bits: int = 0  # the 1x1 input projection; 0 = w_bits/a_bits (quantized with the encoder)
    query_embed_bits: int = 32  # the learned query embeddings (weights)
    head_bits: int = 32  # class_embed and bbox_embed
    fill_a_bits: int = 0  # policy layers with weights < 32 bits and a_bits null get these bits (0 = keep float)
    fill_attn_bits: int = 0  # policy attention layers without attn_bits get these (0 = keep float)
    per_channel: bool = True  # LSQ weight steps per output channel
    w_init: Literal["mse", "lsq"] = "mse"  # weight step init: MSE-optimal step, or LSQ's 2 mean|w| / sqrt(Qp)
    a_init: Literal["mse", "minmax"] = "mse"  # LSQ+ init: least-MSE clipped range, or the observed min/max
    calib_batches: int = 4  # LSQ+ initialisation pass (0 = refuse to start unless resuming)
    # --- Q-DETR distillation ----------------------------------------------------------------------------
    align: bool = False  # distribution alignment of the decoder cross-attention queries
    fqm: bool = False  # foreground-aware query matching distillation from the teacher
    fqm_tau: float = 0.5
    distill_weight: float = 1.0  # lambda: total = set loss + lambda * distillation
    two_stage: bool = False  # stage 1: only the backbone quantized; stage 2: everything
    stage1_epochs: int = 1
    # --- optimisation ------------------------------------------------------------------------------------
    epochs: int = 2
    steps_per_epoch: int = 0  # 0 = the whole training split each epoch
    batch_size: int = 8
    lr: float = 1e-4  # AdamW (Q-DETR)
    weight_decay: float = 1e-4  # not applied to quantizer steps/offsets and alignment parameters
    clip_max_norm: float = 0.1
    lr_drop: int = 0  # epochs after which the lr drops 10x; 0 = constant lr
    freeze_bn: bool = True  # keep BatchNorm statistics of the float model (eval-mode BN while training)
    min_size: int = 0  # resize (pixels); 0 = the checkpoint's training resize (else 800/1333)
    max_size: int = 0
    eval_images: int = 0  # 0 = every image of the val split
    eval_float: bool = True  # also evaluate the float model once (the recovery ratio's denominator)
    seed: int = 42
    num_threads: int = 1
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.bits:
            parts = self.bits.split("-")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise UserError(f"bits={self.bits!r} must be 'W-A-ATTN', e.g. '4-4-8'")
            self.w_bits, self.a_bits, self.attn_bits = (int(p) for p in parts)
            self.bits = ""
        for name in ("w_bits", "a_bits", "attn_bits", "first_conv_bits", "head_bits", "query_embed_bits"):
            _check(name, getattr(self, name))
        for name in ("input_proj_bits", "fill_a_bits", "fill_attn_bits"):
            if getattr(self, name) != 0:
                _check(name, getattr(self, name))
        unknown = [p for p in self.quantize if p not in PARTS]
        if unknown:
            raise UserError(f"quantize={self.quantize}: unknown part(s) {unknown}; accepted: {list(PARTS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")
        if self.two_stage and not 0 < self.stage1_epochs < self.epochs:
            raise UserError(f"two_stage: stage1_epochs={self.stage1_epochs} must be in [1, epochs - 1 = "
                            f"{self.epochs - 1}]")
        if self.two_stage and self.calib_batches < 1:
            raise UserError("two_stage needs calib_batches >= 1 (stage 2 re-calibrates the newly quantized parts)")
        if not 0 < self.fqm_tau <= 1:
            raise UserError(f"fqm_tau={self.fqm_tau} must be in (0, 1]")


def _check(name: str, bits: int) -> None:
    if bits not in ALLOWED_BITS:
        raise UserError(f"{name}={bits} is not supported by the QAT quantizers (LSQ/LSQ+); accepted values: "
                        f"{list(ALLOWED_BITS)} (32 = full precision)")

"""``QATConfig``: every setting of ``detr-ptq qat`` (recipes supply values, ``--set key=value`` overrides).

Bits: a policy file (``policy``) or the uniform settings ``w_bits``/``a_bits``/``attn_bits`` (or the shorthand
``bits: 4`` = W4/A4 with 4-bit attention operands, ``"4-4-8"`` = weights-activations-attention). 32 means full
precision; ``attn_bits: 0`` (the default) gives the attention operands the activation bits, as Q-DETR Eq. 2.26.
``quantize`` lists the parts of the network that are quantized (the module ablation); the special layers have their
own bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gmpq.errors import UserError
from gmpq.quant.functional import ALLOWED_BITS
from gmpq.runtime.settings import RunConfig

# The parts of a DETR a uniform QAT setting can quantize (Q-DETR's module ablation), in ablation order.
PARTS = ("backbone", "encoder", "decoder_attn", "decoder_mlp")


@dataclass
class QATConfig(RunConfig):
    """The shared run settings (out_dir, epochs, seed, threads, device, grad_clip, milestones, gamma, warmup_iters,
    max_steps_per_epoch, eval_every, progress, tensorboard) come from ``RunConfig``, with QAT's defaults here."""

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
    bits: str | int = ""  # shorthand "W", "W-A" or "W-A-ATTN" (e.g. 4, "4-4-8"); overrides the bits it gives
    w_bits: int = 4
    a_bits: int = 4
    attn_bits: int = 0  # q, k, softmax map and v of every quantized attention; 0 = a_bits (8 = the 8-bit variant)
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
    align_init: Literal["identity", "standardize"] = "identity"  # gamma=sigma, beta=mu | gamma=1, beta=0 (BN start)
    fqm: bool = False  # foreground-aware query matching distillation from the teacher
    fqm_tau: float = 0.5
    distill_weight: float = 1.0  # lambda: total = set loss + lambda * distillation
    grad_probe_every: int = 0  # every N steps log grad_<term>: the gradient norm each weighted term sends to the
    # student's trainable parameters (one extra backward per term; 0 = off)
    two_stage: bool = False  # stage 1: only the backbone quantized; stage 2: everything
    stage1_epochs: int = 1
    # --- optimisation ------------------------------------------------------------------------------------
    epochs: int = 2
    batch_size: int = 8
    lr: float = 1e-4  # AdamW (Q-DETR)
    weight_decay: float = 1e-4  # not applied to quantizer steps/offsets and alignment parameters
    grad_clip: float | None = 0.1
    freeze_bn: bool = True  # keep BatchNorm statistics of the float model (eval-mode BN while training)
    min_size: int = 0  # resize (pixels); 0 = the checkpoint's training resize (else 800/1333)
    augment: bool = False  # DETR's training augmentation (flip, multi-scale resize, random crop) on the train split
    max_size: int = 0
    eval_images: int = 0  # 0 = every image of the val split
    eval_float: bool = True  # also evaluate the float model once (the recovery ratio's denominator)
    seed: int = 42
    threads: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits:
            parts = str(self.bits).split("-")
            if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
                raise UserError(f"bits={self.bits!r} must be 'W', 'W-A' or 'W-A-ATTN', e.g. 4 or '4-4-8'")
            names = ("w_bits", "a_bits", "attn_bits")[:len(parts)] if len(parts) > 1 else ("w_bits", "a_bits")
            for name, value in zip(names, parts * 2 if len(parts) == 1 else parts):
                setattr(self, name, int(value))
            self.bits = ""
        for name in ("w_bits", "a_bits", "first_conv_bits", "head_bits", "query_embed_bits"):
            _check(name, getattr(self, name))
        for name in ("attn_bits", "input_proj_bits", "fill_a_bits", "fill_attn_bits"):
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
        if self.grad_probe_every < 0:
            raise UserError(f"grad_probe_every={self.grad_probe_every} must be >= 0 (0 = off)")


def _check(name: str, bits: int) -> None:
    if bits not in ALLOWED_BITS:
        raise UserError(f"{name}={bits} is not supported by the QAT quantizers (LSQ/LSQ+); accepted values: "
                        f"{list(ALLOWED_BITS)} (32 = full precision)")

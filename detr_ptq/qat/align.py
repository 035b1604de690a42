"""Distribution alignment (DA) of Q-DETR (Xu et al., CVPR 2023, Eq. 2.32) for the decoder queries.

Q-DETR normalizes the projected queries of the decoder cross-attention before they are quantized, per head and
batch-norm style, with a learnable scale and shift: ``q' = (q - mu) / sqrt(var + eps) * gamma + beta``.
``QueryAlign`` is that module; ``install_query_align`` puts it in the ``q_norm`` hook of
``detr_ptq.models.attention.MultiheadAttention`` (applied to ``[B, h, L, E/h]`` right before ``q_quant``).

Calibration (``gmpq.quant.calibrate``) sets the running statistics from the observed queries and, by ``init``:
``"identity"`` (default): ``gamma = sqrt(var + eps)``, ``beta = mu``, so the module starts as the identity and
leaves the pretrained network as it was (the standardization only acts once training moves gamma and beta);
``"standardize"`` (batch norm's own start): ``gamma = 1``, ``beta = 0``, so the quantizer sees standardized queries
from the first step. On the reference detector at W4A4 (300 steps, 2 seeds) ``identity`` ended 2.1 AP50 higher
(docs/qat.md). Quantization-aware training learns both.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from detr_ptq.models.attention import MultiheadAttention
from gmpq.errors import UserError
from gmpq.quant.host_flags import HostFlags

DECODER_CROSS_ATTN = re.compile(r"transformer\.decoder\.layers\.\d+\.multihead_attn$")
_STAT_DIMS = (0, 2, 3)  # batch, tokens, head dim: one statistic per head
ALIGN_INITS = ("identity", "standardize")


def is_decoder_cross_attention(name: str) -> bool:
    """Default filter of ``install_query_align``: the cross-attention of every DETR decoder layer."""
    return DECODER_CROSS_ATTN.search(name) is not None


def _batch_stats(q: Tensor) -> tuple[Tensor, Tensor]:
    """q [B, h, L, d] -> per-head mean [h] and biased variance [h]."""
    var, mean = torch.var_mean(q, dim=_STAT_DIMS, unbiased=False)
    return mean, var


class QueryAlign(HostFlags):
    """Per-head query normalization with learnable affine: q [B, h, L, d] -> [B, h, L, d].

    Training mode normalizes with the batch statistics (differentiable, as batch norm) and moves
    ``running_mean/var [h]`` towards them by ``momentum``; eval mode uses the running statistics. Variances are
    biased (divide by n) everywhere; n = B * L * d is large for DETR queries.
    Calibration protocol of ``gmpq.quant.calibrate``: while ``observing`` the input passes through unchanged and
    its statistics are recorded; ``finish_calibration()`` then sets the running statistics and gamma/beta.
    Computation is in float32; the output has the input's dtype.
    """

    calibration_observer = True

    def __init__(self, num_heads: int, eps: float = 1e-5, momentum: float = 0.1, init: str = "identity") -> None:
        super().__init__()
        if init not in ALIGN_INITS:
            raise UserError(f"align_init={init!r} is not supported; accepted values: {list(ALIGN_INITS)}")
        self.init = init
        self.num_heads = num_heads
        self.eps = eps
        self.momentum = momentum
        self.gamma = nn.Parameter(torch.ones(num_heads))
        self.beta = nn.Parameter(torch.zeros(num_heads))
        self.register_buffer("running_mean", torch.zeros(num_heads))
        self.register_buffer("running_var", torch.ones(num_heads))
        self.register_buffer("initialized", torch.tensor(False))
        self.observing = False
        self._stats: list[tuple[Tensor, Tensor]] = []  # per-batch (mean [h], var [h]) while observing
        self.name = ""  # set by install_query_align, for error messages

    @torch.no_grad()
    def observe(self, q: Tensor) -> None:
        self._stats.append(_batch_stats(q.detach().float()))

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Running stats := mean of the observed per-batch stats; gamma, beta := 1, 0 (``standardize``) or
        sqrt(var + eps), mean (``identity``)."""
        if not self._stats:
            raise UserError(f"query alignment {self.name or '(unnamed)'} saw no data during calibration")
        mean = torch.stack([m for m, _ in self._stats]).mean(dim=0)
        var = torch.stack([v for _, v in self._stats]).mean(dim=0)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        if self.init == "identity":
            self.gamma.copy_((var + self.eps).sqrt())
            self.beta.copy_(mean)
        else:
            self.gamma.fill_(1.0)
            self.beta.zero_()
        self.set_flag("initialized", True)
        self._stats.clear()
        self.observing = False

    def forward(self, q: Tensor) -> Tensor:
        if q.dim() != 4 or q.shape[1] != self.num_heads:
            raise ValueError(f"QueryAlign expects [B, {self.num_heads}, L, d], got {tuple(q.shape)}")
        if self.observing:
            self.observe(q)
            return q
        if not self.flag("initialized"):
            raise UserError(
                f"query alignment {self.name or '(unnamed)'} is not calibrated: run "
                "gmpq.quant.calibrate(model, batches) (or load a calibrated checkpoint) before using the model"
            )
        x = q.float()
        if self.training:
            mean, var = _batch_stats(x)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        shape = (1, self.num_heads, 1, 1)
        scale = self.gamma / (var + self.eps).sqrt()
        out = (x - mean.view(shape)) * scale.view(shape) + self.beta.view(shape)
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, eps={self.eps}, momentum={self.momentum}, init={self.init}"


def install_query_align(model: nn.Module, module_filter: Callable[[str], bool] = is_decoder_cross_attention,
                        init: str = "identity") -> list[str]:
    """Put a fresh ``QueryAlign(num_heads, init=init)`` in the ``q_norm`` hook of every ``MultiheadAttention`` of
    ``model`` whose dotted name passes ``module_filter``; returns those names. The new modules are uncalibrated.

    Raises ``UserError`` when no module matches, or when a matching module's ``q_norm`` is not the default
    ``nn.Identity`` (installing twice would silently discard learned alignment).
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiheadAttention) and module_filter(n)]
    if not targets:
        raise UserError("install_query_align: no MultiheadAttention module matches the filter")
    taken = [n for n, m in targets if not isinstance(m.q_norm, nn.Identity)]
    if taken:
        raise UserError(f"install_query_align: q_norm is already set in {taken}")
    for name, module in targets:
        align = QueryAlign(module.num_heads, init=init).to(module.in_proj_weight.device)
        align.name = f"{name}.q_norm" if name else "q_norm"
        module.q_norm = align
    return [n for n, _ in targets]

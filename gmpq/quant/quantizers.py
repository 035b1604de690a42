"""Quantizer modules: they hold learnable state (LSQ steps, PACT clipping levels) and call the pure functions.

``WeightQuantizer``: ``symmetric`` (Eq. 6 max-abs, no state) or ``lsq`` (learnable step), per tensor or per output
channel. ``ActQuantizer``: ``pact`` (learnable clip alpha) or ``lsq+`` (learnable step and offset). Activation
quantizers must be calibrated (``gmpq.quant.calibrate``) before they quantize; using one uncalibrated raises.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmpq.errors import UserError
from gmpq.quant import functional as F
from gmpq.quant.host_flags import HostFlags

WEIGHT_METHODS = ("symmetric", "lsq")
ACT_METHODS = ("pact", "lsq+")
CALIB_SAMPLE = 200_000  # values per batch used for the percentile estimate (torch.quantile has a size limit)
MSE_SAMPLE = 20_000  # values per batch kept for the MSE range search of ``init="mse"``
ACT_INITS = ("minmax", "mse")


def check_method(method: str, allowed: tuple[str, ...], what: str) -> str:
    if method not in allowed:
        raise UserError(f"{what}={method!r} is not supported; accepted values: {list(allowed)}")
    return method


class WeightQuantizer(HostFlags):
    """Fake-quantizes a weight ``[C_out, ...]``.

    ``scale`` (symmetric only) is an optional stored step ``[C_out]`` or ``[]``: set when weights were rebuilt
    from a packed export, so the fake-quant forward reproduces the exported grid bit-exactly.
    """

    def __init__(self, bits: int, method: str = "symmetric", per_channel: bool = True, out_channels: int = 1):
        super().__init__()
        self.bits = F.check_bits(bits, "w_bits")
        self.method = check_method(method, WEIGHT_METHODS, "w_method")
        self.per_channel = per_channel
        self.enabled = True
        self.onnx_mode = False  # set by gmpq.quant.onnx_export: express the grid as Q/DQ ops
        n = out_channels if per_channel else 1
        if method == "lsq":
            self.step = nn.Parameter(torch.ones(n))
            self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("scale", None)

    @property
    def qrange(self) -> tuple[int, int]:
        return F.signed_range(self.bits, symmetric=self.method == "symmetric")

    @torch.no_grad()
    def init_from(self, w: Tensor) -> None:
        """LSQ initialisation from the weights themselves (no data needed)."""
        if self.method == "lsq":
            self.step.copy_(F.lsq_init_step(w, self.qrange[1], self.per_channel).reshape(self.step.shape))
            self.set_flag("initialized", True)

    @torch.no_grad()
    def init_mse(self, w: Tensor) -> None:
        """LSQ initialisation at the MSE-optimal step (``functional.mse_step``); a no-op for ``symmetric``."""
        if self.method == "lsq":
            self.step.copy_(F.mse_step(w, *self.qrange, self.per_channel).reshape(self.step.shape))
            self.set_flag("initialized", True)

    def forward(self, w: Tensor) -> Tensor:
        if self.bits == F.FULL_PRECISION or not self.enabled:
            return w
        if self.onnx_mode:
            codes, s = self.codes_and_scale(w)
            qmin, qmax = self.qrange
            return F.qdq_8bit(F.dequantize_codes(codes, s), s, qmin, qmax, axis=0 if s.dim() == 1 else None)
        if self.method == "symmetric":
            return F.symmetric_fake_quant(w, self.bits, self.per_channel, scale=self.scale)
        if not self.flag("initialized"):
            self.init_from(w)
        qmin, qmax = self.qrange
        return F.lsq_fake_quant(w, self.step, qmin, qmax)

    @torch.no_grad()
    def codes_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes (float dtype) and the step such that ``forward(w) == codes * step`` exactly."""
        qmin, qmax = self.qrange
        if self.method == "symmetric":
            s = self.scale if self.scale is not None else F.symmetric_scale(w, self.bits, self.per_channel)
        else:
            if not self.flag("initialized"):
                self.init_from(w)
            s = self.step.detach().clone() if self.per_channel else self.step.detach().reshape(())
        return F.quantize_codes(w.detach(), s, qmin, qmax), s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, per_channel={self.per_channel}"


class ActQuantizer(HostFlags):
    """Fake-quantizes an activation tensor (any shape) with one learnable range per tensor.

    Calibration: while ``observing`` is True the input passes through unchanged and its range is recorded;
    ``finish_calibration()`` then sets the parameters (PACT alpha from the mean per-batch ``percentile`` of |x|;
    LSQ+ step/offset from the mean per-batch min and max) and marks the quantizer initialized.
    ``signed`` (PACT) is decided at calibration: True when any observed input is negative.
    ``init="mse"`` (LSQ+ only) instead picks the range ``r * [min, max]`` with the least quantization MSE on a
    sample of the observed values (``functional.mse_step_offset``).
    ``batch_dim``: the batch dimension of the input (0 for ``[B, ...]``, 1 for sequence-first ``[L, B, E]``); LSQ's
    gradient scale ``1/sqrt(N Qp)`` counts the N values of ONE sample, ``x.numel() / x.shape[batch_dim]``.
    """

    def __init__(self, bits: int, method: str = "pact", percentile: float = 0.999, init: str = "minmax",
                 batch_dim: int = 0):
        super().__init__()
        self.batch_dim = batch_dim
        self.bits = F.check_bits(bits, "a_bits")
        self.method = check_method(method, ACT_METHODS, "a_method")
        self.init = check_method(init, ACT_INITS, "activation init")
        self.percentile = percentile
        self._samples: list[Tensor] = []
        self.enabled = True
        self.onnx_mode = False
        self.observing = False
        self._stats: list[tuple[float, float, float]] = []
        if method == "pact":
            self.alpha = nn.Parameter(torch.tensor(1.0))
        else:
            self.step = nn.Parameter(torch.tensor(1.0))
            self.offset = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))
        self.name = ""  # set by the owning layer, for error messages

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        flat = x.detach().float().flatten()
        if flat.numel() > CALIB_SAMPLE:
            idx = torch.randint(0, flat.numel(), (CALIB_SAMPLE,), device=flat.device)
            flat = flat[idx]
        pct = torch.quantile(flat.abs(), self.percentile).item()
        self._stats.append((flat.min().item(), flat.max().item(), pct))
        if self.init == "mse":
            self._samples.append(flat[torch.randperm(flat.numel(), device=flat.device)[:MSE_SAMPLE]].cpu())

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if not self._stats:
            raise UserError(f"activation quantizer {self.name or '(unnamed)'} saw no data during calibration")
        stats = torch.tensor(self._stats)
        lo, hi, pct = stats.mean(dim=0).tolist()
        neg = bool((stats[:, 0] < 0).any())
        self.set_flag("signed", neg)
        if self.method == "pact":
            self.alpha.fill_(max(pct, 1e-4))
        elif self.init == "mse":
            step, offset = F.mse_step_offset(torch.cat(self._samples), min(lo, 0.0), hi, self.bits)
            self.step.copy_(step)
            self.offset.copy_(offset)
        else:
            step, offset = F.minmax_step_offset(torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 1e-4)), self.bits)
            self.step.copy_(step)
            self.offset.copy_(offset)
        self.set_flag("initialized", True)
        self._stats.clear()
        self._samples.clear()
        self.observing = False

    @property
    def qrange(self) -> tuple[int, int]:
        if self.method == "lsq+":
            return F.unsigned_range(self.bits)
        if self.flag("signed"):
            return F.signed_range(self.bits, symmetric=True)
        return F.unsigned_range(self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == F.FULL_PRECISION or not self.enabled:
            return x
        if self.observing:
            self.observe(x)
            return x
        if not self.flag("initialized"):
            raise UserError(
                f"activation quantizer {self.name or '(unnamed)'} is not calibrated: run "
                "gmpq.quant.calibrate(model, batches) (or load a calibrated checkpoint) before using the model"
            )
        if self.onnx_mode:
            return self._qdq(x)
        if self.method == "pact":
            return F.pact_fake_quant(x, self.alpha, self.bits, signed=self.flag("signed"))
        qmin, qmax = self.qrange
        return F.lsq_fake_quant(x, self.step, qmin, qmax, offset=self.offset,
                               numel_per_step=x.numel() // max(x.shape[self.batch_dim], 1))

    def _qdq(self, x: Tensor) -> Tensor:
        qmin, qmax = self.qrange
        if self.method == "pact":
            levels = qmax
            return F.qdq_8bit(x, self.alpha.detach() / levels, qmin, qmax)
        offset = self.offset.detach()
        return F.qdq_8bit(x - offset, self.step.detach(), qmin, qmax) + offset

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}"

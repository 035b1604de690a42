"""Mixed-precision layers of the GMPQ hypernet (compositional convolution, EdMIPS / GMPQ).

A mixed layer keeps ONE full-precision weight (same Parameter, same name ``weight``/``bias`` as the float layer, so
pretrained checkpoints load) and two importance-logit vectors:

- ``alpha_w`` ``[|B_w|]``: mixes the fake-quantized weights ``W_mix = sum_i softmax(alpha_w)_i Q_{b_i}(W)``;
- ``alpha_a`` ``[|B_a|]``: mixes the fake-quantized inputs ``x_mix = sum_j softmax(alpha_a)_j Q_{b_j}(x)``.

It then runs ONE convolution ``conv(x_mix, W_mix)``. Convolution is bilinear, so this equals the importance-weighted
sum of all ``|B_w| x |B_a|`` branch convolutions ``sum_ij p_i q_j conv(Q_j(x), Q_i(W))`` (bias added once, since the
weights sum to 1) at the cost of a single convolution.

All quantization math comes from ``gmpq.quant``. Weights: the LSQ grid ``[-2^(b-1), 2^(b-1) - 1]`` (4 levels at 2
bits) per output channel, with the MSE-optimal step (``functional.mse_step``) fitted on the weights by
``fit_weight_steps`` and rescaled with each channel's max |W| as the weights move; on Gaussian weights the relative
MSE is 0.147 at 2 bits, against 0.715 for the 3-level max-abs grid used before (``tests/test_search_weight_quant.py``).
The deployed layer uses the same quantizer (the policy records ``w_method: lsq, w_init: mse``: an LSQ step
initialised at the MSE-optimal step of the same weights, identical values). Inputs use one PACT ``ActQuantizer``
(learnable clip) per candidate activation bit-width. The PACT quantizers must be calibrated
(``gmpq.quant.calibrate``) before use; calibration also decides whether a layer's input is signed.

``impl`` chooses how the two mixtures are computed: ``"fused"`` (the default, ``gmpq.search.fused``: one pass, only
the float operand kept for the backward pass) or ``"reference"`` (the explicit sums below, which keep every quantized
copy). Same values; ``tests/test_search_fused.py`` compares them, ``benchmarks/bench_search.py`` times them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gmpq.errors import UserError
from gmpq.quant import functional as QF
from gmpq.quant.quantizers import ActQuantizer
from gmpq.search.fused import mix_lsq, mix_pact

SEARCH_BITS = (2, 3, 4, 5, 6, 7, 8)
IMPLS = ("reference", "fused")
DEFAULT_IMPL = "fused"  # gmpq.search.fused; "reference" keeps the explicit sum (tests, benchmarks)
WEIGHT_QUANTIZER = {"w_method": "lsq", "w_init": "mse"}  # what a policy entry records for the deployed layer


def check_candidates(bits: Sequence[int], what: str) -> tuple[int, ...]:
    """Validate a candidate bit list (non-empty, distinct, each in 2..8); returns it sorted as a tuple."""
    bits = list(bits)
    bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or b not in SEARCH_BITS]
    if not bits or bad or len(set(bits)) != len(bits):
        raise UserError(f"{what}={bits!r}: candidate bit-widths must be distinct integers in {list(SEARCH_BITS)} "
                        f"(e.g. [2, 3, 4]){'; bad values: ' + str(bad) if bad else ''}")
    return tuple(sorted(bits))


class MixedMixin:
    """Shared state and math of ``MixedConv2d`` / ``MixedLinear``; subclasses define ``_linear_op``."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_mixed(self, w_bits: Sequence[int], a_bits: Sequence[int], impl: str = DEFAULT_IMPL) -> None:
        if impl not in IMPLS:
            raise UserError(f"mixed-layer impl={impl!r} is not accepted; accepted values: {list(IMPLS)}")
        self.impl = impl
        self.w_bits = check_candidates(w_bits, "w_bits")
        self.a_bits = check_candidates(a_bits, "a_bits")
        device = self.weight.device
        # zeros -> softmax is uniform: no candidate is preferred at the start of the search
        self.alpha_w = nn.Parameter(torch.zeros(len(self.w_bits), device=device))
        self.alpha_a = nn.Parameter(torch.zeros(len(self.a_bits), device=device))
        self.a_quants = nn.ModuleList(ActQuantizer(b, "pact") for b in self.a_bits).to(device)
        self.register_buffer("w_bits_t", torch.tensor(self.w_bits, dtype=torch.float32, device=device),
                             persistent=False)
        c_out = self.weight.shape[0]
        self.register_buffer("w_steps", torch.ones(len(self.w_bits), c_out, device=device))  # [|B_w|, C_out]
        self.register_buffer("w_amax", torch.ones(c_out, device=device))  # max |W| per channel when fitted
        self.fit_weight_steps()
        self.register_buffer("a_bits_t", torch.tensor(self.a_bits, dtype=torch.float32, device=device),
                             persistent=False)

    # -- probabilities and expectations -----------------------------------------------------------------------
    def w_probs(self) -> Tensor:
        """softmax(alpha_w) ``[|B_w|]``."""
        return torch.softmax(self.alpha_w, dim=0)

    def a_probs(self) -> Tensor:
        return torch.softmax(self.alpha_a, dim=0)

    def expected_w_bits(self) -> Tensor:
        """E[q_w] = sum_i p_i b_i (scalar, differentiable w.r.t. ``alpha_w``)."""
        return (self.w_probs() * self.w_bits_t).sum()

    def expected_a_bits(self) -> Tensor:
        return (self.a_probs() * self.a_bits_t).sum()

    def argmax_bits(self) -> tuple[int, int]:
        return self.w_bits[int(self.alpha_w.argmax())], self.a_bits[int(self.alpha_a.argmax())]

    # -- quantized operands ----------------------------------------------------------------------------------
    def _amax(self) -> Tensor:
        w = self.weight.detach()
        return w.abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-8)  # as in functional.mse_step

    @torch.no_grad()
    def fit_weight_steps(self) -> None:
        """Set every candidate's step to the MSE-optimal one for the current weights (``functional.mse_step``)."""
        for i, b in enumerate(self.w_bits):
            self.w_steps[i].copy_(QF.mse_step(self.weight, *QF.signed_range(b, symmetric=False), per_channel=True))
        self.w_amax.copy_(self._amax())

    def weight_step(self, i: int) -> Tensor:
        """Step ``[C_out]`` of candidate ``i``: the fitted MSE step, scaled by how each channel's max |W| moved
        since the fit (exactly the fitted step at the fitted weights). No gradient."""
        return self.w_steps[i] * (self._amax() / self.w_amax)

    def quant_weight(self, i: int) -> Tensor:
        """Q_{b_i}(W): LSQ-grid fake-quant per output channel (STE), same shape as ``weight``."""
        return QF.lsq_fake_quant(self.weight, self.weight_step(i), *QF.signed_range(self.w_bits[i], symmetric=False))

    def quant_input(self, x: Tensor, j: int) -> Tensor:
        return self.a_quants[j](x)

    def weight_steps(self) -> Tensor:
        """``weight_step(i)`` of every candidate, ``[|B_w|, C_out]``."""
        return self.w_steps * (self._amax() / self.w_amax)

    def mixed_weight(self) -> Tensor:
        p = self.w_probs()
        if self.impl == "fused":
            return mix_lsq(self.weight, p, self.weight_steps(), self.w_bits)
        return sum(p[i] * self.quant_weight(i) for i in range(len(self.w_bits)))

    def mixed_input(self, x: Tensor) -> Tensor:
        q = self.a_probs()
        signed = self._fused_pact_sign(x) if self.impl == "fused" else None
        if signed is not None:
            return mix_pact(x, q, torch.stack([aq.alpha.reshape(()) for aq in self.a_quants]), self.a_bits, signed)
        return sum(q[j] * self.quant_input(x, j) for j in range(len(self.a_bits)))

    def _fused_pact_sign(self, x: Tensor) -> bool | None:
        """The input quantizers' common sign when the fused mixture applies, else None (calibrating, exporting, or
        candidates of different signs: the reference sum then runs). The flags are read from the quantizers' host
        copies (``gmpq.quant.host_flags``: no device read per step); an uncalibrated quantizer is run on an empty
        slice of ``x`` so that it raises its own error."""
        if any(aq.observing or not aq.enabled or aq.onnx_mode or aq.method != "pact" for aq in self.a_quants):
            return None
        for aq in self.a_quants:
            if not aq.flag("initialized"):
                aq(x[:0])
        signs = {aq.flag("signed") for aq in self.a_quants}
        return signs.pop() if len(signs) == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        return self._linear_op(self.mixed_input(x), self.mixed_weight())

    def branch_forward(self, x: Tensor, i: int, j: int) -> Tensor:
        """One explicit branch: the op on ``Q_{a_j}(x)`` with ``Q_{w_i}(W)`` (used to test the composition)."""
        return self._linear_op(self.quant_input(x, j), self.quant_weight(i))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={list(self.w_bits)}, a_bits={list(self.a_bits)}"


class MixedConv2d(MixedMixin, nn.Conv2d):
    """``nn.Conv2d`` searching its weight and input bit-widths. Input ``[N, C_in, H, W]``, output as the float conv."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: Sequence[int], a_bits: Sequence[int],
                   impl: str = DEFAULT_IMPL) -> MixedConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        m.weight, m.bias = conv.weight, conv.bias  # share: parameter names and storage unchanged
        m._init_mixed(w_bits, a_bits, impl)
        m.train(conv.training)
        return m

    def _linear_op(self, x: Tensor, w: Tensor) -> Tensor:
        return self._conv_forward(x, w, self.bias)


class MixedLinear(MixedMixin, nn.Linear):
    """``nn.Linear`` searching its weight and input bit-widths. Input ``[..., in_features]``."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: Sequence[int], a_bits: Sequence[int],
                   impl: str = DEFAULT_IMPL) -> MixedLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        m._init_mixed(w_bits, a_bits, impl)
        m.train(linear.training)
        return m

    def _linear_op(self, x: Tensor, w: Tensor) -> Tensor:
        return nn.functional.linear(x, w, self.bias)


MIXED_TYPES = (MixedConv2d, MixedLinear)


def is_mixed(module: nn.Module) -> bool:
    return isinstance(module, MIXED_TYPES)

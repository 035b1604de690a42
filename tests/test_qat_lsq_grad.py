"""LSQ's gradient scale counts the values of ONE sample in every layout (Esser et al.: g = 1/sqrt(N Qp), N the
number of values sharing the step in one example), and every activation quantizer of the DETR student knows
where its batch dimension is."""

from __future__ import annotations

import math

import pytest
import torch

from detr_ptq.models import build_detr, get_preset
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.quantize import build_student, calibrate_student, uniform_qat_policy
from gmpq.quant.quantizers import ActQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

# (input shape, batch dimension): conv input, sequence-first transformer input, the heads' stacked decoder
# outputs, an attention operand. B = 5 differs from every other size, so a wrong batch dimension changes N.
LAYOUTS = {
    "conv [B, C, H, W]": ((5, 3, 4, 6), 0),
    "sequence-first [L, B, E]": ((7, 5, 8), 1),
    "heads [layers, B, Q, E]": ((2, 5, 3, 8), 1),
    "attention operand [B, h, L, d]": ((5, 4, 7, 2), 0),
}


def _reference_grads(x: torch.Tensor, dy: torch.Tensor, step: float, offset: float, qmax: int, n: int):
    """LSQ+ step and offset gradients written out from the papers: with v = (x - b) / s,
    d x_q / d s = round(v) - v inside [0, Qp], 0 or Qp outside; d x_q / d b = 0 inside, 1 outside; times g."""
    g = 1.0 / math.sqrt(n * qmax)
    v = (x - offset) / step
    inside = (v >= 0) & (v <= qmax)
    ds = torch.where(inside, torch.round(v) - v, torch.clamp(v, 0, qmax).round())
    db = torch.where(inside, torch.zeros_like(v), torch.ones_like(v))
    return g * (dy * ds).sum(), g * (dy * db).sum()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", [2, 4])
def test_step_gradient_uses_the_per_sample_count(layout, bits):
    shape, batch_dim = LAYOUTS[layout]
    torch.manual_seed(0)
    x, dy = torch.randn(shape) * 2, torch.randn(shape)
    q = ActQuantizer(bits, "lsq+", batch_dim=batch_dim)
    with torch.no_grad():
        q.step.fill_(0.3)
        q.offset.fill_(-1.0)
    q.initialized.fill_(True)
    (q(x) * dy).sum().backward()
    qmax = 2**bits - 1
    n = x.numel() // shape[batch_dim]  # the values of one sample
    want_s, want_b = _reference_grads(x, dy, 0.3, -1.0, qmax, n)
    torch.testing.assert_close(q.step.grad, want_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.offset.grad, want_b, rtol=1e-5, atol=1e-7)
    # The count of the old code (x[0].numel()) is another number for the sequence-first layouts.
    assert (x[0].numel() == n) == (batch_dim == 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradient_scale_does_not_depend_on_the_batch_size(layout):
    """The summed step gradient of a batch repeated twice is exactly twice that of the batch (g is the same)."""
    shape, batch_dim = LAYOUTS[layout]
    torch.manual_seed(0)
    x = torch.randn(shape)
    grads = []
    for data in (x, torch.cat([x, x], dim=batch_dim)):
        q = ActQuantizer(3, "lsq+", batch_dim=batch_dim)
        with torch.no_grad():
            q.step.fill_(0.25)
            q.offset.fill_(-0.5)
        q.initialized.fill_(True)
        q(data).pow(2).sum().backward()
        grads.append(q.step.grad.clone())
    torch.testing.assert_close(grads[1], 2 * grads[0], rtol=1e-6, atol=0)


def test_every_detr_student_quantizer_knows_its_batch_dimension():
    """Each LSQ+ quantizer of the W4/A4 student sees the batch (B = 5, unlike any other size) at ``batch_dim``."""
    model, _, _ = build_detr(get_preset("detr_tiny"))
    cfg = QATConfig(bits=4, align=True, query_embed_bits=4)
    build_student(model.eval(), uniform_qat_policy(model, "detr_tiny", cfg), cfg, "detr_tiny")
    seen: dict[str, tuple[tuple[int, ...], int]] = {}

    def record(name: str):
        def hook(module: ActQuantizer, args: tuple) -> None:
            seen[name] = (tuple(args[0].shape), module.batch_dim)
        return hook

    for name, q in model.named_modules():
        if isinstance(q, ActQuantizer) and q.bits < 32:
            q.register_forward_pre_hook(record(name))
    images, mask = torch.randn(5, 3, 64, 96), torch.zeros(5, 64, 96, dtype=torch.bool)
    calibrate_student(model, [(images, mask, None)], 1, "cpu")
    assert len(seen) == sum(isinstance(q, ActQuantizer) and q.bits < 32 for q in model.modules()) > 40
    wrong = {n: (s, d) for n, (s, d) in seen.items() if s[d] != 5}
    assert not wrong, wrong
    by_dim = {d for _, d in seen.values()}
    assert by_dim == {0, 1}  # both layouts occur: the test would catch a single global choice

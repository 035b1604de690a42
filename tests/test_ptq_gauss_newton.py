"""Hutchinson mode gauss-newton: the split H = J^T H_phi J + R is exact, each part's probe has the right mean, the
estimate is unbiased against the exact Hessian, and the DETR distillation loss's row form is the same loss with the
same output-space Hessian (also at student == teacher, where the Huber term's curvature is easy to lose)."""

from __future__ import annotations

import pytest
import torch
from test_ptq_distill import REFERENCE, _reference_batch, _small_detr
from torch import nn
from torch.func import functional_call

from detr_ptq.ptq.distill import DistillConfig, distill_loss, distill_rows
from detr_ptq.ptq.gauss_newton import RowLoss, output_factors, probe_gauss_newton, residual_loss
from detr_ptq.ptq.hutchinson import HutchinsonConfig, hutchinson_traces, traced_weights
from gmpq.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def phi(row, target):
    """Indefinite per-row loss (constant -0.6 coupling: eigenvalues of its Hessian < 0 somewhere)."""
    return 0.2 * ((row - target) ** 2).sum() - 0.6 * row[0] * row[1] + 0.1 * torch.sin(2 * row).sum()


def _setup():
    torch.manual_seed(0)
    model = Small().double()
    layers = traced_weights(model, {"fc1": model.fc1, "fc2": model.fc2})
    batches = [(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)) for _ in range(2)]
    names = list(layers)
    shapes = [layers[n][0].shape for n in names]

    def rows_fn(batch):
        return RowLoss(model(batch[0]), batch[1], phi)

    def flat_fn(batch):
        def f(flat):
            ws = dict(zip([f"{n}.weight" for n in names], [t.reshape(s) for t, s in
                                                           zip(flat.split([s.numel() for s in shapes]), shapes)]))
            return functional_call(model, ws, (batch[0],))
        return f

    flat = torch.cat([layers[n][0].detach().flatten() for n in names])
    return model, layers, batches, rows_fn, flat_fn, flat, [s.numel() for s in shapes]


def _blocks(h, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(float(torch.diagonal(h[i:i + s, i:i + s]).sum()))
        i += s
    return out


def test_split_is_exact_and_each_probe_has_the_part_as_mean():
    """H = J^T H_phi J + R to float64 rounding; A+ A+^T - A- A-^T = H_phi; one probe's samples equal
    ||J_l^T A z||^2 computed from the explicit Jacobian with the same z."""
    _, layers, batches, rows_fn, flat_fn, flat, sizes = _setup()
    batch = batches[0]
    f = flat_fn(batch)
    total = torch.autograd.functional.hessian(lambda w: torch.func.vmap(phi)(f(w), batch[1]).sum(), flat)
    jac = torch.autograd.functional.jacobian(f, flat).reshape(15, -1)  # [N*d, P]
    loss = rows_fn(batch)
    a_pos, a_neg, g = output_factors(loss)
    assert a_neg is not None  # the test exercises the negative part
    h_phi = torch.func.vmap(torch.func.hessian(phi))(loss.rows.detach(), batch[1])
    torch.testing.assert_close(a_pos @ a_pos.transpose(1, 2) - a_neg @ a_neg.transpose(1, 2), h_phi,
                               rtol=0, atol=1e-12)
    gn = jac.T @ torch.block_diag(*h_phi) @ jac
    resid = torch.autograd.functional.hessian(lambda w: (g.detach() * f(w)).sum(), flat)
    torch.testing.assert_close(gn + resid, total, rtol=0, atol=1e-12)
    assert float(resid.abs().max()) > 1e-3  # the residual part is not trivially 0 here

    gen = torch.Generator().manual_seed(3)
    samples = probe_gauss_newton(loss.rows, layers, (a_pos, a_neg), gen, probes=3)
    gen = torch.Generator().manual_seed(3)
    expect = torch.zeros(2, 3, dtype=torch.float64)
    for sign, a in ((1.0, a_pos), (-1.0, a_neg)):
        z = torch.randint(0, 2, (3, 5, 3), generator=gen, dtype=torch.int8).double() * 2 - 1
        u = torch.einsum("ndr,pnr->pnd", a, z).reshape(3, 15)
        jt_u = u @ jac  # [3, P]
        expect += sign * torch.stack([jt_u[:, :sizes[0]].pow(2).sum(1), jt_u[:, sizes[0]:].pow(2).sum(1)])
    torch.testing.assert_close(torch.stack([samples["fc1"], samples["fc2"]]), expect, rtol=1e-12, atol=1e-12)


def test_gauss_newton_traces_match_the_exact_hessian_within_standard_error():
    _, layers, batches, rows_fn, flat_fn, flat, sizes = _setup()
    h = sum(torch.autograd.functional.hessian(
        lambda w, b=b: torch.func.vmap(phi)(flat_fn(b)(w), b[1]).sum(), flat) for b in batches) / len(batches)
    exact = _blocks(h, sizes)
    cfg = HutchinsonConfig(max_probes=800, mode="gauss-newton", probes_per_batch=8, residual_probes=4,
                           residual_every=2, seed=1)
    res = hutchinson_traces(lambda b: rows_fn(b).value(), batches, layers, cfg, rows_fn=rows_fn)
    assert res["steps"] == 100 and res["hvps"] == 4 * 2 * 51  # residual on steps 0, 1 and every 2nd: 51 steps
    for n, t in zip(layers, exact):
        est = res["layers"][n]
        assert abs(est["trace"] - t) < 3 * est["stderr"], (n, est, t)
        assert est["stderr"] < 0.2 * abs(t)


def test_residual_part_is_skipped_exactly_where_the_gradient_is_zero():
    rows = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    targets = rows.detach().clone()
    at_min = RowLoss(rows, targets, lambda r, t: ((r - t) ** 2).sum(), minimum_at_target=True)
    assert residual_loss(at_min, output_factors(at_min)[2] + 1e-11) is None  # rounding of a zero gradient
    moved = RowLoss(rows, targets + 0.1, at_min.phi, minimum_at_target=True)
    assert residual_loss(moved, output_factors(moved)[2]) is not None
    plain = RowLoss(rows, targets, at_min.phi)
    assert residual_loss(plain, torch.full((4, 3), 1e-11, dtype=torch.float64)) is not None


@pytest.mark.parametrize("shift", [0.0, 0.01, 0.3])
def test_distill_rows_is_the_distillation_loss_with_its_output_hessian(shift):
    """Same value and same Hessian-vector products in the outputs as ``distill_loss`` (Smooth-L1), at student ==
    teacher (shift 0: the Huber term's curvature 1/beta must be there), inside and outside the quadratic zone."""
    model, _ = _small_detr()
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 48, 48, dtype=torch.bool)
    with torch.no_grad():
        teacher = model.double()(images.double(), mask)
    leaves = [t.clone().requires_grad_(True) for o in [teacher] + teacher["aux_outputs"]
              for t in (o["pred_logits"] + shift * torch.randn_like(o["pred_logits"]),
                        o["pred_boxes"] + shift * torch.randn_like(o["pred_boxes"]))]

    def student():
        outs = [{"pred_logits": leaves[2 * i], "pred_boxes": leaves[2 * i + 1]} for i in range(len(leaves) // 2)]
        return {**outs[0], "aux_outputs": outs[1:]}

    cfg = DistillConfig()
    direct = distill_loss(student(), teacher, cfg)
    rows = distill_rows(student(), teacher, cfg)
    torch.testing.assert_close(rows.value(), direct, rtol=1e-12, atol=1e-15)
    v = [torch.randn_like(t) for t in leaves]
    hv = []
    for loss in (direct, rows.value()):
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        hv.append(torch.autograd.grad(grads, leaves, grad_outputs=v))
    for a, b in zip(*hv):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert float(hv[0][1].abs().max()) > 1.0  # the box Hessian (1/beta inside the zone) is present


def test_mode_gauss_newton_needs_a_row_loss():
    _, layers, batches, rows_fn, _, _, _ = _setup()
    with pytest.raises(UserError, match="gauss-newton.*per-row.*accepted modes"):
        hutchinson_traces(lambda b: rows_fn(b).value(), batches, layers, HutchinsonConfig(mode="gauss-newton"))


def test_output_float_on_the_reference_detector_agrees_with_per_layer_mode():
    """Real detector and images, output-float: no residual part (student == teacher), and every layer's
    Gauss-Newton trace agrees with the per-layer Hutchinson trace within 4 combined standard errors."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference checkpoint {REFERENCE} is missing")
    from detr_ptq.ptq.apply import load_float
    from detr_ptq.ptq.sensitivity import SensitivityConfig, layer_traces

    model, criterion, _, _ = load_float(REFERENCE)
    batches = [_reference_batch()]
    out = {}
    for mode, probes in (("gauss-newton", 64), ("per-layer", 12)):
        cfg = SensitivityConfig(hutchinson=HutchinsonConfig(mode=mode, max_probes=probes, probes_per_batch=probes
                                                            // 4 if mode == "per-layer" else 16))
        out[mode] = layer_traces(model, criterion, batches, "output-float", cfg, check=False)
    assert out["gauss-newton"]["hvps"] == 0  # no Hessian-vector product at all: the residual part is 0
    for n, gn in out["gauss-newton"]["layers"].items():
        pl = out["per-layer"]["layers"][n]
        assert gn["trace"] > 0
        assert abs(gn["trace"] - pl["trace"]) < 4 * (gn["stderr"] ** 2 + pl["stderr"] ** 2) ** 0.5, (n, gn, pl)

"""Mixed layers and the hypernet: compositional convolution == explicit branch sum, init, argmax, names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant.calibrate import calibrate
from gmpq.search.hypernet import (
    arch_parameters,
    argmax_bits,
    build_hypernet,
    calibrate_hypernet,
    expected_bits,
    mixed_layers,
)
from gmpq.search.mixed import MixedConv2d, MixedLinear

CONVS = {
    "regular": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "strided": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1, bias=True),
    "grouped": dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
}


def _randomize_logits(m) -> None:
    with torch.no_grad():
        m.alpha_w.copy_(torch.randn_like(m.alpha_w))
        m.alpha_a.copy_(torch.randn_like(m.alpha_a))


def _branch_sum(m, x):
    p, q = m.w_probs(), m.a_probs()
    return sum(p[i] * q[j] * m.branch_forward(x, i, j) for i in range(len(m.w_bits)) for j in range(len(m.a_bits)))


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("signed_input", [False, True])
def test_compositional_conv_equals_branch_sum(kind, signed_input):
    conv = nn.Conv2d(**CONVS[kind]).double()
    m = MixedConv2d.from_float(conv, [2, 3, 4], [2, 4, 8]).double()  # PACT clips too
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    x = x if signed_input else x.relu()
    calibrate(m, [x], num_batches=1)
    assert bool(m.a_quants[0].signed) == signed_input
    _randomize_logits(m)
    torch.testing.assert_close(m(x), _branch_sum(m, x), rtol=0, atol=1e-10)


def test_compositional_linear_equals_branch_sum():
    m = MixedLinear.from_float(nn.Linear(12, 5), [2, 5, 8], [3, 4]).double()
    x = torch.randn(7, 12, dtype=torch.float64).relu()
    calibrate(m, [x], num_batches=1)
    _randomize_logits(m)
    torch.testing.assert_close(m(x), _branch_sum(m, x), rtol=0, atol=1e-10)


def test_gradients_of_composition_match_branch_sum():
    m = MixedConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, groups=4), [2, 4], [2, 3, 4]).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).relu()
    calibrate(m, [x], num_batches=1)
    _randomize_logits(m)
    params = [m.weight, m.alpha_w, m.alpha_a]
    g1 = torch.autograd.grad(m(x).square().sum(), params)
    g2 = torch.autograd.grad(_branch_sum(m, x).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_init_is_uniform_and_shares_weight():
    conv = nn.Conv2d(3, 5, 3)
    m = MixedConv2d.from_float(conv, [4, 2, 3], [2, 3, 4, 5, 6, 7, 8])
    assert m.weight is conv.weight and m.bias is conv.bias
    assert m.w_bits == (2, 3, 4)  # sorted
    torch.testing.assert_close(m.w_probs(), torch.full((3,), 1 / 3))
    torch.testing.assert_close(m.a_probs(), torch.full((7,), 1 / 7))
    assert m.expected_w_bits().item() == pytest.approx(3.0)
    assert m.expected_a_bits().item() == pytest.approx(5.0)


@pytest.mark.parametrize("bits", [[1, 2], [2, 9], [], [2, 2], [32]])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(UserError, match=r"2, 3, 4, 5, 6, 7, 8"):
        MixedConv2d.from_float(nn.Conv2d(3, 5, 3), bits, [4])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU())
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.mid(self.body(self.stem(x)).mean(dim=(2, 3))).relu())


def test_hypernet_keeps_names_and_excludes_first_and_classifier():
    model = Toy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    build_hypernet(model, [2, 3, 4], [2, 3, 4], exclude=["stem", "head"])
    assert list(mixed_layers(model)) == ["body.0", "body.2"]
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear and type(model.mid) is nn.Linear
    missing, unexpected = model.load_state_dict(state, strict=False)
    extra = ("alpha_w", "alpha_a", "alpha", "w_steps", "w_amax")
    assert unexpected == [] and all(k.split(".")[-1] in extra or "a_quants" in k for k in missing)
    assert len(arch_parameters(model)) == 4
    build_hypernet(Toy(), [2], [2], exclude=["stem"], include_linear=True)


def test_hypernet_with_linear_and_unknown_exclude():
    model = build_hypernet(Toy(), [2, 4], [4, 8], exclude=["stem", "head"], include_linear=True)
    assert list(mixed_layers(model)) == ["body.0", "body.2", "mid"]
    with pytest.raises(UserError, match="quantizable layers"):
        build_hypernet(Toy(), [2], [2], exclude=["nope"])


def test_expected_and_argmax_bits_and_forced_sign():
    model = build_hypernet(Toy(), [2, 3, 4], [2, 4, 8], exclude=["stem", "head"])
    calibrate_hypernet(model, [torch.randn(2, 3, 8, 8)], num_batches=1, signed="signed")
    assert all(bool(q.signed) for m in mixed_layers(model).values() for q in m.a_quants)
    with torch.no_grad():
        model.body[0].alpha_w.copy_(torch.tensor([0.0, 0.0, 5.0]))
        model.body[0].alpha_a.copy_(torch.tensor([3.0, 0.0, 0.0]))
    assert argmax_bits(model)["body.0"] == (4, 2)
    ew, ea = expected_bits(model)["body.2"]
    assert ew.item() == pytest.approx(3.0) and ea.item() == pytest.approx(14 / 3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.body[0].alpha_w.grad is not None

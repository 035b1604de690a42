"""The search's weight quantizer: 4 levels at 2 bits with a small error on Gaussian weights, and the deployed layer
(the policy's ``w_method: lsq, w_init: mse``) quantizes exactly as the search did. Unknown quantizers fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant import functional as QF
from gmpq.quant.policy import apply_policy, make_policy
from gmpq.search.mixed import WEIGHT_QUANTIZER, MixedConv2d


def _rel_mse(q: torch.Tensor, w: torch.Tensor) -> float:
    return float(((q - w) ** 2).sum() / (w**2).sum())


@pytest.fixture
def gaussian_conv():
    conv = nn.Conv2d(64, 64, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0)))
    return conv


def test_two_bits_use_four_levels_with_small_error(gaussian_conv):
    m = MixedConv2d.from_float(gaussian_conv, [2, 3, 4], [4])
    w = gaussian_conv.weight.detach()
    q2 = m.quant_weight(0).detach()
    assert all(len(torch.unique(q2[c])) == 4 for c in range(64))
    errors = [_rel_mse(m.quant_weight(i).detach(), w) for i in range(3)]
    assert errors[0] <= 0.15  # 0.147: the 3-level max-abs grid used before gave 0.715
    assert errors[0] < _rel_mse(QF.symmetric_fake_quant(w, 2, per_channel=True), w) / 4
    assert errors[0] > errors[1] > errors[2]  # more bits, less error


def test_step_follows_the_weights_and_refits_to_the_mse_optimum(gaussian_conv):
    m = MixedConv2d.from_float(gaussian_conv, [2, 3], [4])
    fitted = m.weight_step(0).clone()
    with torch.no_grad():
        m.weight.mul_(2.0)  # the weights grow: the step grows with each channel's max |W|
    torch.testing.assert_close(m.weight_step(0), 2 * fitted)
    m.fit_weight_steps()
    expected = QF.mse_step(m.weight, *QF.signed_range(2, symmetric=False), per_channel=True)
    assert torch.equal(m.weight_step(0), expected)


def test_deployed_layer_quantizes_exactly_as_the_search(gaussian_conv):
    m = MixedConv2d.from_float(gaussian_conv, [2, 3, 4], [4])
    for i, bits in enumerate(m.w_bits):
        deploy = nn.Sequential(nn.Conv2d(64, 64, 3, bias=False))
        deploy[0].weight.data.copy_(gaussian_conv.weight.data)  # the float weights the search started from
        policy = make_policy("toy", {"0": {"w_bits": bits, "a_bits": 4, **WEIGHT_QUANTIZER}}, "gmpq")
        layer = apply_policy(deploy, policy)[0]
        assert layer.w_quant.method == "lsq"
        assert torch.equal(layer.w_quant(layer.weight), m.quant_weight(i))  # atol = 0


@pytest.mark.parametrize("field,value", [("w_method", "hwgq"), ("w_init", "gaussian")])
def test_unknown_quantizer_in_a_policy_fails_with_the_accepted_names(field, value):
    with pytest.raises(UserError, match=rf"{field}='{value}' is not accepted; accepted values: \["):
        make_policy("toy", {"0": {"w_bits": 2, "a_bits": 4, field: value}}, "gmpq")

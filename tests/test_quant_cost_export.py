"""Cost accounting against hand-computed numbers; packed export size and bit-exact parity at bits 2..8."""

import math

import pytest
import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant import (
    apply_policy,
    calibrate,
    cost_summary,
    export_packed,
    format_summary,
    layer_bits,
    load_packed,
    make_policy,
    measure_macs,
    read_packed,
    theoretical_packed_bytes,
    uniform_policy,
)
from gmpq.quant.export import pack_codes, unpack_codes


def small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 3))


def test_macs_bops_size_hand_computed():
    model = small()
    macs = measure_macs(model, (1, 8, 8))
    # conv: 8*8 outputs x 4 channels x (1 x 3 x 3); depthwise: 4*4 x 4 x (1 x 3 x 3); linear: 3 x 64
    assert macs == {"0": 2304, "2": 576, "5": 192}
    policy = make_policy("small", {"0": {"w_bits": 8, "a_bits": None}, "2": {"w_bits": 4, "a_bits": 4},
                                   "5": {"w_bits": 2, "a_bits": 8}}, "hand")
    s = cost_summary(model, layer_bits(policy, model), (1, 8, 8))
    assert s["macs"] == 2304 + 576 + 192
    assert s["bops"] == 2304 * 8 * 32 + 576 * 4 * 4 + 192 * 2 * 8
    assert s["params"] == 36 + 4 + 36 + 192 + 3
    size_bits = 36 * 8 + 36 * 4 + 192 * 2 + (4 + 3) * 32  # quantized weights + biases at 32 bits
    assert s["size_bytes"] == size_bits / 8
    assert s["avg_w_bits"] == pytest.approx((36 * 8 + 36 * 4 + 192 * 2) / 264)
    assert s["compression"] == pytest.approx(271 * 32 / size_bits)
    assert "| 2 | Conv2d | 36 | 576 | 4 | 4 |" in format_summary(s)


def test_macs_unchanged_after_quantization_and_state_preserved():
    model = small()
    before = measure_macs(model, (1, 8, 8))
    apply_policy(model, uniform_policy(model, "small", 4, 4))
    model.train()
    assert measure_macs(model, (1, 8, 8)) == before
    assert model.training  # restored


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (1001,)).numpy()
    data = pack_codes(codes, bits)
    assert len(data) == math.ceil(1001 * bits / 8)
    assert (unpack_codes(data, bits, 1001) == codes).all()


def resnetish() -> nn.Sequential:
    """~85k parameters (ResNet-20 has 270k), so the header is small next to the payload, as in a real model."""
    layers = [nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU()]
    layers += [nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(48, 10)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("w_method", ["symmetric", "lsq"])
def test_packed_export_size_and_exact_parity(tmp_path, bits, w_method):
    torch.manual_seed(bits)
    model = resnetish()
    policy = uniform_policy(model, "resnetish", bits, bits)
    apply_policy(model, policy, w_method=w_method)
    x = torch.randn(4, 3, 16, 16)
    calibrate(model, [x])
    model.eval()
    expected = model(x)
    stats = export_packed(model, policy, tmp_path / "m.gmpq")
    theory = theoretical_packed_bytes(model)
    assert stats["payload_bytes"] == theory
    assert theory <= stats["file_bytes"] <= 1.05 * theory
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert stats["packed_weight_bytes"] <= math.ceil(weights * bits / 8) + 8  # per-tensor byte rounding
    rebuilt = load_packed(tmp_path / "m.gmpq", resnetish()).eval()
    assert torch.equal(rebuilt(x), expected)


def test_packed_mixed_bits_and_full_precision_layers(tmp_path):
    model = resnetish()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = {n: {"w_bits": b, "a_bits": a} for n, b, a in zip(names, [32, 2, 3, 5, 7, 8, 32],
                                                               [None, 4, 4, 6, 8, 8, None])}
    policy = make_policy("resnetish", layers, "hand")
    apply_policy(model, policy)
    x = torch.randn(2, 3, 16, 16)
    calibrate(model, [x])
    model.eval()
    export_packed(model, policy, tmp_path / "m.gmpq")
    header, state = read_packed(tmp_path / "m.gmpq")
    bits = {r[0]: r[3] for r in header["tensors"] if r[1] == "packed"}
    assert bits == {f"{n}.weight": b for n, b in zip(names[1:6], [2, 3, 5, 7, 8])}
    assert torch.equal(load_packed(tmp_path / "m.gmpq", resnetish()).eval()(x), model(x))


def test_packed_bad_files(tmp_path):
    f = tmp_path / "x.gmpq"
    f.write_bytes(b"hello")
    with pytest.raises(UserError, match="not a gmpq packed file"):
        read_packed(f)
    with pytest.raises(UserError, match="does not exist"):
        read_packed(tmp_path / "missing.gmpq")
    with pytest.raises(UserError, match="no quantized layers"):
        export_packed(small(), {}, tmp_path / "y.gmpq")

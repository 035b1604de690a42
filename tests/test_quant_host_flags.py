"""The quantizers' boolean flags are read from a Python copy in forward (no device read per step), and the copy
follows every way the buffers change: calibration, set_flag, load_state_dict, deepcopy."""

from __future__ import annotations

import copy

import torch

from gmpq.quant.calibrate import calibrate
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer


def _calibrated(values: torch.Tensor) -> ActQuantizer:
    q = ActQuantizer(4, "pact")
    q.observing = True
    q(values)
    q.finish_calibration()
    return q


def test_forward_reads_no_buffer_after_the_first_call(monkeypatch):
    q = _calibrated(torch.randn(64))
    x = torch.randn(64)
    ref = q(x)
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t.shape) or real_bool(t))
    outs = [q(x) for _ in range(3)]
    w = WeightQuantizer(4, "lsq", per_channel=True, out_channels=3)
    w(torch.randn(3, 5))
    w(torch.randn(3, 5))
    monkeypatch.undo()
    assert reads == [()]  # only the LSQ weight quantizer's first read of `initialized` (then set_flag keeps it)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_flag_copy_follows_load_state_dict_and_deepcopy():
    signed = _calibrated(torch.randn(256))  # negative inputs: signed PACT
    unsigned = _calibrated(torch.rand(256))
    assert signed.flag("signed") and not unsigned.flag("signed")
    x = torch.randn(64)
    unsigned(x)  # fills the copy
    unsigned.load_state_dict(signed.state_dict())
    assert unsigned.flag("signed")
    torch.testing.assert_close(unsigned(x), signed(x), rtol=0, atol=0)
    clone = copy.deepcopy(signed)
    clone.set_flag("signed", False)
    assert not bool(clone.signed) and signed.flag("signed")
    fresh = ActQuantizer(4, "pact")
    fresh.load_state_dict(signed.state_dict())
    assert fresh.flag("initialized") and fresh.flag("signed")


def test_calibrate_sets_the_flags_it_reads():
    model = torch.nn.Sequential(ActQuantizer(4, "lsq+"), torch.nn.ReLU(), ActQuantizer(4, "pact"))
    calibrate(model, [torch.randn(8, 4)], num_batches=1)
    assert all(m.flag("initialized") and bool(m.initialized) for m in (model[0], model[2]))
    assert not model[2].flag("signed")  # after a ReLU

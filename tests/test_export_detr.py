"""A DETR weight-only PTQ policy exports to the packed format; the packed DETR scores the same AP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_ptq.data.digits_coco import make_digits_coco
from detr_ptq.export import export_detr, load_packed_detr
from detr_ptq.ptq.apply import eval_loader, evaluate_detr, load_float, quantize_detr
from detr_ptq.ptq.calibset import checkpoint_resize
from gmpq.quant import make_policy, save_policy
from gmpq.quant.modules import quantizable_layers

REFERENCE = Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_packed_detr_scores_the_fake_quant_ap(tmp_path):
    digits = tmp_path / "digits"
    make_digits_coco(digits, seed=0, num_train=2, num_val=6)
    model, _, post, dcfg = load_float(REFERENCE)
    names = list(quantizable_layers(model))
    # a mixed weight-only policy like `detr-ptq allocate` writes: bits 2..8 over the layers, attention included
    layers = {n: {"w_bits": (2, 3, 4, 5, 6, 8)[i % 6], "a_bits": None} for i, n in enumerate(names)}
    assert any(type(m).__name__ == "MultiheadAttention" for n, m in model.named_modules() if n in layers)
    save_policy(make_policy(dcfg.name, layers, "hand"), tmp_path / "p.json")
    stats = export_detr(REFERENCE, tmp_path / "p.json", tmp_path / "detr.gmpq")
    assert stats["payload_bytes"] == stats["theoretical_bytes"]
    quantize_detr(model, make_policy(dcfg.name, layers, "hand"), dcfg.name)
    packed, post2 = load_packed_detr(tmp_path / "detr.gmpq", REFERENCE)
    min_size, max_size = checkpoint_resize(str(REFERENCE), 0, 0)
    loader, gt = eval_loader(digits, "val", min_size, max_size, batch_size=3)
    x = next(iter(loader))[0]
    with torch.no_grad():
        a, b = model(x), packed(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    ap_fq = evaluate_detr(model, post, loader, gt)
    ap_packed = evaluate_detr(packed, post2, loader, gt)
    assert ap_packed == ap_fq and ap_fq["AP"] > 0

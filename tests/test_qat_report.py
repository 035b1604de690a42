"""``detr-ptq qat-report``: seeds of one setting become one row with mean ± sample sd, every row names its
attention bits, and the distillation rows give their difference to the baseline with its standard error."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from detr_ptq.qat.config import PARTS
from detr_ptq.qat.report import report
from gmpq.errors import UserError


def _result(folder, name: str, seed: int, ap50: float, align=False, fqm=False, attn=4, quantize=PARTS) -> None:
    r = {"policy": "", "w_bits": 4, "a_bits": 4, "attn_bits": attn, "quantize": list(quantize), "align": align,
         "align_init": "identity", "fqm": fqm, "fqm_tau": 0.5, "distill_weight": 1.0, "two_stage": False,
         "epochs": 2, "steps_per_epoch": 50, "batch_size": 8, "lr": 1e-4, "augment": False, "seed": seed,
         "images": 200, "AP": ap50 / 2, "AP50": ap50, "before": {"AP50": 0.3}, "float": {"AP50": 0.76},
         "recovery_AP50": ap50 / 0.76, "train_seconds": 120.0, "gbops": 2.178}
    (folder / name).mkdir()
    (folder / name / "result.json").write_text(json.dumps(r))


def _line(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
    assert len(lines) == 1, (needles, lines)
    return lines[0]


def test_seeds_are_averaged_with_their_spread_and_attention_bits_shown(tmp_path):
    base, both = [0.70, 0.72, 0.68], [0.73, 0.71]
    for seed, v in enumerate(base):
        _result(tmp_path, f"w4_base_s{seed}", seed, v)
    for seed, v in enumerate(both):
        _result(tmp_path, f"w4_da_fqm_s{seed}", seed, v, align=True, fqm=True)
    _result(tmp_path, "w4_base_attn8_s0", 0, 0.74, attn=8)
    _result(tmp_path, "abl_p1_s0", 0, 0.75, quantize=PARTS[:1])
    text = report(tmp_path, tmp_path / "tables.md")
    assert (tmp_path / "tables.md").read_text() == text
    m, sd = statistics.fmean([100 * v for v in base]), statistics.stdev([100 * v for v in base])
    row = _line(text, "| baseline |", "| 4 |")
    assert f"| {m:.1f} ± {sd:.1f} |" in row and "| 3 (0,1,2) |" in row and "| 100 |" in row
    row = _line(text, "+ DA + FQM")
    mb, sb = statistics.fmean([100 * v for v in both]), statistics.stdev([100 * v for v in both])
    se = math.sqrt(sd**2 / 3 + sb**2 / 2)
    assert f"| {mb:.1f} ± {sb:.1f} |" in row and f"| {mb - m:+.1f} ± {se:.1f} |" in row
    assert "| W4A4 | 4 |" in row and "`w4_da_fqm_s0` `w4_da_fqm_s1`" in row
    row = _line(text, "| baseline |", "| 8 |")  # the 8-bit attention variant is its own row, named as such
    assert "| 74.0 |" in row and "| 1 (0) |" in row
    assert "| backbone |" in _line(text, "abl_p1_s0")


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"no \*/result.json"):
        report(tmp_path)

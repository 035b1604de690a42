"""The PTQ verbs end to end (sensitivity -> allocate -> ptq, reproduce-table), the calibration set, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detr_ptq.cli import main
from detr_ptq.data.digits_coco import make_digits_coco
from detr_ptq.models import build_detr, get_preset
from detr_ptq.models.checkpoint import save_detr
from detr_ptq.ptq.calibset import CalibConfig, calibration_loader, select_balanced, total_variation
from gmpq.errors import UserError

# The shipped reference detector; DETR_PTQ_REFERENCE points the end-to-end test at another checkpoint of it.
REFERENCE = Path(os.environ.get("DETR_PTQ_REFERENCE") or
                 Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth")
DIGITS_SEED = 0  # the seed of the reference detector's dataset (recipes/detr_tiny_digits.yaml)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The first images of the digits dataset's train and held-out splits (each image depends only on
    (seed, split, index), so these are exactly the reference detector's first held-out images)."""
    out = tmp_path_factory.mktemp("digits")
    make_digits_coco(out, seed=DIGITS_SEED, num_train=12, num_val=16)
    return out


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = get_preset("detr_tiny")
    model, _, _ = build_detr(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "rand.pth"
    save_detr(path, model, cfg, train_config={"min_size": 96, "max_size": 96})
    return path


def test_balanced_selection_tracks_the_class_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02])
    counts = np.stack([rng.multinomial(rng.integers(1, 6), p) for _ in range(3000)]).astype(float)
    target = counts.sum(0) / counts.sum()
    picked = select_balanced(counts, 100, seed=0)
    assert len(set(picked)) == 100
    tv_greedy = total_variation(counts[picked].sum(0), target)
    tv_random = np.mean([total_variation(counts[rng.choice(3000, 100, replace=False)].sum(0), target)
                         for _ in range(20)])
    assert tv_greedy < 0.01 < tv_random
    assert (counts[picked].sum(0) > 0).all()  # the rare classes are represented


def test_calibration_folder_missing_or_small(digits, tmp_path):
    with pytest.raises(UserError, match="calibration folder .* does not exist"):
        calibration_loader(CalibConfig(data_dir=str(tmp_path / "nope")), 96, 96)
    with pytest.warns(UserWarning, match="has 12 images, fewer than num_images=100; using all 12"):
        loader, report = calibration_loader(CalibConfig(data_dir=str(digits), num_images=100), 96, 96)
    assert report["used"] == 12 and len(loader.dataset) == 12


def test_cli_sensitivity_allocate_ptq(digits, random_ckpt, tmp_path, capsys):
    out = tmp_path / "sens"
    rc = main(["sensitivity", "--checkpoint", str(random_ckpt), "--calib-dir", str(digits), "--num-images", "8",
               "--probes", "4", "--out-dir", str(out), "--set", "hutchinson.min_probes=2",
               "--set", "hutchinson.mode=all",  # the cheap estimator: this test is about the files
               "--set", "calib.batch_size=4"])
    assert rc == 0
    sens = json.loads((out / "sensitivity.json").read_text())
    assert set(sens["metrics"]) == {"loss", "output-float", "output-quant"}
    assert (out / "fig1_traces.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    layer = sens["metrics"]["loss"]["layers"]["backbone.0.body.conv1"]  # frozen by the official recipe: traced
    assert layer["params"] == 16 * 3 * 9 and layer["stderr"] is not None

    policy_path = tmp_path / "policy.json"
    rc = main(["allocate", "--sensitivity", str(out / "sensitivity.json"), "--checkpoint", str(random_ckpt),
               "--metric", "output-quant", "--target", "5", "--out", str(policy_path),
               "--set", "allocate.noise_draws=5"])
    assert rc == 0
    policy = json.loads(policy_path.read_text())
    assert policy["format"] == "gmpq-policy/1" and policy["created_by"]["method"] == "hessian-ilp"
    assert policy["summary"]["avg_w_bits"] <= 5 + 1e-9
    assert policy["summary"]["noise"]["draws"] == 5 and 0 <= policy["summary"]["noise"]["same_allocation"] <= 1
    assert policy["layers"]["class_embed"] == {**policy["layers"]["class_embed"], "w_bits": 32, "a_bits": None}
    assert policy_path.with_suffix(".png").is_file()

    rc = main(["ptq", "--checkpoint", str(random_ckpt), "--coco-dir", str(digits), "--policy", str(policy_path),
               "--out", str(tmp_path / "ap.json")])
    assert rc == 0
    assert "AP" in json.loads((tmp_path / "ap.json").read_text())

    rc = main(["allocate", "--sensitivity", str(out / "sensitivity.json"), "--checkpoint", str(random_ckpt),
               "--target", "2.5", "--out", str(tmp_path / "bad.json")])
    assert rc == 2
    assert "feasible targets are 3 to 6" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_detector_table(digits, tmp_path):
    """The paper's table on the reference detector (a few held-out images, few probes: a smoke run of the full
    pipeline; docs/ptq.md has the full-size table)."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference checkpoint {REFERENCE} is not there yet (trained by `detr-ptq train`)")
    from detr_ptq.ptq.table import TableConfig, run_table

    cfg = TableConfig(checkpoint=str(REFERENCE), coco_dir=str(digits), out_dir=str(tmp_path / "table"),
                      uniform_bits=[8, 4], targets=[5.0], calib=CalibConfig(data_dir=str(digits), num_images=8))
    cfg.hutchinson.max_probes = 4
    cfg.hutchinson.min_probes = 2
    cfg.draws = 1
    res = run_table(cfg, log=lambda s: None)
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["float"]["AP"] > 0.3  # a trained detector
    assert abs(rows["uniform W8"]["AP"] - rows["float"]["AP"]) < 0.03  # 8-bit weights barely matter
    for metric in ("loss", "output-float", "output-quant"):
        assert rows[f"ILP {metric} W5 draw 0"]["avg_bits"] <= 5 + 1e-9
    assert (tmp_path / "table" / "table.md").read_text().count("| 5 | ILP") == 3


def test_table_summarizes_calibration_draws():
    """ILP rows become mean, sample std and range over the draws; float/uniform rows stay single."""
    from detr_ptq.ptq.table import TableConfig, format_table, summarize_draws

    rows = [{"label": "uniform W4", "method": "uniform", "avg_bits": 4.0, "AP": 0.20, "AP50": 0.5}]
    for draw, ap in enumerate([0.30, 0.32, 0.37]):
        rows.append({"label": f"ILP output-quant W4 draw {draw}", "method": "ilp-output-quant", "avg_bits": 3.99,
                     "AP": ap, "AP50": 0.6, "target_bits": 4.0, "draw": draw, "negative_traces": draw,
                     "same_allocation_under_noise": 0.5, "delta_ap_vs_uniform": 100 * ap - 20.0})
    (entry,) = summarize_draws(rows)
    assert entry["AP"]["mean"] == pytest.approx(33.0) and entry["AP"]["n"] == 3
    assert entry["AP"]["std"] == pytest.approx(float(np.std([30.0, 32.0, 37.0], ddof=1)))
    assert (entry["AP"]["min"], entry["AP"]["max"]) == pytest.approx((30.0, 37.0))
    assert entry["delta_ap_vs_uniform"]["mean"] == pytest.approx(13.0)
    md = format_table(rows, [entry], "detr_tiny", TableConfig(draws=3))
    assert "| 4 | ILP, output-quant | 3.99 | 33.0 +- 3.6 (30.0..37.0) |" in md
    assert "| 4 | uniform | 4.00 | 20.0 | 50.0 |" in md
    with pytest.raises(ValueError, match="draws=0 must be >= 1"):
        TableConfig(draws=0)


def test_ptq_metrics_never_overwrite_a_policy(tmp_path):
    from detr_ptq.ptq.apply import PTQConfig
    from detr_ptq.ptq.stages import ptq_result_path

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "gmpq-policy/1", "layers": {}}))
    assert ptq_result_path(PTQConfig(policy=str(policy))).name == "policy.ptq_result.json"
    assert ptq_result_path(PTQConfig(w_bits=4)).name == "uniform_w4.ptq_result.json"
    with pytest.raises(UserError, match="is the policy file itself"):
        ptq_result_path(PTQConfig(policy=str(policy), out=str(policy)))
    other = tmp_path / "other_policy.json"
    other.write_text(json.dumps({"format": "gmpq-policy/1", "layers": {}}))
    with pytest.raises(UserError, match=r"holds a policy \(gmpq-policy/1\)"):
        ptq_result_path(PTQConfig(policy=str(policy), out=str(other)))
    metrics = tmp_path / "ap.json"
    metrics.write_text(json.dumps({"AP": 0.1}))  # an earlier metrics file may be replaced
    assert ptq_result_path(PTQConfig(policy=str(policy), out=str(metrics))) == metrics

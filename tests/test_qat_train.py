"""``detr-ptq qat`` end to end on the reference detector: calibration is required, a short run improves AP, the
final checkpoint evaluates through ``detr-ptq eval``, bad input (bits, teacher), DDP. Resume and the NaN stop:
tests/test_stages_detr.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detr_ptq.cli import main
from detr_ptq.cli_eval import evaluate_checkpoint
from detr_ptq.data.digits_coco import make_digits_coco
from detr_ptq.models import build_detr, get_preset
from detr_ptq.models.checkpoint import save_detr
from detr_ptq.ptq.apply import uniform_detr_policy
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.train import qat
from gmpq.errors import UserError
from gmpq.quant.policy import save_policy
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer

REFERENCE = Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The first images of the reference detector's train and held-out splits."""
    out = tmp_path_factory.mktemp("digits")
    make_digits_coco(out, seed=0, num_train=96, num_val=48)
    return out


def _cfg(digits: Path, out: Path, **kw) -> QATConfig:
    base = dict(checkpoint=str(REFERENCE), data_dir=str(digits), out_dir=str(out), epochs=1, max_steps_per_epoch=2,
                batch_size=4, calib_batches=2, eval_float=False, progress=False, tensorboard=False)
    return QATConfig(**{**base, **kw})


def test_refuses_to_train_uncalibrated(digits, tmp_path):
    with pytest.raises(UserError, match="not calibrated"):
        qat(_cfg(digits, tmp_path, calib_batches=0))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_short_qat_improves_ap_over_the_untrained_quantized_model(digits, tmp_path):
    """W3A3 (8-bit attention) with DA and FQM: 40 steps must beat the calibrated but untrained student."""
    result = qat(_cfg(digits, tmp_path, bits="3-3-8", align=True, fqm=True, max_steps_per_epoch=20, epochs=2,
                      lr=2e-4, eval_float=True))
    assert result["AP50"] > result["before"]["AP50"] + 0.05, result
    assert result["AP"] > result["before"]["AP"]
    assert result["float"]["AP50"] > result["AP50"]  # sanity: the float model is still better
    # The final checkpoint rebuilds its quantizers in `detr-ptq eval` and scores the same.
    # Same batch size as the run: batched GEMMs round differently and 3-bit grids amplify that.
    again = evaluate_checkpoint(tmp_path / "final.pth", digits, "val", batch_size=4, progress=False)
    assert again["AP"] == pytest.approx(result["AP"], abs=1e-9)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["train_fqm_selected"] > 0 for r in log)
    saved = json.loads((tmp_path / "policy.json").read_text())
    assert saved["layers"]["backbone.0.body.conv1"]["w_bits"] == 8  # first conv at 8 bits by default
    assert saved["layers"]["class_embed"]["w_bits"] == 32  # heads full precision by default
    assert saved["layers"]["transformer.decoder.layers.0.multihead_attn"]["attn_bits"] == 8
    with pytest.raises(UserError, match="is a `detr-ptq qat` result"):  # not a full-precision model
        qat(_cfg(digits, tmp_path / "again", teacher=str(tmp_path / "final.pth"), fqm=True))


def test_module_ablation_quantizes_only_the_listed_parts(digits, tmp_path):
    result = qat(_cfg(digits, tmp_path, quantize=["backbone"], max_steps_per_epoch=1))
    layers = json.loads((tmp_path / "policy.json").read_text())["layers"]
    quantized = {n for n, e in layers.items() if e["w_bits"] < 32}
    assert quantized and all(n.startswith("backbone.") for n in quantized)
    assert result["avg_w_bits"] < 32


def test_policy_seeds_qat_and_fills_activation_bits(digits, tmp_path):
    model, _, _ = build_detr(get_preset("detr_tiny"))
    policy = uniform_detr_policy(model, "detr_tiny", 5, ["class_embed", "bbox_embed.*"])  # weight-only, as PTQ
    save_policy(policy, tmp_path / "ilp.json")
    from detr_ptq.qat.setup import build_models
    from gmpq.runtime import DistInfo

    cfg = _cfg(digits, tmp_path / "run", policy=str(tmp_path / "ilp.json"), fill_a_bits=6, fill_attn_bits=7)
    student = build_models(cfg, DistInfo()).student
    conv = student.get_submodule("backbone.0.body.layer1.0.conv1")
    attn = student.get_submodule("transformer.encoder.layers.0.self_attn")
    assert isinstance(conv.w_quant, WeightQuantizer) and conv.w_quant.bits == 5 and conv.w_quant.method == "lsq"
    assert isinstance(conv.a_quant, ActQuantizer) and conv.a_quant.bits == 6 and conv.a_quant.method == "lsq+"
    assert attn.attn_quant.bits == 7 and attn.q_quant.bits == 7
    assert not isinstance(getattr(student.class_embed, "w_quant", None), WeightQuantizer)


def test_policy_with_unsupported_bits_is_refused(digits, tmp_path, capsys):
    model, _, _ = build_detr(get_preset("detr_tiny"))
    policy = uniform_detr_policy(model, "detr_tiny", 4, [])
    policy["layers"]["input_proj"]["w_bits"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(policy))
    rc = main(["qat", "--policy", str(tmp_path / "bad.json"), "--set", f"data_dir={digits}",
               "--set", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.json" in err and "w_bits=1" in err and "accepted values" in err
    with pytest.raises(UserError, match="attn_bits=1 .*accepted values"):
        QATConfig(bits="4-4-1")
    with pytest.raises(UserError, match="unknown part.*'decoder'.*accepted"):
        QATConfig(quantize=["backbone", "decoder"])


def test_teacher_that_does_not_match_is_refused(digits, tmp_path):
    cfg = get_preset("detr_tiny")
    cfg.num_queries = 7
    model, _, _ = build_detr(cfg)
    save_detr(tmp_path / "teacher.pth", model, cfg)
    with pytest.raises(UserError, match="teacher checkpoint .*num_queries: teacher 7 vs student 20"):
        qat(_cfg(digits, tmp_path / "run", fqm=True, teacher=str(tmp_path / "teacher.pth")))


@pytest.mark.slow
def test_distributed_two_cpu_processes(digits, tmp_path):
    out = tmp_path / "ddp"
    sets = [f"checkpoint={REFERENCE}", f"data_dir={digits}", f"out_dir={out}", "epochs=2", "max_steps_per_epoch=2",
            "batch_size=2", "calib_batches=1", "eval_images=8", "eval_float=false", "align=true", "fqm=true",
            "two_stage=true", "stage1_epochs=1", "device=cpu", "progress=false", "tensorboard=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "detr_ptq", "qat"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["epochs"] == 2 and result["AP50"] is not None
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert "stage 2: every part quantized" in proc.stdout


def test_grad_probe_logs_each_weighted_term_and_bad_value_is_refused(digits, tmp_path):
    """With ``grad_probe_every`` the log carries the gradient norm of every weighted term on the student (the
    distillation term among them, and not negligible next to the set loss); off by default."""
    qat(_cfg(digits, tmp_path, bits=4, fqm=True, grad_probe_every=1, max_steps_per_epoch=2))
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    grads = {k[5:]: v for k, v in log.items() if k.startswith("grad_")}
    assert {"distill", "loss_ce", "loss_bbox", "loss_giou"} <= set(grads), sorted(grads)
    assert all(v > 0 for v in grads.values())
    assert grads["distill"] > 0.01 * sum(grads.values())
    qat(_cfg(digits, tmp_path / "off", bits=4, max_steps_per_epoch=1))
    off = json.loads((tmp_path / "off" / "log.jsonl").read_text().splitlines()[-1])
    assert not any(k.startswith("grad_") for k in off)
    with pytest.raises(UserError, match="grad_probe_every=-1 must be >= 0"):
        _cfg(digits, tmp_path, grad_probe_every=-1)

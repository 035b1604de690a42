"""End to end on tiny images: policy -> quantized detector -> a few fine-tuning steps -> resume -> evaluate-det."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gmpq.cli import main
from gmpq.config import load_config
from gmpq.detection.config import DETECTOR_NAMES, DetFinetuneConfig
from gmpq.detection.train import finetune_det, load_finetuned
from gmpq.models import create_model
from gmpq.quant import is_quantized, save_policy, uniform_policy

sys.path.insert(0, str(Path(__file__).parent))
from test_detection_voc import write_tiny_voc  # noqa: E402

FAST_FRCNN = ["detector.min_size=128", "detector.max_size=160",
              "detector.options={box_batch_size_per_image: 32, rpn_pre_nms_top_n_train: 200, "
              "rpn_post_nms_top_n_train: 100, rpn_pre_nms_top_n_test: 100, rpn_post_nms_top_n_test: 50}"]
QUICK = ["data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0", "calib_batches=1", "warmup_iters=2",
         "progress=false", "tensorboard=true"]


def _policy(tmp_path: Path, model: str, keep: tuple[str, ...]) -> Path:
    with torch.device("meta"):
        net = create_model(model)
    path = tmp_path / f"{model}_w4a4.json"
    save_policy(uniform_policy(net, model, 4, 4, keep_full_precision=keep), path)
    return path


@pytest.mark.slow
def test_fasterrcnn_finetune_resume_and_evaluate_on_tiny_voc(tmp_path, capsys):
    root = write_tiny_voc(tmp_path, n_train=4, n_test=3)
    policy = _policy(tmp_path, "resnet18", ("conv1", "fc"))
    out = tmp_path / "run"
    args = ["finetune-det", "--detector", "fasterrcnn_resnet18_fpn", "--policy", str(policy), "--data",
            f"voc:{root}", "--out", str(out), "--epochs", "1"]
    sets = [*FAST_FRCNN, *QUICK, "data.train_splits=[VOC2007/trainval]", "max_steps_per_epoch=1"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    first = json.loads((out / "result.json").read_text())
    for f in ("config.yaml", "checkpoint.pt", "model_final.pt", "policy_detector.json", "log.jsonl"):
        assert (out / f).is_file(), f
    assert any((out / "tb").iterdir())
    assert first["n_images"] == 3 and first["n_boxes"] == 4 and first["test_data"]["difficult"] == 1
    assert 0.0 <= first["mAP"] <= 1.0 and 0.0 <= first["mAP_07"] <= 1.0 and 0.0 <= first["coco_AP"] <= 1.0
    assert first["mapped_layers"] == 20 and first["mapped_bops_g"] < first["mapped_float_bops_g"] / 10
    assert math.isfinite(json.loads((out / "log.jsonl").read_text().splitlines()[0])["train_loss"])

    # resume: a second epoch continues from checkpoint.pt
    assert main(args[:-2] + ["--epochs", "2", "--resume"] + [x for s in sets for x in ("--set", s)]) == 0
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    result = json.loads((out / "result.json").read_text())
    assert result["before_finetune_mAP"] == first["before_finetune_mAP"]  # carried over by the checkpoint

    # the saved model rebuilds quantized and scores the same detections
    model, cfg, classes = load_finetuned(str(out / "model_final.pt"))
    assert is_quantized(model.backbone.body.layer1[0].conv1) and not is_quantized(model.backbone.body.conv1)
    assert not is_quantized(model.roi_heads.box_predictor.cls_score)
    capsys.readouterr()
    assert main(["evaluate-det", "--checkpoint", str(out / "model_final.pt"), "--workers", "0", "--device", "cpu",
                 "--out", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["mAP"] == result["mAP"] and ev["coco_AP"] == result["coco_AP"]
    assert {k: v["n_det"] for k, v in ev["per_class"].items()} == {k: v["n_det"]
                                                                   for k, v in result["per_class"].items()}


def test_cli_errors_are_user_errors(tmp_path, capsys):
    root = write_tiny_voc(tmp_path, n_train=2, n_test=1)
    assert main(["finetune-det", "--data", f"voc:{root}", "--out", str(tmp_path / "x")]) == 2
    assert "finetune-det needs a policy" in capsys.readouterr().err
    vgg_policy = _policy(tmp_path, "vgg16", ())
    assert main(["finetune-det", "--policy", str(vgg_policy), "--data", f"voc:{root}", "--out", str(tmp_path / "y"),
                 "--set", "data.train_splits=[VOC2007/trainval]", "--set", "data.num_workers=0"]) == 2
    assert "the policy is for model 'vgg16', not 'resnet18'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.shared_data
def test_fasterrcnn_steps_on_coco_tiny(tmp_path, shared_data):
    policy = _policy(tmp_path, "resnet18", ("conv1", "fc"))
    cfg = load_config(DetFinetuneConfig, None, [
        *FAST_FRCNN, *QUICK, f"policy={policy}", "data.format=coco", f"data.root={shared_data / 'coco_tiny'}",
        "data.max_train_images=2", "data.max_test_images=2", "epochs=1", "max_steps_per_epoch=1",
        f"out_dir={tmp_path / 'coco'}", "tensorboard=false", "eval_before=false"])
    result = finetune_det(cfg)
    assert result["train_data"]["images"] == 2 and result["n_images"] == 2
    assert result["coco_AP"] is not None and 0.0 <= result["coco_AP"] <= 1.0


@pytest.mark.slow
def test_ssd300_one_step_on_tiny_voc(tmp_path):
    root = write_tiny_voc(tmp_path, n_train=2, n_test=1)
    policy = _policy(tmp_path, "vgg16", ("features.0", "classifier.6"))
    cfg = load_config(DetFinetuneConfig, None, [
        *QUICK, "detector.name=ssd300_vgg16", f"policy={policy}", f"data.root={root}", "data.batch_size=1",
        "data.train_splits=[VOC2007/trainval]", "epochs=1", "max_steps_per_epoch=1", f"out_dir={tmp_path / 'ssd'}",
        "tensorboard=false", "eval_before=false"])
    result = finetune_det(cfg)
    assert result["mapped_layers"] == 13 and result["input_size"] == [3, 300, 300]
    assert math.isfinite(result["seconds_per_iter"]) and 0.0 <= result["mAP"] <= 1.0
    model, _, _ = load_finetuned(str(tmp_path / "ssd" / "model_final.pt"))
    assert is_quantized(model.backbone.extra[0][5]) and not is_quantized(model.backbone.extra[1][0])


RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/det_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_resolve(recipe):
    cfg = load_config(DetFinetuneConfig, recipe)
    assert cfg.detector.name in DETECTOR_NAMES and cfg.epochs >= 1

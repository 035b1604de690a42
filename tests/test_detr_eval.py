"""COCO evaluation on real data, the eval verb end to end, and the committed reference detector (training, resume and
the NaN stop: tests/test_stages_detr.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from detr_ptq.cli import main
from detr_ptq.data.coco import CocoDetection, coco_paths
from detr_ptq.data.digits_coco import DigitsConfig, make_split
from detr_ptq.data.transforms import DetrTransform, collate
from detr_ptq.engine.evaluate import to_coco_detections
from detr_ptq.engine.pretrain_backbone import object_crops
from detr_ptq.models import build_detr, get_preset
from detr_ptq.models.checkpoint import save_detr
from detr_ptq.models.postprocess import PostProcess
from gmpq.detection.pycoco import coco_evaluate

ASSET = Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth"
REFERENCE_SEED, REFERENCE_VAL_IMAGES = 0, 500


def _oracle_outputs(targets: list[dict], num_queries: int, num_classes: int) -> dict:
    """DETR outputs that put every ground-truth box and label on a query and no-object on the rest."""
    logits = torch.full((len(targets), num_queries, num_classes + 1), -10.0)
    logits[:, :, num_classes] = 10.0
    boxes = torch.full((len(targets), num_queries, 4), 0.5)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        logits[i, torch.arange(n), num_classes] = -10.0
        logits[i, torch.arange(n), t["labels"]] = 10.0
        boxes[i, :n] = t["boxes"]
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_coco_tiny_ground_truth_predictions_give_ap_1(shared_data):
    """Ground truth through the whole path (official-style resize, normalized boxes, PostProcess back to
    original pixels, pycocotools on json files without info/licenses) scores AP = 1."""
    ann, img_dir, split = coco_paths(shared_data / "coco_tiny")
    assert split == "val2017"
    assert "info" not in json.loads(ann.read_text())
    dataset = CocoDetection(img_dir, ann, DetrTransform(256, 400))
    detections = []
    for _, _, targets in DataLoader(dataset, 8, collate_fn=collate):
        results = PostProcess()(_oracle_outputs(targets, 100, 91), torch.stack([t["orig_size"] for t in targets]))
        detections += to_coco_detections(targets, results)
    metrics = coco_evaluate(dataset.coco, detections)
    assert metrics == {k: pytest.approx(1.0) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    # and dropping half the detections costs AP, so the check can fail
    assert coco_evaluate(dataset.coco, detections[::2])["AP"] < 0.9


def test_eval_verb_writes_json(tmp_path, capsys):
    make_split(tmp_path / "d", "val", 6, seed=1, cfg=DigitsConfig())
    ckpt = tmp_path / "tiny.pth"
    save_detr(ckpt, build_detr(get_preset("detr_tiny"))[0], get_preset("detr_tiny"),
              train_config={"min_size": 96, "max_size": 96})
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--coco-dir", str(tmp_path / "d"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "val" and result["images"] == 6 and result["config"] == "detr_tiny"
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(result)
    assert "AP50" in capsys.readouterr().out
    # a mismatched --config is a user error (exit 2) listing the grouped key problems
    assert main(["eval", "--checkpoint", str(ckpt), "--coco-dir", str(tmp_path / "d"), "--config", "detr_r50"]) == 2
    assert "missing keys" in capsys.readouterr().err


def test_object_crops_are_centred_on_the_boxes(tmp_path):
    coco = make_split(tmp_path, "train", 3, seed=5, cfg=DigitsConfig())
    ds = CocoDetection(tmp_path / "train", coco, DetrTransform(96, 96))
    crops, labels = object_crops(ds, 56)
    assert crops.shape == (len(coco["annotations"]), 3, 56, 56) and crops.dtype == torch.uint8
    assert labels.tolist() == [a["category_id"] for a in coco["annotations"]]
    from PIL import Image
    first = coco["annotations"][0]
    image = torch.as_tensor(np.array(Image.open(tmp_path / "train" / "000000.png").convert("RGB")))
    x, y, w, h = first["bbox"]
    x0 = int(min(max(round(x + w / 2 - 28), 0), 96 - 56))
    y0 = int(min(max(round(y + h / 2 - 28), 0), 96 - 56))
    assert torch.equal(crops[0], image[y0:y0 + 56, x0:x0 + 56].permute(2, 0, 1))


@pytest.mark.slow
def test_reference_checkpoint_reproduces_reported_ap50(tmp_path):
    """Regenerate the held-out split by seed and evaluate the committed detector (docs/detr.md reports
    AP 0.3891, AP50 0.7624)."""
    raw = torch.load(ASSET, map_location="cpu", weights_only=False)
    reported = raw["metrics"]
    assert ASSET.stat().st_size <= 10 * 1024 * 1024
    make_split(tmp_path, "val", REFERENCE_VAL_IMAGES, seed=REFERENCE_SEED, cfg=DigitsConfig())
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(ASSET), "--coco-dir", str(tmp_path), "--out", str(out),
                 "--batch-size", "16"]) == 0
    result = json.loads(out.read_text())
    assert result["AP50"] == pytest.approx(reported["AP50"], abs=0.01)
    assert result["AP"] == pytest.approx(reported["AP"], abs=0.01)
    assert reported["AP50"] == pytest.approx(0.7624, abs=1e-4)

"""``init_detector``: a policy-quantized detector starts from a trained float detector (its weights, by name; the
activations calibrated afterwards), a checkpoint that does not fit fails with the key lists, and the pretrained
backbone layers (only those) train at ``lr_backbone``."""

from __future__ import annotations

import pytest
import torch

from gmpq.config import load_config
from gmpq.detection.config import DetectorConfig, DetFinetuneConfig
from gmpq.detection.detectors import build_detector, load_detector_weights
from gmpq.detection.train import _optimizer, finetune_det, quantize_detector
from gmpq.errors import UserError
from gmpq.models import create_model
from gmpq.quant import save_policy, uniform_policy

CLASSES = [str(d) for d in range(10)]
TINY = DetectorConfig(name="ssdlite_mobilenet_v2", size=64, frozen_bn=True)


def _policy(w_bits: int, a_bits: int | None) -> dict:
    with torch.device("meta"):
        net = create_model("mobilenetv2")
    return uniform_policy(net, "mobilenetv2", w_bits, a_bits, keep_full_precision=("features.0.0", "classifier.1"))


def _float_checkpoint(path, seed: int = 1, classes: list[str] = CLASSES) -> dict:
    """A float SSDLite state dict saved as ``finetune-det`` saves model_final.pt (model + class names)."""
    torch.manual_seed(seed)
    state = build_detector(TINY, len(classes) + 1).state_dict()
    torch.save({"model": state, "class_names": classes, "policy": {}, "config": {}}, path)
    return state


@pytest.fixture
def digits(tmp_path):
    from detr_ptq.data.digits_coco import make_digits_coco

    make_digits_coco(tmp_path / "digits", seed=0, num_train=4, num_val=0)
    return tmp_path / "digits"


def test_finetune_det_starts_from_the_float_detector(tmp_path, digits, one_thread):
    """With zero training epochs, model_final.pt of a W4A4 run from ``init_detector`` holds exactly the float
    checkpoint's tensors under the same names, plus calibrated activation quantizers of the backbone."""
    state = _float_checkpoint(tmp_path / "float.pt")
    save_policy(_policy(4, 4), tmp_path / "w4a4.json")
    cfg = load_config(DetFinetuneConfig, None, [
        "detector.name=ssdlite_mobilenet_v2", "detector.size=64", "data.format=coco", f"data.root={digits}",
        "data.train_splits=[train]", "data.test_split=train", "data.batch_size=2", "data.num_workers=0",
        f"policy={tmp_path / 'w4a4.json'}", f"init_detector={tmp_path / 'float.pt'}", "epochs=0",
        "calib_batches=1", "eval_before=false", "progress=false", "tensorboard=false", f"out_dir={tmp_path / 'run'}"])
    finetune_det(cfg)
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=False)
    assert final["config"]["detector"]["frozen_bn"] is True  # resolved from init_detector
    for key, value in state.items():
        assert torch.equal(final["model"][key], value), key
    extra = sorted(set(final["model"]) - set(state))
    assert extra and all(".a_quant." in k or ".w_quant." in k for k in extra), extra[:5]
    alphas = {k: v for k, v in final["model"].items() if k.endswith("a_quant.initialized")}
    assert alphas and all(bool(v) for v in alphas.values())  # calibrated
    assert final["model"]["backbone.features.1.conv.0.0.a_quant.alpha"].item() != 0


def test_a_checkpoint_that_does_not_fit_fails_with_the_key_lists(tmp_path):
    torch.manual_seed(0)
    model = build_detector(TINY, 11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _float_checkpoint(tmp_path / "ok.pt")
    state["backbone.features.99.weight"] = torch.zeros(1)
    del state["head.regression_head.module_list.0.1.weight"]
    torch.save(state, tmp_path / "bad.pt")  # a plain state dict is accepted when it fits
    with pytest.raises(UserError) as e:
        load_detector_weights(model, str(tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "bad.pt" in msg and "does not fit this detector" in msg
    assert "missing from the file (1): head.regression_head.module_list.0.1.weight" in msg
    assert "not in the detector (1): backbone.features.99.weight" in msg
    _float_checkpoint(tmp_path / "three.pt", classes=["a", "b", "c"])  # a head for 3 classes: shape mismatches
    with pytest.raises(UserError, match=r"shape mismatches \(\d+\): head\.classification_head"):
        load_detector_weights(model, str(tmp_path / "three.pt"))
    with pytest.raises(UserError, match=r"trained on the classes \['a', 'b', 'c'\], the data has the classes \['0'"):
        load_detector_weights(model, str(tmp_path / "three.pt"), CLASSES)
    with pytest.raises(UserError, match="init_detector: .*nope.pt' does not exist"):
        load_detector_weights(model, str(tmp_path / "nope.pt"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded on failure


def test_lr_backbone_applies_to_the_classifier_layers_only(one_thread):
    """SSDLite: MobileNetV2 ``features`` (and their quantizers) at lr_backbone; extra layers and heads at lr."""
    model = build_detector(TINY, 11)
    quantize_detector(model, _policy(4, 4), DetFinetuneConfig(detector=TINY), "test policy")
    opt = _optimizer(model, DetFinetuneConfig(detector=TINY, lr=0.04, lr_backbone=0.003))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["lr"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.04, 0.003}
    assert groups[0.003] == {n for n in names.values() if n.startswith("backbone.features.")}
    assert "backbone.features.1.conv.0.0.a_quant.alpha" in groups[0.003]
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in groups[0.04]} == {
        "backbone.extra", "head.classification_head", "head.regression_head"}

"""SSDLite and Faster R-CNN on the ImageNet MobileNetV2 (gmpq model ``mobilenetv2``): the backbone is exactly the
classifier's ``features`` under a prefix (policy names and state-dict keys), the ImageNet weights load strictly and
the backbone then computes what the classifier computes, and policies or weights of other networks are refused."""

from __future__ import annotations

import pytest
import torch

from gmpq.detection.config import DetectorConfig
from gmpq.detection.detectors import build_detector, load_backbone_weights
from gmpq.detection.mapping import map_name, map_policy, source_network
from gmpq.errors import UserError
from gmpq.models import create_model
from gmpq.quant import quantizable_layers, uniform_policy

PREFIX = {"ssdlite_mobilenet_v2": "backbone.features.", "fasterrcnn_mobilenet_v2_fpn": "backbone.body."}
WEIGHTS = "imagenet/mobilenet_v2_imagenet.pth"


@pytest.fixture(scope="module")
def detectors():
    with torch.device("meta"):
        return {name: build_detector(DetectorConfig(name=name, min_size=128, max_size=160), 11) for name in PREFIX}


@pytest.mark.parametrize("detector", sorted(PREFIX))
def test_backbone_layers_are_exactly_the_classifier_layers(detector, detectors):
    """Every quantizable layer of mobilenetv2 but the classifier maps onto a layer of the same type and weight shape
    under the prefix, and the prefix holds no other quantizable layer (nothing extra, nothing missing)."""
    src = quantizable_layers(source_network(detector))
    det = quantizable_layers(detectors[detector])
    mapped = {n: map_name(detector, n) for n in src}
    assert [n for n, t in mapped.items() if t is None] == ["classifier.1"]
    targets = {t: src[n] for n, t in mapped.items() if t is not None}
    assert set(targets) == {n for n in det if n.startswith(PREFIX[detector])}
    assert len(targets) == 52
    for name, layer in targets.items():
        assert type(det[name]) is type(layer) and det[name].weight.shape == layer.weight.shape, name
        assert (det[name].stride, det[name].groups) == (layer.stride, layer.groups), name


def test_known_names():
    assert map_name("ssdlite_mobilenet_v2", "features.14.conv.1.0") == "backbone.features.14.conv.1.0"
    assert map_name("fasterrcnn_mobilenet_v2_fpn", "features.0.0.weight") == "backbone.body.0.0.weight"
    assert map_name("fasterrcnn_mobilenet_v2_fpn", "classifier.1") is None
    with pytest.raises(UserError, match="'conv_stem' is not a layer of 'mobilenetv2'"):
        map_name("ssdlite_mobilenet_v2", "conv_stem")


@pytest.mark.parametrize("detector", sorted(PREFIX))
def test_uniform_policy_maps_with_its_bits(detector, detectors):
    src = source_network(detector)
    policy = uniform_policy(src, "mobilenetv2", 4, 4, keep_full_precision=("features.0.0", "classifier.1"))
    out = map_policy(policy, detector, detectors[detector])
    mapped = {n: e for n, e in out["layers"].items() if "source_layer" in e}
    assert len(mapped) == 52 and out["summary"]["dropped_layers"] == ["classifier.1"]
    assert (mapped[PREFIX[detector] + "0.0"]["w_bits"], mapped[PREFIX[detector] + "0.0"]["a_bits"]) == (32, None)
    assert sum((e["w_bits"], e["a_bits"]) == (4, 4) for e in mapped.values()) == 51
    rest = [e for e in out["layers"].values() if "source_layer" not in e]
    assert rest and all(e == {"w_bits": 32, "a_bits": None} for e in rest)  # extra layers, heads, FPN


@pytest.mark.parametrize("other", ["resnet18", "mobilenetv2_100"])
def test_policy_for_another_backbone_fails_with_the_unmatched_names(other, detectors):
    with torch.device("meta"):
        net = create_model(other)
    policy = uniform_policy(net, other, 4, 4)
    with pytest.raises(UserError) as e:
        map_policy(policy, "ssdlite_mobilenet_v2", detectors["ssdlite_mobilenet_v2"], source="policy.json")
    msg = str(e.value)
    assert f"the policy is for model {other!r}, not 'mobilenetv2'" in msg
    first_other = next(iter(quantizable_layers(net)))  # conv1 (resnet18) / conv_stem (timm mobilenetv2_100)
    assert f"layer(s) in the policy are not in the model: ['{first_other}" in msg
    assert "quantizable layer(s) of the model are not in the policy" in msg and "'features.14.conv.0.0'" in msg


def test_weights_of_another_network_are_refused(tmp_path, detectors):
    torch.save(create_model("resnet18").state_dict(), tmp_path / "r18.pt")
    with torch.device("meta"):
        det = build_detector(DetectorConfig(name="ssdlite_mobilenet_v2"), 11)
    with pytest.raises(UserError, match=r"not parameters of 'mobilenetv2' and cannot map .*'conv1.weight'"):
        load_backbone_weights(det, "ssdlite_mobilenet_v2", str(tmp_path / "r18.pt"))


@pytest.mark.shared_data
@pytest.mark.parametrize("detector", sorted(PREFIX))
def test_imagenet_weights_load_strictly_and_the_backbone_computes_the_classifier(detector, shared_data, one_thread):
    path = shared_data / WEIGHTS
    clf = create_model("mobilenetv2", weights=str(path)).eval()
    state = clf.state_dict()
    # frozen_bn=False keeps nn.BatchNorm2d (eval mode), so the detector's backbone runs the classifier's exact ops
    det = build_detector(DetectorConfig(name=detector, backbone_weights=str(path), frozen_bn=False), 11).eval()
    own = det.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(own[PREFIX[detector] + key.removeprefix("features.")], value), key
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = clf.features(x)
        if detector == "ssdlite_mobilenet_v2":  # SSDLite's first two maps: features.14's expansion, features.18
            maps = det.backbone(x)
            assert torch.equal(maps["0"], clf.features[14].conv[0](clf.features[:14](x)))
            assert [tuple(m.shape[1:]) for m in maps.values()] == [(576, 20, 20), (1280, 10, 10), (512, 5, 5),
                                                                    (256, 3, 3), (256, 2, 2), (128, 1, 1)]
        else:  # the FPN's inputs: features.13 and features.18
            maps = det.backbone.body(x)
            assert torch.equal(maps["0"], clf.features[:14](x))
        assert torch.equal(maps["1"], ref)
    # by default, with weights, BN statistics are frozen: the folded ImageNet BN is identity + bias either way
    frozen = build_detector(DetectorConfig(name=detector, backbone_weights=str(path)), 11).eval()
    assert type(dict(frozen.named_modules())[PREFIX[detector] + "0.1"]).__name__ == "FrozenBatchNorm2d"
    with torch.no_grad():
        out = frozen.backbone(x) if detector == "ssdlite_mobilenet_v2" else frozen.backbone.body(x)
    torch.testing.assert_close(out["1"], ref, rtol=1e-4, atol=1e-4)  # same math, another float op order


@pytest.mark.slow  # about 25 s of CPU
@pytest.mark.shared_data
def test_digits_finetune_improves_ap50_and_other_categories_are_refused(tmp_path, shared_data, one_thread, capsys):
    """30 SGD steps of SSDLite from the ImageNet backbone on 8 digits images raise AP50 on those images well above
    the untrained detector's; evaluating its checkpoint on COCO data (80 other categories) fails naming both lists."""
    from detr_ptq.data.digits_coco import make_digits_coco
    from gmpq.cli import main
    from gmpq.config import load_config
    from gmpq.detection.config import DetFinetuneConfig
    from gmpq.detection.train import finetune_det
    from gmpq.quant import save_policy

    make_digits_coco(tmp_path / "digits", seed=0, num_train=8, num_val=0)
    with torch.device("meta"):
        policy = uniform_policy(create_model("mobilenetv2"), "mobilenetv2", 32, None)  # float
    save_policy(policy, tmp_path / "float.json")
    cfg = load_config(DetFinetuneConfig, None, [
        "detector.name=ssdlite_mobilenet_v2", "detector.size=96", f"detector.backbone_weights={shared_data / WEIGHTS}",
        "data.format=coco", f"data.root={tmp_path / 'digits'}", "data.train_splits=[train]", "data.test_split=train",
        "data.flip=false", "data.batch_size=8", "data.num_workers=0", f"policy={tmp_path / 'float.json'}",
        "epochs=30", "lr=0.003", "weight_decay=0", "warmup_iters=3", "milestones=[1.0]", "calib_batches=1",
        "eval_every=30", "progress=false", "tensorboard=false", f"out_dir={tmp_path / 'run'}"])
    result = finetune_det(cfg)
    assert result["steps_per_epoch"] == 1 and result["n_images"] == 8
    # measured: AP50 0.13 after (classes are learned slowly; boxes first), about 0 untrained
    assert result["coco_AP50"] > result["before_finetune_coco_AP50"] + 0.05, result
    assert result["mAP"] > result["before_finetune_mAP"] + 0.05, result
    capsys.readouterr()
    assert main(["evaluate-det", "--checkpoint", str(tmp_path / "run" / "model_final.pt"), "--data",
                 f"coco:{shared_data / 'coco_tiny'}", "--split", "val2017", "--workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'person', 'bicycle'" in err and "['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']" in err, err

"""Name mapping from the classification networks (timm resnet18, torchvision vgg16) onto the real torchvision
detectors: every mapped layer exists, is quantizable and has the same weight shape; the classifier is dropped."""

from __future__ import annotations

import pytest
import torch

from gmpq.detection.config import DetectorConfig
from gmpq.detection.detectors import build_detector, load_backbone_weights
from gmpq.detection.mapping import map_name, map_policy, map_state_dict, source_network
from gmpq.errors import UserError
from gmpq.models import create_model
from gmpq.quant import make_policy, quantizable_layers, uniform_policy

CASES = {  # detector -> (source model, dropped source layers, number of mapped layers)
    "fasterrcnn_resnet18_fpn": ("resnet18", ["fc"], 20),
    "ssd300_vgg16": ("vgg16", ["classifier.0", "classifier.3", "classifier.6"], 13),
}


@pytest.fixture(scope="module")
def detectors():
    with torch.device("meta"):  # the real torchvision modules, without allocating or initialising weights
        return {name: build_detector(DetectorConfig(name=name, min_size=128, max_size=160), 4) for name in CASES}


@pytest.mark.parametrize("detector", sorted(CASES))
def test_every_source_layer_maps_onto_a_quantizable_layer_of_the_same_shape(detector, detectors):
    src_name, dropped, n_mapped = CASES[detector]
    det = detectors[detector]
    det_layers = quantizable_layers(det)
    src_layers = quantizable_layers(source_network(detector))
    mapped = {}
    for name, layer in src_layers.items():
        target = map_name(detector, name)
        if target is None:
            continue
        assert target in det_layers, f"{name} -> {target} is not a quantizable layer of {detector}"
        assert type(det_layers[target]) is type(layer) and det_layers[target].weight.shape == layer.weight.shape
        mapped[name] = target
    assert sorted(set(src_layers) - set(mapped)) == dropped
    assert len(mapped) == n_mapped and len(set(mapped.values())) == n_mapped


def test_known_names():
    assert map_name("fasterrcnn_resnet18_fpn", "layer2.0.downsample.0") == "backbone.body.layer2.0.downsample.0"
    assert map_name("fasterrcnn_resnet18_fpn", "conv1") == "backbone.body.conv1"
    assert map_name("ssd300_vgg16", "features.21") == "backbone.features.21"  # conv4_3
    assert map_name("ssd300_vgg16", "features.24") == "backbone.extra.0.1"  # conv5_1
    assert map_name("ssd300_vgg16", "features.28.weight") == "backbone.extra.0.5.weight"  # conv5_3
    assert map_name("ssd300_vgg16", "classifier.0") is None
    with pytest.raises(UserError, match="'layer9.conv' is not a layer of 'resnet18'"):
        map_name("fasterrcnn_resnet18_fpn", "layer9.conv")


@pytest.mark.parametrize("detector", sorted(CASES))
def test_map_policy_keeps_bits_and_leaves_the_rest_full_precision(detector, detectors):
    src_name, dropped, n_mapped = CASES[detector]
    src = source_network(detector)
    first = next(iter(quantizable_layers(src)))
    policy = uniform_policy(src, src_name, 4, 3, keep_full_precision=(first,))
    det = detectors[detector]
    out = map_policy(policy, detector, det)
    layers = out["layers"]
    assert set(layers) == set(quantizable_layers(det)) and out["model"] == detector
    mapped = {n: e for n, e in layers.items() if "source_layer" in e}
    assert len(mapped) == n_mapped
    assert layers[map_name(detector, first)]["w_bits"] == 32
    assert all((e["w_bits"], e["a_bits"]) == (4, 3) for n, e in mapped.items() if e["source_layer"] != first)
    rest = [e for e in layers.values() if "source_layer" not in e]
    assert rest and all(e == {"w_bits": 32, "a_bits": None} for e in rest)
    assert out["summary"]["dropped_layers"] == dropped
    eight = map_policy(policy, detector, det, rest_w_bits=8, rest_a_bits=8)
    assert all((e["w_bits"], e["a_bits"]) == (8, 8) for e in eight["layers"].values() if "source_layer" not in e)


def test_policy_that_does_not_fit_lists_every_offending_name(detectors):
    det = detectors["fasterrcnn_resnet18_fpn"]
    src = source_network("fasterrcnn_resnet18_fpn")
    layers = {n: {"w_bits": 4, "a_bits": 4} for n in quantizable_layers(src) if n != "layer3.1.conv2"}
    layers["layer3.9.conv1"] = {"w_bits": 4, "a_bits": 4}
    with pytest.raises(UserError) as e:
        map_policy(make_policy("resnet18", layers, "test"), "fasterrcnn_resnet18_fpn", det)
    assert "layer3.9.conv1" in str(e.value) and "layer3.1.conv2" in str(e.value)
    wrong_model = make_policy("resnet20", {"conv1": {"w_bits": 4, "a_bits": 4}}, "test")
    with pytest.raises(UserError, match="the policy is for model 'resnet20', not 'resnet18'"):
        map_policy(wrong_model, "fasterrcnn_resnet18_fpn", det)


def test_backbone_weights_load_by_name(tmp_path, detectors):
    state = create_model("resnet18").state_dict()
    torch.save(state, tmp_path / "r18.pt")
    det = build_detector(DetectorConfig(backbone_weights=str(tmp_path / "r18.pt"), min_size=128, max_size=160), 3)
    body = det.backbone.body
    assert torch.equal(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"  # frozen statistics by default with loaded weights
    del state["layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"backbone weights missing from the file \(1\): backbone.body.layer4.1.conv2"):
        load_backbone_weights(det, "fasterrcnn_resnet18_fpn", str(tmp_path / "partial.pt"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "head.weight": torch.zeros(1)}, tmp_path / "alien.pt")
    with pytest.raises(UserError, match=r"not parameters of 'resnet18' .*'head.weight'"):
        load_backbone_weights(det, "fasterrcnn_resnet18_fpn", str(tmp_path / "alien.pt"))


def test_vgg16_state_dict_maps_onto_ssd_with_matching_shapes(detectors):
    ssd = detectors["ssd300_vgg16"].state_dict()
    mapped, dropped = map_state_dict("ssd300_vgg16", source_network("ssd300_vgg16").state_dict())
    assert len(mapped) == 26 and all(ssd[k].shape == v.shape for k, v in mapped.items())
    assert sorted(dropped) == sorted(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))

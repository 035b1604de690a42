"""DETR model: the official R50 parameter layout, strict reloads, auxiliary outputs, checkpoint errors."""

from __future__ import annotations

import pytest
import torch

from detr_ptq.models import DETR_PRESETS, build_detr, get_preset
from detr_ptq.models.checkpoint import load_detr, load_state_strict, read_state_dict, save_detr
from gmpq.errors import UserError


def official_r50_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``detr-r50-e632da11.pth["model"]``, written from the published architecture (ResNet-50
    bottlenecks [3, 4, 6, 3], d_model 256, FFN 2048, 6+6 layers, 100 queries, 91 classes + no-object)."""
    s: dict[str, tuple[int, ...]] = {}

    def conv(name: str, o: int, i: int, k: int) -> None:
        s[f"{name}.weight"] = (o, i, k, k)

    def frozen_bn(name: str, c: int) -> None:
        for t in ("weight", "bias", "running_mean", "running_var"):
            s[f"{name}.{t}"] = (c,)

    def linear(name: str, o: int, i: int) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i), (o,)

    def norm(name: str) -> None:
        s[f"{name}.weight"], s[f"{name}.bias"] = (256,), (256,)

    def attn(name: str) -> None:
        s[f"{name}.in_proj_weight"], s[f"{name}.in_proj_bias"] = (768, 256), (768,)
        linear(f"{name}.out_proj", 256, 256)

    body = "backbone.0.body"
    conv(f"{body}.conv1", 64, 3, 7)
    frozen_bn(f"{body}.bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for j in range(blocks):
            p = f"{body}.layer{li}.{j}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            frozen_bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            frozen_bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            frozen_bn(f"{p}.bn3", planes * 4)
            if j == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                frozen_bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    s["input_proj.weight"], s["input_proj.bias"] = (256, 2048, 1, 1), (256,)
    s["query_embed.weight"] = (100, 256)
    for i in range(6):
        p = f"transformer.encoder.layers.{i}"
        attn(f"{p}.self_attn")
        linear(f"{p}.linear1", 2048, 256)
        linear(f"{p}.linear2", 256, 2048)
        norm(f"{p}.norm1")
        norm(f"{p}.norm2")
    for i in range(6):
        p = f"transformer.decoder.layers.{i}"
        attn(f"{p}.self_attn")
        attn(f"{p}.multihead_attn")
        linear(f"{p}.linear1", 2048, 256)
        linear(f"{p}.linear2", 256, 2048)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{p}.{n}")
    norm("transformer.decoder.norm")
    linear("class_embed", 92, 256)
    linear("bbox_embed.layers.0", 256, 256)
    linear("bbox_embed.layers.1", 256, 256)
    linear("bbox_embed.layers.2", 4, 256)
    return s


@pytest.fixture(scope="module")
def r50():
    return build_detr(get_preset("detr_r50"))[0]


def test_r50_state_dict_equals_official_layout(r50):
    got = {k: tuple(v.shape) for k, v in r50.state_dict().items()}
    want = official_r50_layout()
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}


def test_r50_trainable_parameter_count_matches_official_log(r50):
    # The official main.py logs "number of params: 41302368" (trainable only: conv1 and layer1 stay frozen).
    assert sum(p.numel() for p in r50.parameters() if p.requires_grad) == 41_302_368
    assert not r50.backbone[0].body.conv1.weight.requires_grad
    assert r50.backbone[0].body.layer2[0].conv1.weight.requires_grad


def test_r50_checkpoint_round_trip_strict(r50, tmp_path, capsys):
    path = tmp_path / "r50.pth"
    torch.save({"model": r50.state_dict()}, path)
    model, criterion, post, cfg = load_detr(path, "detr_r50")
    assert cfg.name == "detr_r50"
    assert "dict with key 'model'" in capsys.readouterr().out
    for k, v in r50.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", sorted(DETR_PRESETS))
def test_aux_outputs_count_and_shapes(name):
    cfg = get_preset(name)
    if name == "detr_r50":  # a full R50 forward is too slow for CI; shrink the transformer only
        cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward = 1, 3, 64
    model = build_detr(cfg)[0].eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # second image padded on the right
    with torch.no_grad():
        out = model(images, mask)
    q, k = cfg.num_queries, cfg.num_classes + 1
    assert out["pred_logits"].shape == (2, q, k)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, k) and aux["pred_boxes"].shape == (2, q, 4)


def test_tiny_checkpoint_round_trip_with_stored_config(tmp_path, capsys):
    model = build_detr(get_preset("detr_tiny"))[0]
    save_detr(tmp_path / "t.pth", model, get_preset("detr_tiny"))
    loaded, _, _, cfg = load_detr(tmp_path / "t.pth")
    assert cfg == get_preset("detr_tiny")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    load_detr(tmp_path / "bare.pth", "detr_tiny")
    assert "bare state dict (no 'model' key)" in capsys.readouterr().out


def test_mismatched_checkpoint_lists_every_problem_grouped():
    model = build_detr(get_preset("detr_tiny"))[0]
    state = model.state_dict()
    state.pop("query_embed.weight")
    state.pop("class_embed.bias")
    state["extra.weight"] = torch.zeros(1)
    state["class_embed.weight"] = torch.zeros(5, 128)
    with pytest.raises(UserError) as e:
        load_state_strict(model, state, "checkpoint 'x.pth'")
    msg = str(e.value)
    assert "missing keys (2): class_embed.bias, query_embed.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatches (1): class_embed.weight: checkpoint [5, 128] vs model [12, 128]" in msg


def test_bad_checkpoint_files(tmp_path):
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "args": "x"}, tmp_path / "nomodel.pth")
    with pytest.raises(UserError, match="no 'model' state dict"):
        read_state_dict(tmp_path / "nomodel.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_unknown_preset_lists_names():
    with pytest.raises(UserError, match=r"accepted: \['detr_r50', 'detr_tiny'\]"):
        get_preset("detr_r101")

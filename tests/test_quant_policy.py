"""The policy file: round trip, schema errors, validation against a model (one error listing everything)."""

import json

import pytest
from torch import nn

from gmpq.errors import UserError
from gmpq.quant import (
    FORMAT,
    QConv2d,
    apply_policy,
    layer_bits,
    load_policy,
    make_policy,
    resolve_policy,
    save_policy,
    uniform_policy,
)


def net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def good_policy() -> dict:
    layers = {"0": {"w_bits": 32, "a_bits": None}, "3": {"w_bits": 3, "a_bits": 4, "w_probs": [0.1, 0.9]},
              "6": {"w_bits": 8, "a_bits": 8, "trace": 1.5}}
    return make_policy("net", layers, "hand", summary={"note": "x"}, author="me")


def test_round_trip_preserves_extra_fields(tmp_path):
    p = good_policy()
    save_policy(p, tmp_path / "p.json")
    q = load_policy(tmp_path / "p.json")
    assert q == p
    assert q["format"] == FORMAT and q["layers"]["3"]["w_probs"] == [0.1, 0.9] and q["created_by"]["author"] == "me"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_not_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json.*not valid JSON.*line 1"):
        load_policy(f)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_policy(tmp_path / "none.json")


def test_schema_errors_name_every_field(tmp_path):
    bad = {"format": "gmpq-policy/0", "created_by": {}, "layers": {
        "a": {"w_bits": 9, "a_bits": 4}, "b": {"a_bits": 1}, "c": {"w_bits": 4, "a_bits": "x"}, "d": 3,
        "e": {"w_bits": 4, "a_bits": None, "w_method": "foo"}}}
    f = tmp_path / "p.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(UserError) as e:
        load_policy(f)
    msg = str(e.value)
    for text in (str(f), "'format' is 'gmpq-policy/0'", "'gmpq-policy/1'", "field 'model'", "'created_by'",
                 "layers['a']: w_bits=9", "[2, 3, 4, 5, 6, 7, 8, 32]", "layers['b']: missing field 'w_bits'",
                 "layers['b']: a_bits=1", "or null", "layers['c']: a_bits='x'", "layers['d']: must be an object",
                 "w_method='foo'", "['symmetric', 'lsq']"):
        assert text in msg, text


def test_validation_lists_unknown_nonquantizable_and_uncovered():
    p = make_policy("net", {"0": {"w_bits": 4, "a_bits": 4}, "1": {"w_bits": 4, "a_bits": 4},
                            "layer.9": {"w_bits": 4, "a_bits": 4}, "66": {"w_bits": 4, "a_bits": 4}}, "hand")
    with pytest.raises(UserError) as e:
        resolve_policy(p, net(), model_name="other")
    msg = str(e.value)
    assert "for model 'net', not 'other'" in msg
    assert "not in the model" in msg and "'layer.9'" in msg and "66 (did you mean 6?)" in msg
    assert "1 (BatchNorm2d)" in msg
    assert "not in the policy" in msg and "['3', '6']" in msg


def test_default_covers_unlisted_layers():
    p = make_policy("net", {"0": {"w_bits": 32, "a_bits": None}}, "hand", default={"w_bits": 4, "a_bits": 6})
    assert layer_bits(p, net()) == {"0": (32, None), "3": (4, 6), "6": (4, 6)}


def test_apply_policy_quantizes_per_layer_and_skips_full_precision():
    model = apply_policy(net(), good_policy())
    assert not isinstance(model[0], QConv2d)
    assert model[3].w_quant.bits == 3 and model[3].a_quant.bits == 4 and model[6].w_quant.bits == 8


def test_per_layer_method_override():
    p = good_policy()
    p["layers"]["3"]["w_method"] = "lsq"
    model = apply_policy(net(), p, w_method="symmetric")
    assert model[3].w_quant.method == "lsq" and model[6].w_quant.method == "symmetric"


def test_uniform_policy_and_bad_bits():
    p = uniform_policy(net(), "net", 4, None, keep_full_precision=("0",))
    assert p["layers"]["0"] == {"w_bits": 32, "a_bits": None} and p["layers"]["3"] == {"w_bits": 4, "a_bits": None}
    with pytest.raises(UserError, match="w_bits=1"):
        uniform_policy(net(), "net", 1, 4)


def test_random_policy_hits_bops_target_and_is_seeded():
    import timm

    from gmpq.quant import cost_summary
    from gmpq.quant.random_policy import random_policy

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    size = (3, 32, 32)
    keep = ("conv1", "fc")
    for target_g in (2.8, 3.3, 4.0):  # feasible: 2.61 .. 4.69 G (the 32-bit first conv alone is 1.8 G)
        p = random_policy(model, "resnet18", target_g * 1e9, size, seed=3, candidates=(2, 3, 4, 5, 6, 7, 8),
                          keep_full_precision=keep)
        s = cost_summary(model, layer_bits(p, model), size)
        assert abs(s["bops"] - target_g * 1e9) <= 0.01 * target_g * 1e9
        assert p["layers"]["conv1"]["w_bits"] == 32
    a = random_policy(model, "resnet18", 3e9, size, seed=1, keep_full_precision=keep)
    b = random_policy(model, "resnet18", 3e9, size, seed=1, keep_full_precision=keep)
    c = random_policy(model, "resnet18", 3e9, size, seed=2, keep_full_precision=keep)
    assert a["layers"] == b["layers"] and a["layers"] != c["layers"]
    with pytest.raises(UserError, match="unreachable.*feasible range"):
        random_policy(model, "resnet18", 1e15, size, keep_full_precision=keep)

"""Search-time variants of ImageNet models: same layer names as the deployment model, a >= 2 x 2 attribution map
at 32 x 32, a policy that validates on the ImageNet model; a 1 x 1 map is refused; and R_G acts (its gradient on
the importance logits is not negligible next to CE's) for ResNet-20 and every variant."""

from __future__ import annotations

import pytest
import torch

from gmpq.config import load_config
from gmpq.errors import UserError
from gmpq.models import create_model, create_search_model, model_spec
from gmpq.models.search_variants import VARIANTS
from gmpq.quant.modules import quantizable_layers
from gmpq.quant.policy import apply_policy, validate_policy
from gmpq.runtime import DistInfo
from gmpq.search.config import SearchConfig
from gmpq.search.export import build_policy
from gmpq.search.gradcam import capture_features, check_attribution_map
from gmpq.search.probe import logit_grad_norms
from gmpq.search.setup import prepare

SLOW = {"resnet18", "resnet50", "mobilenetv2_100"}  # one ImageNet variant (mobilenetv2) runs in the fast suite
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(VARIANTS)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_keeps_every_name_and_has_a_4x4_map_at_32(name, one_thread):
    variant, deploy = create_search_model(name, 10).eval(), create_model(name, 10)
    assert [n for n, _ in variant.named_modules()] == [n for n, _ in deploy.named_modules()]
    assert list(quantizable_layers(variant)) == list(quantizable_layers(deploy))
    layer = model_spec(name).feature_layer
    assert check_attribution_map(variant, layer, (3, 32, 32), name) == (4, 4)
    with capture_features(deploy.eval(), layer) as store, torch.no_grad():
        deploy(torch.zeros(1, 3, 224, 224))
    assert tuple(store["features"].shape[-2:]) == (7, 7)  # the deployment model itself is unchanged


def test_one_by_one_attribution_map_is_refused_with_the_fix(tmp_path, one_thread):
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    cfg = load_config(SearchConfig, None, ["model=resnet18", "num_classes=10", "stem=deploy", "device=cpu",
                                           "pretrain_epochs=1", f"out_dir={tmp_path}"])
    with pytest.raises(UserError) as e:
        prepare(cfg, DistInfo(), [(x, y)], None)
    msg = str(e.value)
    assert "'layer4'" in msg and "1 x 1" in msg and "32 x 32" in msg and "stem=search" in msg
    with pytest.raises(UserError, match="models with one"):
        load_config_and_prepare = load_config(SearchConfig, None, ["model=resnet20", "stem=search",
                                                                   f"out_dir={tmp_path}"])
        prepare(load_config_and_prepare, DistInfo(), [(x, y)], None)


def _state(name: str, tmp_path, weights: str | None = None):
    """A prepared search on 8 random 32 x 32 images; the teacher is ``weights`` or a random float model (saved to a
    file: no pretraining run). Two weight candidates keep the MSE step fit of the ImageNet models short."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    if weights is None:
        weights = str(tmp_path / "float.pt")
        torch.save(create_search_model(name, 10).state_dict(), weights)
    cfg = load_config(SearchConfig, None, [
        f"model={name}", "num_classes=10", "device=cpu", "hypernet.calib_batches=1", f"out_dir={tmp_path}",
        "progress=false", "tensorboard=false", "loss.eta=1", "loss.zeta=10", f"weights={weights}",
        "hypernet.w_bits=[2,4]", "hypernet.a_bits=[2,4]"])
    s, ref, spec = prepare(cfg, DistInfo(), [(x, y)], None)
    return s, ref, spec, x, y


def _rg_over_ce(s, x, y) -> float:
    norms = logit_grad_norms(s, x, y)
    assert norms["ce"] > 0 and norms["complexity"] > 0
    return norms["attribution"] / norms["ce"]


def test_attribution_gradient_acts_on_resnet20(shared_data, tmp_path, one_thread):
    s, *_ = _state("resnet20", tmp_path, str(shared_data / "cifar_resnets" / "resnet20-12fca82f.th"))
    from gmpq.data import DataConfig, build_loaders

    x, y = next(iter(build_loaders(DataConfig(name="cifar10_npz", root=str(shared_data / "cifar10"),
                                              batch_size=16, train_subset=64))[0]))
    assert _rg_over_ce(s, x, y) > 0.05  # measured 0.57 at batch 64; it was ~1e-2 with the 1/k-scaled R_G


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_variant_search_acts_and_its_policy_validates_on_the_imagenet_model(name, tmp_path, one_thread):
    s, ref, spec, x, y = _state(name, tmp_path)
    assert _rg_over_ce(s, x, y) > 0.05  # R_G acts at 32 x 32; with a 1 x 1 map it was ~1e-10
    policy = build_policy(s.model, ref, name, s.macs, spec.input_size, "gmpq")
    imagenet = create_model(name)  # 1000 classes, the stem of the deployment model
    entries = validate_policy(policy, imagenet, model_name=name)
    assert sum("w_probs" in e for e in entries.values()) > 0
    apply_policy(imagenet, policy, model_name=name)
    assert s.macs[spec.classifier] == imagenet.get_submodule(spec.classifier).weight.numel()  # 1000-class head
    assert policy["summary"]["float_bops_g"] == pytest.approx(sum(s.macs.values()) * 1024 / 1e9)

"""The search over every registered model: hypernet, one loss step with R_G, policy covering every layer; and the
recipes (each loads; ResNet-20 runs on the real CIFAR-10 subset)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmpq.config import load_config
from gmpq.models import create_model, list_models, model_spec
from gmpq.quant.policy import validate_policy
from gmpq.runtime import DistInfo
from gmpq.runtime.terms import weighted_total
from gmpq.search import losses as L
from gmpq.search.config import SearchConfig
from gmpq.search.export import build_policy
from gmpq.search.hypernet import arch_parameters, mixed_layers
from gmpq.search.setup import prepare
from gmpq.search.train import compute_losses, run_search

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SEARCH_RECIPES = sorted(p for pattern in ("quickstart.yaml", "resnet20_cifar10*.yaml", "resnet18_*.yaml",
                                          "resnet50_*.yaml", "mobilenetv2_*.yaml") for p in RECIPE_DIR.glob(pattern))
SLOW_MODELS = {"vgg16", "resnet50", "resnet18"}  # resnet18: the MSE weight-step fit of 11 M weights takes ~30 s on CPU


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n
                                  for n in list_models()])
def test_search_step_and_policy_for_every_registered_model(name, tmp_path):
    torch.set_num_threads(1)
    spec = model_spec(name)
    c = spec.input_size[0]
    x, y = torch.randn(2, c, 32, 32), torch.tensor([0, 1])
    cfg = load_config(SearchConfig, None, [f"model={name}", "num_classes=10", "pretrain_epochs=1",
                                           "max_steps_per_epoch=1", "device=cpu", "hypernet.calib_batches=1",
                                           f"out_dir={tmp_path}", "progress=false", "tensorboard=false"])
    s, ref, spec = prepare(cfg, DistInfo(), [(x, y)], None)
    terms, extra = compute_losses(s, x, y)
    assert set(terms) == {"ce", "complexity", "attribution"} and extra["p"] > 0
    weighted_total(terms, L.loss_weights(1.0, 1.0)).backward()
    assert all(p.grad is not None for p in arch_parameters(s.model))
    assert (s.fc_student is not None) == (spec.head == "gap_linear")
    policy = build_policy(s.model, ref, name, s.macs, spec.input_size, "gmpq")
    entries = validate_policy(policy, create_model(name, num_classes=10), model_name=name)
    assert entries[spec.first_layer]["w_bits"] == 32 and entries[spec.classifier]["a_bits"] is None
    assert sum("w_probs" in e for e in entries.values()) == len(mixed_layers(s.model)) > 0


@pytest.mark.parametrize("recipe", SEARCH_RECIPES, ids=lambda p: p.stem)
def test_recipes_load(recipe):
    cfg = load_config(SearchConfig, recipe)
    assert cfg.model in list_models()
    assert cfg.method == ("edmips" if recipe.stem.endswith("edmips") else "gmpq")
    assert set(cfg.hypernet.w_bits) <= set(range(2, 9))


def test_resnet20_recipe_runs_on_real_cifar10(shared_data, tmp_path):
    recipe = RECIPE_DIR / "resnet20_cifar10.yaml"
    cfg = load_config(SearchConfig, recipe, ["epochs=1", "max_steps_per_epoch=2", "data.train_subset=256",
                                             "data.test_subset=128", "data.batch_size=32", "progress=false",
                                             "threads=1", f"out_dir={tmp_path}"])
    metrics = run_search(cfg)
    assert metrics["epoch"] == 1 and metrics["train_attribution"] > 0
    assert metrics["test_acc"] > 0.3  # warm-started from the 91.6 % float ResNet-20; chance is 0.1
    policy = validate_policy(__import__("json").loads((tmp_path / "policy.json").read_text()),
                             create_model("resnet20"), model_name="resnet20")
    assert sum("w_probs" in e for e in policy.values()) == 18  # 19 convs minus the first

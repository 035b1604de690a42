"""Budget-exact policies (``gmpq.search.derive``): the ILP equals brute force, never exceeds the budget, and an
infeasible budget names the feasible range; ``gmpq policy derive`` on a real search output."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from gmpq.cli import main
from gmpq.errors import UserError
from gmpq.quant.policy import make_policy
from gmpq.search.derive import derive_policy, fixed_bops


def _policy(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = {"stem": {"w_bits": 32, "a_bits": None, "macs": 1000}}
    for i, macs in enumerate([5000, 3000, 8000, 2000]):
        pw = torch.softmax(torch.randn(3, generator=g) * 2, 0).tolist()
        pa = torch.softmax(torch.randn(2, generator=g) * 2, 0).tolist()
        layers[f"l{i}"] = {"w_bits": 4, "a_bits": 4, "w_probs": pw, "a_probs": pa, "w_candidates": [2, 3, 4],
                           "a_candidates": [2, 4], "macs": macs}
    return make_policy("toy", layers, "gmpq")


def _brute_force(policy: dict, budget: float, fixed: float) -> tuple[float, float]:
    """(best log-probability, its BOPs) over every assignment within ``budget``."""
    searched = [e for e in policy["layers"].values() if "w_probs" in e]
    options = [[(math.log(pw) + math.log(pa), e["macs"] * w * a)
                for w, pw in zip(e["w_candidates"], e["w_probs"]) for a, pa in zip(e["a_candidates"], e["a_probs"])]
               for e in searched]
    best = (-math.inf, 0.0)
    for combo in itertools.product(*options):
        bops = fixed + sum(b for _, b in combo)
        if bops <= budget:
            best = max(best, (sum(lp for lp, _ in combo), bops))
    return best


def _bops(policy: dict) -> float:
    return sum(e["macs"] * e["w_bits"] * (e["a_bits"] or 32) for e in policy["layers"].values())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.2, 0.45, 0.7, 1.0])
def test_ilp_equals_brute_force_and_fits_the_budget(seed, fraction):
    policy = _policy(seed)
    fixed = fixed_bops(policy)
    assert fixed == 1000 * 32 * 32
    lo, hi = fixed + 18000 * 4, fixed + 18000 * 16
    budget = lo + fraction * (hi - lo)
    derived = derive_policy(policy, gbops=budget / 1e9)
    best, _ = _brute_force(policy, budget, fixed)
    assert derived["summary"]["log_prob"] == pytest.approx(best, abs=1e-9)
    assert _bops(derived) <= budget
    assert derived["layers"]["stem"] == policy["layers"]["stem"]


def test_quantized_convention_leaves_the_fixed_layers_out():
    policy = _policy(3)
    budget = 18000 * 9  # searched layers only
    derived = derive_policy(policy, gbops=budget / 1e9, convention="quantized")
    searched = sum(e["macs"] * e["w_bits"] * e["a_bits"] for e in derived["layers"].values() if "w_probs" in e)
    assert searched <= budget
    assert derived["summary"]["log_prob"] == pytest.approx(_brute_force(policy, budget, 0.0)[0], abs=1e-9)


def test_budget_below_all_minimum_bits_gives_the_feasible_range():
    policy = _policy()
    lo = (fixed_bops(policy) + 18000 * 4) / 1e9
    with pytest.raises(UserError, match=r"feasible range is .*GBOPs") as e:
        derive_policy(policy, gbops=lo * 0.99)
    assert f"{lo:.6g}" in str(e.value)
    with pytest.raises(UserError, match="accepted values"):
        derive_policy(policy, gbops=1.0, convention="paper")
    with pytest.raises(UserError, match="give a budget"):
        derive_policy(policy)


def test_size_budget_by_brute_force():
    policy = _policy(4)
    params = {f"l{i}": p for i, p in enumerate([100, 300, 50, 200])}
    budget_bits = 650 * 3  # average 3 bits
    derived = derive_policy(policy, size_mb=budget_bits / 8e6, params=params)
    used = sum(params[n] * e["w_bits"] for n, e in derived["layers"].items() if n in params)
    assert used <= budget_bits
    searched = [(n, e) for n, e in policy["layers"].items() if "w_probs" in e]
    best = max(sum(math.log(e["w_probs"][e["w_candidates"].index(w)]) + max(math.log(p) for p in e["a_probs"])
                   for (n, e), w in zip(searched, ws))
               for ws in itertools.product([2, 3, 4], repeat=4)
               if sum(params[n] * w for (n, _), w in zip(searched, ws)) <= budget_bits)
    assert derived["summary"]["log_prob"] == pytest.approx(best, abs=1e-9)


def test_policy_derive_cli_on_a_search_output(tmp_path, one_thread):
    from gmpq.config import load_config
    from gmpq.models import create_model
    from gmpq.runtime import DistInfo
    from gmpq.search.config import SearchConfig
    from gmpq.search.export import build_policy
    from gmpq.search.hypernet import arch_parameters
    from gmpq.search.setup import prepare

    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    cfg = load_config(SearchConfig, None, ["loss.eta=0", "device=cpu", "hypernet.calib_batches=1",
                                           f"out_dir={tmp_path}"])
    s, ref, spec = prepare(cfg, DistInfo(), [(x, y)], None)
    with torch.no_grad():
        for p in arch_parameters(s.model):
            p.copy_(torch.randn_like(p))
    policy = build_policy(s.model, ref, "small_cnn", s.macs, spec.input_size, "edmips")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "policy.json").write_text(json.dumps(policy))
    lo = (fixed_bops(policy) + sum(e["macs"] * 4 for e in policy["layers"].values() if "w_probs" in e)) / 1e9
    budget = (lo + policy["summary"]["bops_g"]) / 2  # between the all-2-bit cost and the argmax policy's
    assert budget < policy["summary"]["bops_g"]
    assert main(["policy", "derive", "--search", str(tmp_path / "run"), "--gbops", str(budget),
                 "--out", str(tmp_path / "derived.json")]) == 0
    derived = json.loads((tmp_path / "derived.json").read_text())
    assert derived["summary"]["bops_g"] <= budget
    assert derived["summary"]["quantized_bops_g"] < derived["summary"]["bops_g"]
    from gmpq.quant.policy import validate_policy

    validate_policy(derived, create_model("small_cnn"), model_name="small_cnn")
    assert main(["policy", "derive", "--search", str(tmp_path / "run"), "--gbops", "1e-6",
                 "--out", str(tmp_path / "no.json")]) == 2


def test_min_fraction_keeps_the_policy_between_the_bounds_by_brute_force():
    policy = _policy(5)
    fixed = fixed_bops(policy)
    budget = fixed + 18000 * 10
    derived = derive_policy(policy, gbops=budget / 1e9, min_fraction=0.97)
    assert 0.97 * budget <= _bops(derived) <= budget
    searched = [e for e in policy["layers"].values() if "w_probs" in e]
    options = [[(math.log(pw) + math.log(pa), e["macs"] * w * a) for w, pw in zip(e["w_candidates"], e["w_probs"])
                for a, pa in zip(e["a_candidates"], e["a_probs"])] for e in searched]
    best = max(sum(lp for lp, _ in c) for c in itertools.product(*options)
               if 0.97 * budget <= fixed + sum(b for _, b in c) <= budget)
    assert derived["summary"]["log_prob"] == pytest.approx(best, abs=1e-9)


def test_final_policy_of_a_target_mode_search_meets_the_budget(tmp_path, one_thread):
    from gmpq.config import load_config
    from gmpq.runtime import DistInfo
    from gmpq.search.config import SearchConfig
    from gmpq.search.export import build_policy, final_policy
    from gmpq.search.hypernet import arch_parameters
    from gmpq.search.setup import prepare

    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    sets = ["loss.eta=0", "device=cpu", "hypernet.calib_batches=1", f"out_dir={tmp_path}", "epochs=2",
            "loss.complexity_mode=target", "loss.target_gbops=0.05"]
    cfg = load_config(SearchConfig, None, sets)
    s, ref, spec = prepare(cfg, DistInfo(), [(x, y)], None)
    with torch.no_grad():
        for p in arch_parameters(s.model):
            p.copy_(torch.randn_like(p))
    argmax = build_policy(s.model, ref, "small_cnn", s.macs, spec.input_size, "edmips")
    lo = (fixed_bops(argmax) + sum(e["macs"] * 4 for e in argmax["layers"].values() if "w_probs" in e)) / 1e9
    cfg.loss.target_gbops = (lo + argmax["summary"]["bops_g"]) / 2
    assert final_policy(argmax, cfg, ref, spec.input_size, epoch=1) is argmax  # not the last epoch
    final = final_policy(argmax, cfg, ref, spec.input_size, epoch=2)
    assert final["summary"]["bops_g"] <= cfg.loss.target_gbops < argmax["summary"]["bops_g"]
    cfg.loss.final_policy = "argmax"
    assert final_policy(argmax, cfg, ref, spec.input_size, epoch=2) is argmax


def test_derive_from_an_already_selected_policy_replaces_its_selection():
    """A target-mode search writes a policy whose ``created_by`` already names its selection: deriving from it must
    record the ILP's selection, not fail on a duplicate keyword."""
    policy = _policy(0)
    policy["created_by"]["selection"] = "argmax"
    fixed = fixed_bops(policy)
    derived = derive_policy(policy, gbops=(fixed + 18000 * 9) / 1e9)
    assert derived["created_by"]["selection"] == "budget_ilp"
    assert derived["created_by"]["method"] == "gmpq"

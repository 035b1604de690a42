"""End-to-end search runs on the embedded digits data: outputs, resume, NaN stop, bad input, distributed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmpq.cli import main
from gmpq.config import load_config
from gmpq.errors import NonFiniteLossError
from gmpq.models import create_model
from gmpq.quant.policy import load_policy, validate_policy
from gmpq.search import losses
from gmpq.search import train as train_mod
from gmpq.search.config import SearchConfig
from gmpq.search.train import run_search

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
QUICK = ["pretrain_epochs=1", "max_steps_per_epoch=3", "data.train_subset=200", "data.test_subset=100",
         "progress=false", "threads=1"]


def _cfg(out: Path, *extra: str) -> SearchConfig:
    return load_config(SearchConfig, RECIPE, [*QUICK, f"out_dir={out}", *extra])


def test_two_epoch_run_writes_everything_survives_nan_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = train_mod.step_terms
    calls = {"n": 0}

    def stop_in_second_epoch(*args):
        calls["n"] += 1
        if calls["n"] > 3:  # max_steps_per_epoch=3: the first step of epoch 2
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train_mod, "step_terms", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_search(_cfg(out, "epochs=2"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(train_mod, "step_terms", real_step)

    # a NaN term stops the run, names the term, and leaves the epoch-1 checkpoint in place
    monkeypatch.setattr(losses, "complexity_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1: complexity=nan.*last good checkpoint"):
        run_search(_cfg(out, "epochs=2"), resume=True)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    monkeypatch.undo()

    metrics = run_search(_cfg(out, "epochs=2"), resume=True)
    assert metrics["epoch"] == 2
    for name in ("config.yaml", "checkpoint.pt", "policy.json", "policy_bits.png", "log.jsonl"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["train_attribution"] > 0 and r["train_p"] > 1 for r in log)
    assert all(r[f"grad_{k}"] > 0 for r in log for k in ("ce", "complexity", "attribution"))  # each term acts
    policy = load_policy(out / "policy.json")
    assert policy["created_by"]["method"] == "gmpq" and policy["summary"]["epoch"] == 2
    entries = validate_policy(policy, create_model("small_cnn"), model_name="small_cnn")
    assert (entries["conv1.conv"]["w_bits"], entries["conv1.conv"]["a_bits"]) == (32, None)
    assert entries["fc"]["w_bits"] == 32
    searched = {n: e for n, e in entries.items() if "w_probs" in e}
    assert len(searched) == 4
    for e in searched.values():
        assert e["w_bits"] in e["w_candidates"] and sum(e["w_probs"]) == pytest.approx(1, abs=1e-5)
    s = policy["summary"]
    assert s["float_bops_g"] > s["expected_bops_g"] > 0 and s["float_bops_g"] > s["bops_g"] > 0


def test_eta_zero_is_edmips_with_zero_attribution(tmp_path):
    out = tmp_path / "edmips"
    run_search(_cfg(out, "epochs=1", "loss.eta=0", "pretrain_epochs=0"))
    (rec,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rec["train_attribution"] == 0.0 and rec["grad_attribution"] == 0.0  # EdMIPS: R_G sends nothing
    assert load_policy(out / "policy.json")["created_by"]["method"] == "edmips"


@pytest.mark.parametrize("overrides, message", [
    (["model=nope"], r"unknown model 'nope'; registered models: .*small_cnn"),
    (["data.name=mnist"], r"data.name='mnist' is not a registered dataset.*digits"),
    (["loss.zetta=1"], r"unknown key\(s\) \['loss.zetta'\]; accepted keys: .*loss.zeta"),
    (["hypernet.w_bits=[1,2]"], r"hypernet.w_bits=\[1, 2\].*\[2, 3, 4, 5, 6, 7, 8\]"),
    (["hypernet.a_bits=[4,9]"], r"hypernet.a_bits=\[4, 9\].*\[2, 3, 4, 5, 6, 7, 8\]"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], r"/nonexistent/cifar.*expected the official python layout"),
    (["loss.complexity_mode=target"], r"target_gbops"),
    (["pretrain_epochs=0"], r"loss.eta > 0 needs a teacher"),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, overrides, message):
    args = ["search", "--recipe", str(RECIPE), "--out-dir", str(tmp_path / "bad")]
    for o in QUICK + overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert re.search(message, err), err


def test_teacher_checkpoint_mismatch_lists_keys(tmp_path, capsys):
    ckpt = tmp_path / "wrong.pt"
    state = create_model("small_cnn").state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, ckpt)
    args = ["search", "--recipe", str(RECIPE), "--out-dir", str(tmp_path / "o"), "--set", f"weights={ckpt}"]
    for o in QUICK:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing keys (1): fc.weight" in err and "unexpected keys (1): extra.weight" in err


@pytest.mark.slow
def test_distributed_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gmpq", "search", "--recipe", str(RECIPE), "--out-dir", str(out), "--set", "epochs=1",
           "--set", "device=cpu"] + [a for o in QUICK for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = load_policy(out / "policy.json")
    validate_policy(policy, create_model("small_cnn"))
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    args = ["search", "--recipe", str(RECIPE), "--out-dir", str(tmp_path / "empty"), "--resume"]
    assert main(args) == 2
    assert "no checkpoint at" in capsys.readouterr().err

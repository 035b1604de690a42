"""gmpq finetune / evaluate / export / report on real data (digits embedded; CIFAR from $GMPQ_DATA)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from gmpq.config import load_config
from gmpq.data import DataConfig
from gmpq.deploy import finetune as ft
from gmpq.deploy.config import FinetuneConfig
from gmpq.deploy.report import report
from gmpq.deploy.run_eval import EvalConfig, evaluate_model
from gmpq.errors import NonFiniteLossError, UserError
from gmpq.models import create_model
from gmpq.quant import apply_policy, save_policy, uniform_policy


@pytest.fixture(scope="module")
def digits_float(tmp_path_factory, train_digits_cnn) -> str:
    """small_cnn trained in full precision on digits for a few epochs (the deployment starting point)."""
    model = train_digits_cnn(4)
    path = tmp_path_factory.mktemp("float") / "small_cnn_digits.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def policy_file(tmp_path, bits=2, model="small_cnn") -> str:
    p = uniform_policy(create_model(model), model, bits, bits, keep_full_precision=())
    save_policy(p, tmp_path / f"w{bits}a{bits}.json")
    return str(tmp_path / f"w{bits}a{bits}.json")


def cfg(tmp_path, weights, policy, **kw) -> FinetuneConfig:
    sets = [f"policy={policy}", f"out_dir={tmp_path / 'run'}", "model=small_cnn",
            "data.name=digits", "progress=false", "tensorboard=false", "epochs=1", "lr=0.001"]
    sets += [f"weights={weights}"] if weights else []
    return load_config(FinetuneConfig, None, sets + [f"{k}={v}" for k, v in kw.items()])


def test_one_epoch_finetune_improves_and_writes_outputs(tmp_path, digits_float):
    result = ft.finetune(cfg(tmp_path, digits_float, policy_file(tmp_path, 2)))
    assert result["top1"] > result["top1_before_finetune"] + 0.02
    run = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "model_final.pt", "result.json", "log.jsonl"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "result.json").read_text())
    assert saved["top1"] == result["top1"] and saved["method"] == "uniform" and saved["avg_w_bits"] == 2.0

    # evaluate the fine-tuned checkpoint, then export it and evaluate the packed file: identical accuracy
    ev = evaluate_model(EvalConfig(model="small_cnn", weights=str(run / "model_final.pt"),
                                   data=DataConfig(name="digits")))
    assert ev["top1"] == pytest.approx(result["top1"]) and not ev["calibrated_now"]
    out = tmp_path / "export" / "m.gmpq"
    r = subprocess.run([sys.executable, "-m", "gmpq", "export", "--model", "small_cnn", "--weights",
                        str(run / "model_final.pt"), "--policy", str(tmp_path / "w2a2.json"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = json.loads(out.with_suffix(".gmpq.json").read_text())
    assert stats["onnx_max_abs_diff"] < 1e-5 and stats["file_bytes"] <= 1.05 * stats["theoretical_bytes"]
    packed = evaluate_model(EvalConfig(model="small_cnn", packed=str(out), data=DataConfig(name="digits")))
    assert packed["top1"] == ev["top1"] and packed["bops_g"] == ev["bops_g"]

    rep = report([run / "result.json"], tmp_path / "report")
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000 and "| run |" in rep["markdown"]


def test_resume_keeps_finished_epochs(tmp_path, digits_float):
    pol = policy_file(tmp_path, 4)
    ft.finetune(cfg(tmp_path, digits_float, pol, max_steps_per_epoch=3, epochs=1))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1
    ft.finetune(cfg(tmp_path, digits_float, pol, max_steps_per_epoch=3, epochs=2), resume=True)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, digits_float, monkeypatch):
    pol = policy_file(tmp_path, 4)
    real = ft.loss_terms
    calls = {"n": 0}

    def poisoned(*a, **k):
        terms = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 3:  # epoch 1 (3 steps) is clean, epoch 2 diverges
            terms["ce"] = terms["ce"] * float("nan")
        return terms

    monkeypatch.setattr(ft, "loss_terms", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"ce=nan.*last good checkpoint .* is kept"):
        ft.finetune(cfg(tmp_path, digits_float, pol, max_steps_per_epoch=3, epochs=2))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 1


def test_unwritable_output_fails_before_training(tmp_path, digits_float):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c = cfg(tmp_path, digits_float, policy_file(tmp_path, 4), out_dir=str(blocker / "run"))
    with pytest.raises(UserError, match="not writable"):
        ft.finetune(c)


def test_policy_for_renamed_layers_and_other_model(tmp_path):
    policy = uniform_policy(create_model("small_cnn"), "small_cnn", 4, 4)
    renamed = nn.Sequential()
    renamed.add_module("backbone", create_model("small_cnn"))
    with pytest.raises(UserError) as e:
        apply_policy(renamed, policy)
    msg = str(e.value)
    assert "not in the model" in msg and "not in the policy" in msg and "backbone." in msg
    save_policy(uniform_policy(create_model("resnet20"), "resnet20", 4, 4), tmp_path / "r20.json")
    c = cfg(tmp_path, None, tmp_path / "r20.json")
    with pytest.raises(UserError, match="for model 'resnet20', not 'small_cnn'"):
        ft.finetune(c)


def test_missing_and_corrupt_weights(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for path, text in ((tmp_path / "none.pt", "does not exist"), (bad, "bad.pt")):
        with pytest.raises(UserError, match=text):
            evaluate_model(EvalConfig(model="small_cnn", weights=str(path), data=DataConfig(name="digits")))


def test_cli_evaluate_needs_one_source():
    r = subprocess.run([sys.executable, "-m", "gmpq", "evaluate", "--model", "small_cnn", "--data", "digits"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exactly one of --weights" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.shared_data
def test_evaluate_pretrained_resnet20_reproduces_reference(shared_data):
    ev = evaluate_model(EvalConfig(model="resnet20",
                                   weights=str(shared_data / "cifar_resnets" / "resnet20-12fca82f.th"),
                                   data=DataConfig(name="cifar10_npz", root=str(shared_data / "cifar10"))))
    assert ev["n_test"] == 1017
    assert abs(ev["top1"] - 0.916) < 0.006  # README of the shared data: 91.6 % on the lossless test images


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_bn_keeps_the_running_statistics(tmp_path, digits_float, frozen):
    """``frozen_bn`` (for BN-folded weights such as the ImageNet MobileNetV2): BatchNorm stays in eval mode while
    fine-tuning, so its running statistics are the float checkpoint's; without it they move."""
    ft.finetune(cfg(tmp_path, digits_float, policy_file(tmp_path, 4), frozen_bn=str(frozen).lower(),
                    max_steps_per_epoch=2))
    start = torch.load(digits_float, weights_only=True)["state_dict"]
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=False)["model"]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats
    same = [torch.equal(start[k], final[k]) for k in stats]
    assert all(same) if frozen else not any(same)

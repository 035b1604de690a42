"""The DETR stages on the one training engine: DETR training, its backbone pretraining and Q-DETR QAT. A run
interrupted after an epoch and resumed equals the uninterrupted run bit for bit (weights, optimizer state, logged
metrics except wall seconds, derived outputs); a NaN at a known step stops the run (exit 3) naming the term and
keeps the last good checkpoint, which loads; renamed settings fail with the new name."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import detr_ptq.engine.train as detr_train
import detr_ptq.qat.setup as qat_setup
import detr_ptq.qat.train as qat_train
from detr_ptq.cli import main
from detr_ptq.data.digits_coco import DigitsConfig, make_digits_coco
from detr_ptq.data.transforms import collate
from detr_ptq.engine.pretrain_backbone import CropClassifier
from detr_ptq.engine.train import TrainConfig, train
from detr_ptq.models.checkpoint import read_state_dict
from detr_ptq.models.criterion import SetCriterion
from detr_ptq.qat.config import QATConfig
from detr_ptq.qat.train import qat
from gmpq.config import load_config
from gmpq.errors import UserError
from gmpq.runtime import load_checkpoint

REFERENCE = Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    make_digits_coco(out, seed=0, num_train=16, num_val=4)
    return out


def _detr_cfg(digits: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(digits), out_dir=str(out), epochs=2, batch_size=2, max_steps_per_epoch=2,
                min_size=64, max_size=64, eval_every=1, milestones=[0.5], progress=False, tensorboard=False,
                lr=2e-4, lr_backbone=2e-4, backbone_pretrain_epochs=2)
    return TrainConfig(**{**base, **kw})


def _qat_cfg(digits: Path, out: Path, **kw) -> QATConfig:
    base = dict(checkpoint=str(REFERENCE), data_dir=str(digits), out_dir=str(out), epochs=2, max_steps_per_epoch=2,
                batch_size=2, calib_batches=1, eval_float=False, eval_images=2, progress=False, tensorboard=False,
                min_size=64, max_size=64, bits="4-4-8", align=True, fqm=True, two_stage=True, stage1_epochs=1,
                milestones=[0.5], w_init="lsq", a_init="minmax")
    return QATConfig(**{**base, **kw})


def _interrupt(monkeypatch, module, stage: str, after: int) -> None:
    """Make ``module.fit`` raise KeyboardInterrupt once the task named ``stage`` has written epoch ``after``'s
    checkpoint and derived outputs (as if the process were killed right there)."""
    real = module.fit

    def fit(task, cfg, info, state=None):
        if task.name == stage:
            inner = task.write_outputs

            def stop(epoch, metrics):
                if inner is not None:
                    inner(epoch, metrics)
                if epoch == after:
                    raise KeyboardInterrupt

            task.write_outputs = stop
        return real(task, cfg, info, state)

    monkeypatch.setattr(module, "fit", fit)


def _lines(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in path.read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert ca["scheduler"] == cb["scheduler"]
    assert _lines(a / "log.jsonl") == _lines(b / "log.jsonl")
    fa, fb = read_state_dict(a / "final.pth")[0], read_state_dict(b / "final.pth")[0]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_detr_training_resumed_in_pretraining_or_training_equals_the_uninterrupted_run(digits, tmp_path,
                                                                                      monkeypatch):
    metrics = train(_detr_cfg(digits, tmp_path / "whole"))
    log = _lines(tmp_path / "whole" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and {"train_loss_giou", "train_class_error", "AP50"} <= set(log[0])
    assert [r["lr"] for r in log] == pytest.approx([2e-4, 2e-5])  # milestones [0.5] of 2 epochs: x0.1 after 1
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "whole" / "config.yaml").is_file()
    pre = _lines(tmp_path / "whole" / "backbone_pretrain" / "log.jsonl")
    summary = json.loads((tmp_path / "whole" / "backbone_pretrain.json").read_text())
    assert summary["train_accuracy"] == pre[-1]["train_acc"] and summary["crops"] > 16  # several digits per image
    for stage in ("backbone_pretrain", "detr"):
        out = tmp_path / stage
        with monkeypatch.context() as m:
            _interrupt(m, detr_train, stage, after=1)
            with pytest.raises(KeyboardInterrupt):
                train(_detr_cfg(digits, out))
        assert not (out / "final.pth").exists()
        torch.manual_seed(123)  # whatever the process did meanwhile must not matter
        assert train(_detr_cfg(digits, out), resume=True) == metrics
        _assert_same_run(tmp_path / "whole", out)
        assert json.loads((out / "metrics.json").read_text()) == json.loads(
            (tmp_path / "whole" / "metrics.json").read_text())
    # a finished run resumed: nothing to train, final.pth and metrics.json come back from the checkpoint
    (out / "final.pth").unlink()
    (out / "metrics.json").unlink()
    assert train(_detr_cfg(digits, out), resume=True) == metrics
    _assert_same_run(tmp_path / "whole", out)


def _policy(out: Path) -> dict:
    policy = json.loads((out / "policy.json").read_text())
    del policy["created_by"]["date"]
    return policy


def test_qat_resumed_across_the_stage_switch_equals_the_uninterrupted_run(digits, tmp_path, monkeypatch):
    whole = qat(_qat_cfg(digits, tmp_path / "whole"))
    with monkeypatch.context() as m:
        _interrupt(m, qat_train, "qat", after=1)  # stage 2 (re-initialisation, re-calibration) starts after resume
        with pytest.raises(KeyboardInterrupt):
            qat(_qat_cfg(digits, tmp_path / "part"))
    (tmp_path / "part" / "policy.json").unlink()  # derived from the checkpoint: re-written on resume
    torch.manual_seed(123)
    resumed = qat(_qat_cfg(digits, tmp_path / "part"), resume=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "part")
    drop = ("train_seconds", "checkpoint", "config", "name")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert _policy(tmp_path / "part") == _policy(tmp_path / "whole")
    # a finished run resumed: nothing to train, the derived outputs come back from the checkpoint
    (tmp_path / "part" / "result.json").unlink()
    again = qat(_qat_cfg(digits, tmp_path / "part"), resume=True)
    assert again["AP50"] == whole["AP50"] and (tmp_path / "part" / "result.json").exists()
    with pytest.raises(UserError, match="other settings .*align: checkpoint True vs config False"):
        qat(_qat_cfg(digits, tmp_path / "part", align=False), resume=True)


def _nan_at(monkeypatch, cls, call: int, term: str | None) -> None:
    """The ``call``-th forward of ``cls`` gives NaN in ``term`` of its output dict (or NaN logits)."""
    real, calls = cls.forward, {"n": 0}

    def forward(self, *args):
        out = real(self, *args)
        calls["n"] += 1
        if calls["n"] == call:
            if term is None:
                return out * math.nan
            out[term] = out[term] * math.nan
        return out

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("stage", ["backbone_pretrain", "detr", "qat"])
def test_nan_stops_naming_the_term_and_the_last_good_checkpoint_loads(stage, digits, tmp_path, monkeypatch,
                                                                      capsys):
    """The NaN arrives at epoch 2, step 2 (2 steps per epoch; pretraining: 1 step of 64 crops per epoch); the
    resumed run finishes the last epoch."""
    if stage == "backbone_pretrain":
        _nan_at(monkeypatch, CropClassifier, 2, None)
        verb, where, out, term = "train", "epoch 2, step 1: ce=nan", tmp_path / "backbone_pretrain", "ce"
    else:
        _nan_at(monkeypatch, SetCriterion, 4, "loss_giou")
        verb, where, out, term = ("train" if stage == "detr" else "qat"), "epoch 2, step 2: loss_giou=nan", \
            tmp_path, "loss_giou"
    cfg = {"data_dir": digits, "out_dir": tmp_path, "max_steps_per_epoch": 2, "batch_size": 2, "min_size": 64,
           "max_size": 64, "progress": "false", "tensorboard": "false", "epochs": 2, "eval_every": 2}
    if stage == "qat":
        cfg |= {"checkpoint": REFERENCE, "calib_batches": 1, "eval_float": "false", "eval_images": 2,
                "w_init": "lsq", "a_init": "minmax"}
    else:
        cfg |= {"backbone_pretrain_epochs": 2 if stage == "backbone_pretrain" else 0}
    rc = main([verb] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")])
    err = capsys.readouterr().err
    assert rc == 3 and where in err and "last good checkpoint" in err and term in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and [r["epoch"] for r in state["log"]] == [1]
    monkeypatch.undo()  # the last good checkpoint loads: the run resumes from it and finishes
    assert main([verb, "--resume"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]) == 0
    assert [r["epoch"] for r in load_checkpoint(out / "checkpoint.pt")["log"]] == [1, 2]


@pytest.mark.parametrize("cls", [TrainConfig, QATConfig])
@pytest.mark.parametrize("old,new", [("num_threads", "threads"), ("clip_max_norm", "grad_clip"),
                                     ("lr_drop", "milestones"), ("steps_per_epoch", "max_steps_per_epoch")])
def test_old_setting_names_fail_with_the_new_one(cls, old, new):
    with pytest.raises(UserError, match=rf"{old} -> {new}"):
        load_config(cls, overrides=[f"{old}=1"])


@pytest.mark.slow
def test_qat_on_two_gloo_processes_equals_one_process(tmp_path, monkeypatch):
    """A QAT step on 2 processes x batch 2 (DDP through the engine) = on 1 process x batch 4 of the same images:
    the same logged loss terms and the same averaged gradient (Adam's first moment, 0.1 x gradient).

    What makes them the same computation: every image has 3 boxes (the set loss normalizes by the process's own box
    count: ``SetCriterion`` does not all-reduce it), the single process reads the data in DistributedSampler order
    (world size 1) and calibrates on the same batches of 2 as each DDP process. What remains is float32 summation
    order. One step only: after it, Adam's lr x sign(g) on near-zero gradients and 4-bit rounding flips make the
    runs drift apart by about the lr per step (measured: max |w_1 - w_2| = 5.3e-4 after 4 steps at lr 1e-4).
    """
    data = tmp_path / "digits"
    make_digits_coco(data, seed=0, num_train=16, num_val=2, cfg=DigitsConfig(min_objects=3, max_objects=3))
    sets = {"checkpoint": REFERENCE, "data_dir": data, "epochs": 1, "max_steps_per_epoch": 1, "calib_batches": 2,
            "eval_images": 2, "eval_float": "false", "bits": "4-4-8", "w_init": "lsq", "a_init": "minmax",
            "min_size": 64, "max_size": 64, "device": "cpu", "progress": "false", "tensorboard": "false", "seed": 42,
            "grad_clip": "null"}  # unclipped: a gradient summed instead of averaged would show
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "detr_ptq",
           "qat"] + [a for k, v in {**sets, "batch_size": 2, "out_dir": tmp_path / "ddp"}.items()
                     for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]

    monkeypatch.setattr(qat_setup, "RandomSampler",
                        lambda dataset, generator=None: DistributedSampler(dataset, 1, 0, shuffle=True, seed=42))
    real_calibrate = qat_train.calibrate_student

    def calibrate_in_batches_of_2(model, batches, num_batches, device, only=None):
        loader = DataLoader(batches.dataset, 2, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(43))
        return real_calibrate(model, loader, num_batches, device, only=only)

    monkeypatch.setattr(qat_train, "calibrate_student", calibrate_in_batches_of_2)
    qat(load_config(QATConfig, overrides=[f"{k}={v}" for k, v in
                                          {**sets, "batch_size": 4, "out_dir": tmp_path / "one"}.items()]))
    [a], [b] = _lines(tmp_path / "one" / "log.jsonl"), _lines(tmp_path / "ddp" / "log.jsonl")
    train = [k for k in a if k.startswith("train_")]  # (the evaluation after the step sees the drift above)
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6) for k in train), (a, b)
    one, two = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    m1 = [s["exp_avg"] for s in one["optimizer"]["state"].values()]
    m2 = [s["exp_avg"] for s in two["optimizer"]["state"].values()]
    scale = max(float(m.abs().max()) for m in m1)
    worst = max(float((x - y).abs().max()) for x, y in zip(m1, m2, strict=True))
    print(f"max |m_1 - m_2| = {worst:.3g} (max |m_1| = {scale:.3g})")
    assert worst <= 1e-5 * scale  # float32 summation order: measured 6e-7 x scale

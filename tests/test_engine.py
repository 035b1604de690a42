"""The training engine on a toy stage: resume equals the uninterrupted run bit for bit, the NaN stop names the term
and keeps the last good checkpoint, the lr schedule, the per-term gradient probe, renamed settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gmpq.config import load_config
from gmpq.errors import NonFiniteLossError, UserError
from gmpq.runtime import DistInfo, RunConfig, Task, fit, load_checkpoint, load_resume
from gmpq.runtime.settings import lr_factor


def _task(nan_at: int | None = None, probe: bool = False) -> Task:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 5), torch.randint(0, 3, (48,)))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 3))  # dropout: the global RNG matters
    calls = {"n": 0}

    def loss_terms(net, batch):
        x, y = batch
        x = x + 0.1 * torch.randn_like(x)  # a random augmentation drawn from the global RNG
        calls["n"] += 1
        reg = model[0].weight.pow(2).mean()
        if nan_at is not None and calls["n"] == nan_at:
            reg = reg * float("nan")
        return {"ce": nn.functional.cross_entropy(net(x), y), "reg": reg, "acc": (net(x).argmax(1) == y).float().mean()}

    def evaluate():
        with torch.no_grad():
            return {"test_loss": float(nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]))}

    return Task(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), loader=loader,
                loss_terms=loss_terms, weights={"ce": 1.0, "reg": 0.5}, evaluate=evaluate,
                probe=[model[0].weight] if probe else [], probe_every=2 if probe else 0)


def _cfg(out, epochs=3, **kw) -> RunConfig:
    return RunConfig(out_dir=str(out), epochs=epochs, milestones=[0.5], progress=False, tensorboard=False, **kw)


def _strip(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in lines]


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    whole = fit(_task(), _cfg(tmp_path / "a"), DistInfo())
    # interrupted after epoch 1: a run whose config says 3 epochs, stopped by an exception after the checkpoint
    part = _task()
    calls = {"epochs": 0}

    def stop_after_first(epoch, metrics):
        calls["epochs"] += 1
        raise KeyboardInterrupt

    part.write_outputs = stop_after_first
    with pytest.raises(KeyboardInterrupt):
        fit(part, _cfg(tmp_path / "b"), DistInfo())
    torch.manual_seed(123)  # whatever the process did meanwhile must not matter
    resumed = fit(_task(), _cfg(tmp_path / "b"), DistInfo(), load_resume(tmp_path / "b"))
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    assert _strip(whole.history) == _strip(resumed.history)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert _strip(log_a) == _strip(log_b) and [r["epoch"] for r in log_b] == [1, 2, 3]


def test_resume_of_a_finished_run_rederives_outputs(tmp_path, capsys):
    fit(_task(), _cfg(tmp_path, epochs=2), DistInfo())
    (tmp_path / "log.jsonl").unlink()
    seen = []
    task = _task()
    task.write_outputs = lambda epoch, metrics: seen.append(epoch)
    again = fit(task, _cfg(tmp_path, epochs=2), DistInfo(), load_resume(tmp_path))
    assert again.epoch == 2 and seen == [2]
    assert "already finished at epoch 2" in capsys.readouterr().out
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_nan_stops_naming_the_term_and_keeps_the_last_good_checkpoint(tmp_path):
    fit(_task(), _cfg(tmp_path, epochs=1), DistInfo())
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3: reg=nan.*last good checkpoint"):
        fit(_task(nan_at=3), _cfg(tmp_path, epochs=2), DistInfo(), load_resume(tmp_path))
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["epoch"] == 1 and all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


def test_lr_is_logged_as_used_and_drops_at_the_milestone(tmp_path):
    result = fit(_task(), _cfg(tmp_path, epochs=4), DistInfo())
    assert [r["lr"] for r in result.history] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    f = lr_factor(dataclasses.replace(_cfg(tmp_path, epochs=4), warmup_iters=10), 6)
    assert f(0) == pytest.approx(0.001) and f(10) == 1.0 and f(12) == pytest.approx(0.1)


def test_term_gradient_probe_matches_autograd(tmp_path):
    task = _task(probe=True)
    weights_seen = []
    inner = task.loss_terms
    task.loss_terms = lambda net, batch: weights_seen.append(task.model[0].weight.detach().clone()) or inner(net, batch)
    rec = fit(task, _cfg(tmp_path, epochs=1), DistInfo()).history[0]
    assert rec["grad_ce"] > 0 and "grad_acc" not in rec  # terms without a weight are not probed
    # d(0.5 * mean(W^2))/dW = W / numel, probed at steps 0, 2, 4 of the 6
    expected = [(w / w.numel()).norm().item() for w in weights_seen[0::2]]
    assert rec["grad_reg"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)


@pytest.mark.parametrize("old,new", [("num_threads", "threads"), ("clip_max_norm", "grad_clip"),
                                     ("lr_drop", "milestones"), ("steps_per_epoch", "max_steps_per_epoch")])
def test_renamed_settings_fail_with_the_new_name(old, new):
    with pytest.raises(UserError, match=rf"{old} -> {new}"):
        load_config(RunConfig, overrides=[f"{old}=1"])


def _shard_task(rank: int, world: int, grad_sync: str) -> Task:
    """A deterministic toy stage (no dropout, no augmentation, no BN): process ``rank`` of ``world`` sees every
    ``world``-th sample, so ``world`` processes with batch 8 / world share the one-process batch of 8."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 5), torch.randint(0, 3, (48,)))
    sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
    loader = DataLoader(data, batch_size=8 // world, sampler=sampler)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return Task(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loader=loader,
                loss_terms=lambda net, b: {"ce": nn.functional.cross_entropy(net(b[0]), b[1])}, weights={"ce": 1.0},
                grad_sync=grad_sync)


def _worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=world)
    try:
        for grad_sync in ("ddp", "allreduce"):
            fit(_shard_task(rank, world, grad_sync), _cfg(f"{folder}/{grad_sync}", epochs=2), DistInfo(rank, world))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes start: ~10 s on an idle 2-core machine
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP and the manual all-reduce. Tolerance 1e-6: the same sums in another order (float32), nothing else
    differs; without the gradient all-reduce rank 0's weights differ by up to 0.14."""
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2)
    for grad_sync in ("ddp", "allreduce"):
        one = fit(_shard_task(0, 1, grad_sync), _cfg(tmp_path / f"one_{grad_sync}", epochs=2), DistInfo())
        two = load_checkpoint(tmp_path / grad_sync / "checkpoint.pt")
        for k, v in load_checkpoint(tmp_path / f"one_{grad_sync}" / "checkpoint.pt")["model"].items():
            torch.testing.assert_close(two["model"][k], v, atol=1e-6, rtol=1e-6)
        for a, b in zip(_strip(one.history), _strip(two["log"]), strict=True):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


def test_resume_from_a_checkpoint_of_an_older_loop_is_a_clear_error(tmp_path):
    torch.save({"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=r"lacks \['loader_rng', 'log', 'metrics', 'rng'\].*without --resume"):
        load_resume(tmp_path)

"""Config resolution (defaults <- recipe <- --set) and CLI error handling."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from gmpq.config import load_config, parse_overrides, save_config
from gmpq.errors import UserError


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    milestones: list[int] = dataclasses.field(default_factory=lambda: [20, 30])


@dataclasses.dataclass
class Cfg:
    model: str = "resnet20"
    epochs: int = 40
    bits: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])
    target: float | None = None
    use_kd: bool = False
    optim: Optim = dataclasses.field(default_factory=Optim)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")


def test_defaults_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\noptim:\n  lr: 0.01\n")
    cfg = load_config(Cfg, recipe, ["optim.milestones=[1,2]", "target=2.5", "use_kd=true", "bits=[4,8]"])
    assert cfg.epochs == 3 and cfg.optim.lr == 0.01 and cfg.optim.milestones == [1, 2]
    assert cfg.target == 2.5 and cfg.use_kd is True and cfg.bits == [4, 8] and cfg.model == "resnet20"
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["optim"]["lr"] == 0.01
    assert load_config(Cfg, tmp_path / "out" / "config.yaml") == cfg


def test_unknown_key_lists_accepted_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epoch: 3\n")
    with pytest.raises(UserError, match=r"r\.yaml.*unknown key\(s\) \['epoch'\].*'epochs'"):
        load_config(Cfg, recipe)
    with pytest.raises(UserError, match=r"unknown key\(s\) \['optim.lrr'\].*'optim.lr'"):
        load_config(Cfg, None, ["optim.lrr=1"])


def test_wrong_types_and_validation():
    with pytest.raises(UserError, match="epochs='many' has the wrong type; expected int"):
        load_config(Cfg, None, ["epochs=many"])
    with pytest.raises(UserError, match="use_kd=3 should be true or false"):
        load_config(Cfg, None, ["use_kd=3"])
    with pytest.raises(UserError, match="bits=4 should be a list"):
        load_config(Cfg, None, ["bits=4"])
    with pytest.raises(UserError, match="epochs=0 must be >= 1"):
        load_config(Cfg, None, ["epochs=0"])
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides(["epochs"])


@dataclasses.dataclass
class Alloc:
    target_bits: float = 4.0
    candidate_bits: list[int] = dataclasses.field(default_factory=list)
    batch_size: int = 8
    max_images: int = 0
    grad_clip: float | None = None


@dataclasses.dataclass
class Run:
    lr: float = 1e-3
    alloc: Alloc = dataclasses.field(default_factory=Alloc)


def test_numeric_ranges_name_the_key_the_source_and_the_range(tmp_path):
    """One table (gmpq.config.SETTING_RANGES) keyed by setting name serves every config class, nested ones too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: -0.001\n")
    with pytest.raises(UserError, match=r"recipe '.*r\.yaml': lr=-0\.001 is out of range; accepted: > 0"):
        load_config(Run, recipe)
    pattern = r"--set alloc.batch_size=0: alloc.batch_size=0 is out of range; accepted: >= 1"
    with pytest.raises(UserError, match=pattern):
        load_config(Run, None, ["alloc.batch_size=0"])
    with pytest.raises(UserError, match=r"alloc.max_images=-3 is out of range; accepted: >= 0"):
        load_config(Run, None, ["alloc.max_images=-3"])
    with pytest.raises(UserError, match=r"alloc.target_bits=9.0 is out of range; accepted: \[2, 8\]"):
        load_config(Run, None, ["alloc.target_bits=9"])
    with pytest.raises(UserError, match=r"target_bits=6.5 is outside the candidate bits \[3, 4, 5, 6\]"):
        load_config(Run, None, ["alloc.target_bits=6.5", "alloc.candidate_bits=[3,4,5,6]"])
    with pytest.raises(UserError, match=r"lr=nan is out of range"):
        load_config(Run, None, ["lr=.nan"])
    # at the bounds, and None for an optional setting, are accepted
    cfg = load_config(Run, None, ["alloc.max_images=0", "alloc.target_bits=6", "alloc.candidate_bits=[3,4,5,6]"])
    assert cfg.alloc.max_images == 0 and cfg.alloc.grad_clip is None and cfg.alloc.target_bits == 6.0


def test_missing_and_bad_recipe(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(Cfg, bad)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gmpq", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_policy_no_traceback(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"format": "gmpq-policy/9", "model": "resnet20", "created_by": {"method": "x"}, "layers": {}}')
    r = run_cli("policy", "validate", str(f), "--model", "resnet20")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "gmpq: error:" in r.stderr and "gmpq-policy/9" in r.stderr and "gmpq-policy/1" in r.stderr


def test_atomic_writes_use_normal_permissions(tmp_path):
    import os
    import stat

    from gmpq.io import atomic_torch_save, atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_torch_save({"a": 1}, tmp_path / "b.pt")
    finally:
        os.umask(umask)
    for name in ("a.txt", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.pt"]  # no temporary files left


def test_run_log_rewrites_the_whole_file_from_its_records(tmp_path):
    import json

    from gmpq.runtime import RunLog

    old = RunLog(tmp_path, tensorboard=False)
    for e in range(3):
        old.epoch({"epoch": e + 1})
    fresh = RunLog(tmp_path, tensorboard=False)  # a new run into the same folder: no stale epochs
    fresh.epoch({"epoch": 1, "new": True})
    assert [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [{"epoch": 1, "new": True}]
    resumed = RunLog(tmp_path, tensorboard=False, lines=[{"epoch": 1}])  # records come from the checkpoint
    resumed.epoch({"epoch": 2})
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]

"""Bad inputs across both CLIs: each case is (argv, fragments the error must contain). Every case must exit
non-zero with a message naming the problem, and never with a traceback. The CLIs run in-process (``main(argv)``).

The inputs are small files made once per module: a small_cnn float checkpoint, a fine-tuned-style quantized one
that stores its policy, policies (duplicate keys, wrong bits and names, another model), ImageFolder trees
(grayscale, RGB, one class, a corrupt image) and a CIFAR-style npz with labels out of range.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_ptq.cli import main as detr_main
from gmpq.cli import main as gmpq_main
from gmpq.data import DataConfig, build_dataset
from gmpq.models import create_model
from gmpq.quant import apply_policy, calibrate, save_policy, uniform_policy
from gmpq.runtime import save_checkpoint

ASSET = Path(__file__).resolve().parent.parent / "detr_ptq" / "assets" / "detr_tiny_digits.pth"


def _images(root: Path, classes: list[str], mode: str, n: int = 3, corrupt: str | None = None) -> Path:
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (20, 20) if mode == "L" else (20, 20, 3)
                Image.fromarray(g.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    if corrupt:
        (root / "val" / classes[-1] / corrupt).write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Every input file of the cases, made once (about 2 s)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bad")
    model = create_model("small_cnn")
    torch.save({"state_dict": model.state_dict()}, d / "float.pt")
    torch.save({"state_dict": create_model("small_cnn", 2).state_dict()}, d / "float2.pt")
    torch.save({"state_dict": create_model("resnet20").state_dict()}, d / "r20.pt")
    torch.save({"state_dict": create_model("resnet20", 2).state_dict()}, d / "r20_2.pt")
    state = model.state_dict()
    state["conv1.conv.weight"][0, 0, 0, 0] = float("nan")
    state["fc.bias"][3] = float("inf")
    torch.save({"state_dict": state}, d / "nan.pt")
    for bits in (4, 2):
        save_policy(uniform_policy(model, "small_cnn", bits, bits), d / f"w{bits}.json")
    # a fine-tuned checkpoint: quantized per w4.json, calibrated, the policy stored next to the weights
    q = create_model("small_cnn")
    w4 = json.loads((d / "w4.json").read_text())
    apply_policy(q, w4)
    x = build_dataset(DataConfig(name="digits", augment=False), "train")
    calibrate(q, [torch.stack([x[i][0] for i in range(32)])], 1)
    save_checkpoint(d / "quant.pt", model=q.state_dict(), policy=w4, config={"w_method": "symmetric"})
    other = {"format": "gmpq-policy/1", "model": "resnet20", "created_by": {"method": "uniform"}, "layers": {},
             "default": {"w_bits": 4, "a_bits": 4}}
    (d / "r20_default.json").write_text(json.dumps(other))
    text = (d / "w4.json").read_text()
    (d / "dup.json").write_text(text.replace('"layers": {', '"layers": {\n "fc": {"w_bits": 2, "a_bits": 2},', 1))
    bad = json.loads(text)
    bad["layers"]["conv2.conv"]["w_bits"] = 9
    bad["layers"]["conv9.conv"] = {"w_bits": 4, "a_bits": 4}
    (d / "bad_all.json").write_text(json.dumps(bad))
    (d / "afile").write_text("I am a file, not a folder\n")
    (d / "dup.yaml").write_text("epochs: 3\nlr: 0.01\nepochs: 4\n")
    (d / "result.json").write_text(json.dumps({"name": "a", "top1": 0.5, "bops_g": 0.1}))
    (d / "bad_result.json").write_text(json.dumps({"name": "a", "top1": "high", "bops_g": 0.1}))
    _images(d / "gray", ["a", "b"], "L")
    _images(d / "rgb", ["a", "b"], "RGB")
    _images(d / "one", ["a"], "L")
    _images(d / "corrupt", ["a", "b"], "L", corrupt="zz_broken.png")
    g = np.random.default_rng(0)
    xs = g.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    ys = np.arange(20) % 10
    np.savez(d / "labels.npz", x_train=xs, y_train=ys, x_test=xs, y_test=np.where(ys == 3, 12, ys))
    # a DETR checkpoint with a NaN weight
    raw = torch.load(ASSET, map_location="cpu", weights_only=False)
    key = next(k for k, v in raw["model"].items() if v.is_floating_point())
    raw["model"][key].view(-1)[0] = float("nan")
    torch.save(raw, d / "detr_nan.pth")
    return d


EVAL = ["evaluate", "--device", "cpu", "--batch-size", "64"]
FT = ["finetune", "--model", "small_cnn", "--data", "digits", "--policy", "{d}/w4.json", "--out", "{d}/ft",
      "--set", "progress=false", "--set", "tensorboard=false"]

# (id, cli, argv with {d} for the fixture folder, fragments of the expected error)
CASES = [
    # silent wrong results before
    ("export-policy-other-than-checkpoint", "gmpq", ["export", "--model", "small_cnn", "--weights", "{d}/quant.pt",
     "--policy", "{d}/w2.json", "--out", "{d}/out/m.packed", "--no-onnx"], ["differs from the policy stored",
                                                                            "w_bits 4 -> 2", "--override-policy"]),
    ("evaluate-policy-other-than-checkpoint", "gmpq", EVAL + ["--model", "small_cnn", "--weights", "{d}/quant.pt",
     "--policy", "{d}/w2.json", "--data", "digits"], ["differs from the policy stored", "conv1.conv"]),
    ("cost-policy-for-another-model", "gmpq", ["cost", "--model", "small_cnn", "--policy", "{d}/r20_default.json"],
     ["policy is for model 'resnet20', not 'small_cnn'"]),
    ("policy-duplicate-key", "gmpq", ["policy", "validate", "{d}/dup.json"], ["dup.json", "key 'fc' twice"]),
    ("evaluate-nan-weights", "gmpq", EVAL + ["--model", "small_cnn", "--weights", "{d}/nan.pt", "--data", "digits"],
     ["non-finite weights", "conv1.conv.weight (1 of", "fc.bias"]),
    ("export-nan-weights", "gmpq", ["export", "--model", "small_cnn", "--weights", "{d}/nan.pt", "--policy",
     "{d}/w4.json", "--out", "{d}/out/n.packed", "--no-onnx"], ["non-finite weights"]),
    ("evaluate-labels-out-of-range", "gmpq", EVAL + ["--model", "resnet20", "--weights", "{d}/r20.pt", "--data",
     "cifar10_npz:{d}/labels.npz"], ["labels.npz", "2 label(s) outside 0..9", "12"]),
    ("evaluate-one-class", "gmpq", EVAL + ["--model", "small_cnn", "--weights", "{d}/float.pt", "--data",
     "imagefolder:{d}/one"], ["1 class(es) ['a']", "at least 2"]),
    ("evaluate-corrupt-image", "gmpq", EVAL + ["--model", "small_cnn", "--num-classes", "2", "--weights",
     "{d}/float2.pt", "--data", "imagefolder:{d}/corrupt"], ["zz_broken.png", "cannot be decoded"]),
    ("evaluate-classes-vs-model", "gmpq", EVAL + ["--model", "small_cnn", "--weights", "{d}/float.pt", "--data",
     "imagefolder:{d}/gray"], ["2 classes but the model has 10 outputs", "--num-classes 2"]),
    ("evaluate-rgb-into-1-channel-model", "gmpq", EVAL + ["--model", "small_cnn", "--num-classes", "2", "--weights",
     "{d}/float2.pt", "--data", "imagefolder:{d}/rgb"], ["3 channel(s) but model 'small_cnn' takes 1",
                                                          "data.channels=1"]),
    ("evaluate-gray-into-3-channel-model", "gmpq", EVAL + ["--model", "resnet20", "--num-classes", "2", "--weights",
     "{d}/r20_2.pt", "--data", "imagefolder:{d}/gray"], ["1 channel(s) but model 'resnet20' takes 3",
                                                       "data.channels=3"]),
    ("finetune-negative-lr", "gmpq", FT + ["--set", "lr=-0.1"], ["lr=-0.1 is out of range; accepted: > 0"]),
    ("finetune-negative-momentum", "gmpq", FT + ["--set", "optimizer=sgd", "--set", "momentum=1.5"],
     ["momentum=1.5 is out of range; accepted: [0, 1)"]),
    ("finetune-negative-image-count", "gmpq", FT + ["--set", "data.train_subset=-5"], ["data.train_subset=-5"]),
    ("finetune-zero-calib-batches", "gmpq", FT + ["--set", "calib_batches=0"], ["calib_batches"]),
    ("recipe-duplicate-key", "gmpq", FT + ["--recipe", "{d}/dup.yaml"], ["dup.yaml", "'epochs' is given twice"]),
    ("finetune-negative-epochs", "gmpq", FT + ["--epochs", "-1"], ["epochs=-1"]),
    ("finetune-out-is-a-file", "gmpq", FT[:-6] + ["--out", "{d}/afile"], ["afile", "existing file"]),
    ("search-negative-arch-lr", "gmpq", ["search", "--set", "optim.arch_lr=-1", "--set", "out_dir={d}/s"],
     ["optim.arch_lr=-1.0 is out of range"]),
    ("search-zero-batch", "gmpq", ["search", "--set", "data.batch_size=0", "--set", "out_dir={d}/s"],
     ["data.batch_size=0"]),
    ("cost-input-size-0", "gmpq", ["cost", "--model", "small_cnn", "--input-size", "0", "16", "16"],
     ["--input-size", "must be a positive integer"]),
    ("evaluate-batch-size-0", "gmpq", ["evaluate", "--model", "small_cnn", "--weights", "{d}/float.pt", "--data",
     "digits", "--batch-size", "0"], ["--batch-size", "must be a positive integer"]),
    # tracebacks before
    ("cost-json-under-a-file", "gmpq", ["cost", "--model", "small_cnn", "--json", "{d}/afile/cost.json"],
     ["cannot create the folder", "afile"]),
    ("policy-uniform-out-under-a-file", "gmpq", ["policy", "uniform", "--model", "small_cnn", "--w-bits", "4",
     "--out", "{d}/afile/p.json"], ["cannot create the folder", "afile"]),
    ("policy-uniform-out-is-a-folder", "gmpq", ["policy", "uniform", "--model", "small_cnn", "--w-bits", "4",
     "--out", "{d}/gray"], ["cannot write", "is a folder"]),
    ("report-out-is-a-file", "gmpq", ["report", "{d}/result.json", "--out", "{d}/afile"],
     ["cannot create the folder", "afile"]),
    ("report-missing-result", "gmpq", ["report", "{d}/nope.json", "--out", "{d}/rep"], ["nope.json",
                                                                                       "does not exist"]),
    ("report-result-field-not-a-number", "gmpq", ["report", "{d}/bad_result.json", "--out", "{d}/rep"],
     ["bad_result.json", "top1='high' should be number(s)"]),
    ("finetune-nan-weights", "gmpq", FT + ["--weights", "{d}/nan.pt"], ["nan.pt", "non-finite weights"]),
    # honesty: every problem of a policy in one message
    ("policy-validate-all-problems", "gmpq", ["policy", "validate", "{d}/bad_all.json"],
     ["w_bits=9 is not accepted", "conv9.conv"]),
    ("policy-bad-bits", "gmpq", ["policy", "uniform", "--model", "small_cnn", "--w-bits", "9", "--out",
     "{d}/p9.json"], ["w_bits", "9"]),
    ("evaluate-missing-weights", "gmpq", EVAL + ["--model", "small_cnn", "--weights", "{d}/nope.pt", "--data",
     "digits"], ["nope.pt", "does not exist"]),
    ("unknown-model", "gmpq", ["cost", "--model", "resnet21"], ["unknown model 'resnet21'", "resnet20"]),
    # detr-ptq
    ("detr-ptq-missing-checkpoint", "detr", ["ptq", "--checkpoint", "{d}/nope.pth", "--coco-dir", "{d}"],
     ["nope.pth", "does not exist"]),
    ("detr-qat-missing-checkpoint", "detr", ["qat", "--set", "checkpoint={d}/nope.pth", "--set", "out_dir={d}/qat"],
     ["nope.pth", "does not exist"]),
    ("detr-eval-missing-checkpoint", "detr", ["eval", "--checkpoint", "{d}/nope.pth", "--coco-dir", "{d}",
     "--out", "{d}/e.json"], ["nope.pth", "does not exist"]),
    ("detr-eval-nan-checkpoint", "detr", ["eval", "--checkpoint", "{d}/detr_nan.pth", "--coco-dir", "{d}",
     "--out", "{d}/e.json"], ["detr_nan.pth", "non-finite weights"]),
    ("detr-eval-out-under-a-file", "detr", ["eval", "--checkpoint", str(ASSET), "--coco-dir", "{d}",
     "--out", "{d}/afile/e.json"], ["afile", "existing file, not a folder"]),
    ("detr-eval-min-size-0", "detr", ["eval", "--checkpoint", str(ASSET), "--coco-dir", "{d}", "--min-size", "0"],
     ["--min-size", "must be a positive integer"]),
    ("detr-allocate-target-above-candidates", "detr", ["allocate", "--sensitivity", "{d}/s.json", "--target", "7",
     "--set", "allocate.candidate_bits=[3,4,5,6]"], ["target_bits=7.0 is outside the candidate bits [3, 4, 5, 6]"]),
    ("detr-allocate-target-9", "detr", ["allocate", "--sensitivity", "{d}/s.json", "--target", "9"],
     ["target_bits=9.0 is out of range; accepted: [2, 8]"]),
    ("detr-sensitivity-zero-images", "detr", ["sensitivity", "--num-images", "0", "--out-dir", "{d}/sens"],
     ["num_images=0", "must be >= 1"]),
    ("detr-train-negative-lr", "detr", ["train", "--set", "lr=-1", "--set", "out_dir={d}/t"], ["lr=-1.0"]),
    ("detr-qat-zero-batch", "detr", ["qat", "--set", "batch_size=0", "--set", "out_dir={d}/qat"], ["batch_size=0"]),
    ("detr-ptq-policy-duplicate-key", "detr", ["ptq", "--checkpoint", str(ASSET), "--policy", "{d}/dup.json",
     "--coco-dir", "{d}", "--out", "{d}/ptq.json"], ["key 'fc' twice"]),
]


def run_cli(cli: str, argv: list[str], capsys) -> tuple[int, str]:
    main = gmpq_main if cli == "gmpq" else detr_main
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("cli, argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(d, capsys, one_thread, cli, argv, fragments):
    rc, err = run_cli(cli, [a.replace("{d}", str(d)) for a in argv], capsys)
    assert rc not in (0, None), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def test_checkpoint_policy_is_used_and_override_warns(d, capsys, one_thread):
    """``gmpq evaluate`` of a checkpoint that stores its policy: without --policy it uses the stored one and writes
    it in the result; --override-policy applies another one with a warning naming the differences."""
    out = d / "eval.json"
    rc, err = run_cli("gmpq", EVAL + ["--model", "small_cnn", "--weights", str(d / "quant.pt"), "--data", "digits",
                                      "--out", str(out)], capsys)
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result["policy"] == f"stored in {d / 'quant.pt'}" and result["method"] == "uniform"
    assert result["avg_w_bits"] == 4.0
    rc, err = run_cli("gmpq", EVAL + ["--model", "small_cnn", "--weights", str(d / "quant.pt"), "--data", "digits",
                                      "--policy", str(d / "w2.json"), "--override-policy", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "gmpq: warning: --override-policy" in err and "conv1.conv: w_bits 4 -> 2, a_bits 4 -> 2" in err
    assert json.loads(out.read_text())["avg_w_bits"] == 2.0


def test_grayscale_imagefolder_end_to_end(d, capsys, one_thread):
    """A grayscale ImageFolder feeds a 1-channel model as stored, and a 3-channel model with --channels 3."""
    for model, weights, extra in (("small_cnn", "float2.pt", []), ("resnet20", "r20_2.pt", ["--channels", "3"])):
        out = d / f"gray_{model}.json"
        rc, err = run_cli("gmpq", EVAL + ["--model", model, "--num-classes", "2", "--weights", str(d / weights),
                                          "--data", f"imagefolder:{d / 'gray'}", "--out", str(out)] + extra, capsys)
        assert rc == 0, err
        assert json.loads(out.read_text())["n_test"] == 6
    gray = build_dataset(DataConfig(name="imagefolder", root=str(d / "gray"), image_size=16), "test")
    rgb = build_dataset(DataConfig(name="imagefolder", root=str(d / "gray"), image_size=16, channels=3), "test")
    x1, x3 = gray[0][0], rgb[0][0]
    assert x1.shape == (1, 16, 16) and x3.shape == (3, 16, 16)
    # the conversion replicates the gray level: the three channels differ only by the per-channel normalization
    from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD

    pixels = [x3[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[0], pixels[2], atol=1e-6)


def test_models_verb_lists_the_registry(capsys):
    """``--help`` texts point to ``gmpq models``: it exists and lists every registered model with its input."""
    from gmpq.models import list_models

    assert gmpq_main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == list_models()
    assert any(ln.split()[:3] == ["small_cnn", "1x16x16", "10"] for ln in lines)


def test_detr_eval_never_writes_into_the_package(monkeypatch, tmp_path):
    """The default metrics path of ``detr-ptq eval`` is under runs/eval/ of the working folder, not beside the
    checkpoint (which may be inside the package)."""
    import argparse

    from detr_ptq import cli_eval

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_eval, "evaluate_checkpoint", lambda *a, **k: {"split": "val", "images": 1, "AP": 0.5})
    args = argparse.Namespace(checkpoint=str(ASSET), coco_dir="x", split=None, config=None, min_size=None,
                              max_size=None, batch_size=1, progress=False, out=None)
    assert cli_eval.run(args) == 0
    assert (tmp_path / "runs" / "eval" / "detr_tiny_digits.eval_val.json").is_file()
    assert not list(ASSET.parent.glob("*.json"))


# ---- I/O faults (issue 18): disk full, read-only, stale temporary files ---------------------------------------

def _raise(err: int):
    def f(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return f


@pytest.mark.parametrize("writer", ["json", "torch"])
def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, writer):
    """ENOSPC while writing: a UserError naming the file and "no space left on device"; the previous version of
    the file is intact and no temporary file is left behind."""
    from gmpq import io as gio
    from gmpq.errors import UserError

    target = tmp_path / ("a.json" if writer == "json" else "a.pt")
    write = (lambda obj: gio.atomic_write_json(target, obj)) if writer == "json" else \
        (lambda obj: gio.atomic_torch_save(obj, target))
    write({"v": 1})
    before = target.read_bytes()
    monkeypatch.setattr(gio.os, "fsync", _raise(errno.ENOSPC))
    with pytest.raises(UserError, match=rf"cannot write '{target}': no space left on device.*\[errno ENOSPC\]"):
        write({"v": 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_disk_full_and_read_only_in_a_cli_verb(tmp_path, monkeypatch, capsys):
    """``gmpq policy uniform`` on a full disk / a read-only file system: exit 2, the file and the cause named."""
    from gmpq import io as gio

    out = tmp_path / "p.json"
    monkeypatch.setattr(gio.os, "fsync", _raise(errno.ENOSPC))
    rc, err = run_cli("gmpq", ["policy", "uniform", "--model", "small_cnn", "--w-bits", "4", "--out", str(out)],
                      capsys)
    assert rc == 2 and f"cannot write '{out}': no space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(gio.tempfile, "mkstemp", _raise(errno.EROFS))
    rc, err = run_cli("gmpq", ["policy", "uniform", "--model", "small_cnn", "--w-bits", "4", "--out", str(out)],
                      capsys)
    assert rc == 2 and f"cannot write '{out}': the file system is read-only" in err
    rc, err = run_cli("gmpq", FT[:-6] + ["--out", str(tmp_path / "ft")], capsys)
    assert rc == 2 and "ft' is not writable: the file system is read-only" in err and "[errno EROFS]" in err


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    """A killed write leaves ``.<name>.<pid>-<random>.tmp``; the next ``ensure_writable_dir`` (every run's first
    step) removes it when its writer is gone, keeps a write in progress, and leaves other files alone."""
    from gmpq.io import clean_stale_temps, ensure_writable_dir

    dead = tmp_path / ".policy.json.99999999-ab12cd34.tmp"  # pid above the kernel's maximum: never alive
    old_format = tmp_path / ".log.jsonl.k2j4_x9q.tmp"  # the 8-character mkstemp suffix of earlier versions
    alive = tmp_path / f".model_final.pt.{os.getpid()}-zz99yy88.tmp"
    keep = [tmp_path / ".hidden.tmp", tmp_path / "notes.tmp", tmp_path / "policy.json"]
    for p in [dead, old_format, alive, *keep]:
        p.write_text("x")
    ensure_writable_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [alive, *keep])
    assert clean_stale_temps(tmp_path) == []


def test_killed_write_leaves_a_temp_that_the_next_run_removes(tmp_path):
    """End to end: a subprocess killed (SIGKILL) in the middle of an atomic write leaves its temporary file; the
    target is untouched; the next run's ``ensure_writable_dir`` removes the leftover."""
    import subprocess
    import sys

    script = f"""
import os, signal
from gmpq import io
def die(fd):
    os.kill(os.getpid(), signal.SIGKILL)
io.os.fsync = die
io.atomic_write_json({str(tmp_path / 'result.json')!r}, {{"top1": 0.9}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".result.json.") and left[0].endswith(".tmp")
    from gmpq.io import ensure_writable_dir

    ensure_writable_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_detection_ap_zero_reasons_are_warned():
    """AP 0 because the detector found nothing, or because its category ids are not the dataset's, is named."""
    from gmpq.detection.coco_eval import detection_warnings

    gt = {"categories": [{"id": 1}, {"id": 2}], "images": [{"id": 1}], "annotations": []}
    assert "no detections on 3 image(s)" in detection_warnings(gt, [], 3)[0]
    det = [{"image_id": 1, "category_id": c, "bbox": [0, 0, 1, 1], "score": 0.9} for c in (0, 7, 7, 1)]
    (msg,) = detection_warnings(gt, det, 1)
    assert "75% of the detections have category ids [0, 7]" in msg and "do not match" in msg
    assert detection_warnings(gt, det[2:] + det[3:] * 2, 1) == []  # one stray id in four: normal, no warning


def test_detr_eval_warns_about_categories_the_checkpoint_cannot_predict():
    from detr_ptq.cli_eval import warn_unreachable_categories
    from gmpq.errors import InputWarning

    coco = {"categories": [{"id": i} for i in (1, 2, 18, 90)]}
    with pytest.warns(InputWarning, match=r"2 of the dataset's 4 categories have ids >= 11 \(\[18, 90\]\)"):
        assert warn_unreachable_categories(coco, 11, "digits.pth") == [18, 90]
    assert warn_unreachable_categories(coco, 91, "detr_r50.pth") == []

"""gmpq export: PTQ straight from float weights (the same model as gmpq evaluate --policy), a fine-tuned checkpoint
without calibration, the integer ONNX scored by onnxruntime, and the inputs it refuses."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gmpq.data import DataConfig
from gmpq.deploy.calibration import calibrate_on_data
from gmpq.deploy.export_model import ExportConfig, export_model
from gmpq.deploy.run_eval import EvalConfig, evaluate_model
from gmpq.errors import InputWarning, UserError
from gmpq.models import create_model, model_spec
from gmpq.quant import apply_policy, save_policy, uniform_policy
from gmpq.runtime import save_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory, train_digits_cnn):
    """A small_cnn trained in float on digits, W4A4 and W2A2 policies, and a 'fine-tuned' W4A4 checkpoint
    (calibrated, storing its policy and training data like gmpq finetune's model_final.pt)."""
    d = tmp_path_factory.mktemp("export")
    model = train_digits_cnn(3)
    torch.save({"state_dict": model.state_dict()}, d / "float.pt")
    for bits in (4, 2):
        save_policy(uniform_policy(create_model("small_cnn"), "small_cnn", bits, bits), d / f"w{bits}.json")
    w4 = json.loads((d / "w4.json").read_text())
    apply_policy(model, w4)
    calibrate_on_data(model, DataConfig(name="digits"), model_spec("small_cnn"), None, 4, "cpu")
    save_checkpoint(d / "ft.pt", model=model.state_dict(), policy=w4, config={"data": {"name": "digits"}})
    return d


@pytest.mark.slow
def test_ptq_export_reproduces_evaluate_and_onnxruntime_agrees(files, tmp_path):
    ev = evaluate_model(EvalConfig(model="small_cnn", weights=str(files / "float.pt"), policy=str(files / "w4.json"),
                                   data=DataConfig(name="digits"), device="cpu"))
    rep = export_model(ExportConfig(model="small_cnn", weights=str(files / "float.pt"),
                                    policy=str(files / "w4.json"), calib_data="digits", out=str(tmp_path / "m.gmpq"),
                                    latency=False))
    assert rep["calibrated_now"] and ev["calibrated_now"]
    assert rep["top1"]["fake_quant"] == ev["top1"]  # same calibration, same model: exactly the same accuracy
    packed = evaluate_model(EvalConfig(model="small_cnn", packed=str(tmp_path / "m.gmpq"),
                                       data=DataConfig(name="digits"), device="cpu"))
    assert packed["top1"] == ev["top1"]
    # onnxruntime with its optimizations on runs integer kernels and scores within 0.2 points of fake-quant
    ops, layers = rep["ort_optimized_ops"], rep["integer_onnx"]["integer_layers"]
    # conv5 feeds the pooling head: ConvInteger with its exact float output; the others end in the next quantizer
    assert ops["QLinearConv"] == 4 and ops["ConvInteger"] == 1 and ops["QGemm"] == 1
    assert "Conv" not in ops and "Gemm" not in ops and rep["integer_onnx"]["float_outputs"] == ["conv5.conv"]
    assert layers == [f"conv{i}.conv" for i in range(1, 6)] + ["fc"]
    # of 360 images at most two change the count of correct ones. The one difference left from the fake-quant model
    # is QLinearConv's contract: the bias in int32 codes of the accumulator step s_x*s_w (off by up to half a step)
    # and the accumulator rescaled to the output grid in float32; at 4 bits the accumulator step is a large fraction
    # of the output step, so values near a rounding boundary take the other code (docs/deploy.md: with every conv
    # as ConvInteger instead, 1 of 360 argmaxes differs; with QLinearConv, about 10, in both directions)
    assert abs(rep["top1"]["onnx_integer_optimized"] - rep["top1"]["fake_quant"]) * rep["top1"]["n_test"] <= 2 + 1e-9
    assert rep["top1"]["float"] > 0.9 and rep["sizes_bytes"]["packed"] < rep["sizes_bytes"]["onnx_float"] / 3
    saved = json.loads((tmp_path / "m.gmpq.json").read_text())
    assert saved["top1"] == rep["top1"] and saved["file_bytes"] == (tmp_path / "m.gmpq").stat().st_size


@pytest.mark.slow
def test_finetuned_checkpoint_exports_without_calibration(files, tmp_path):
    rep = export_model(ExportConfig(model="small_cnn", weights=str(files / "ft.pt"), out=str(tmp_path / "m.gmpq"),
                                    latency=False))
    ev = evaluate_model(EvalConfig(model="small_cnn", weights=str(files / "ft.pt"), data=DataConfig(name="digits"),
                                   device="cpu"))
    assert not rep["calibrated_now"] and rep["calib_data"] == "digits"  # the checkpoint's data, for the report
    assert rep["top1"]["fake_quant"] == ev["top1"]


def test_int_outputs_option_selects_the_requantized_graph(files, tmp_path):
    """--int-outputs uint8: conv5's output (into the pooling head) is a QLinearConv requantized to uint8 instead of
    the default exact ConvInteger; an unknown mode is refused by the CLI with the accepted values."""
    rep = export_model(ExportConfig(model="small_cnn", weights=str(files / "ft.pt"), out=str(tmp_path / "m.gmpq"),
                                    latency=False, evaluate=False, int_outputs="uint8"))
    i = rep["integer_onnx"]
    assert i["output_mode"] == "uint8" and i["requantized_outputs"] == ["conv5.conv"] and i["float_outputs"] == []
    assert rep["ort_optimized_ops"]["QLinearConv"] == 5 and "ConvInteger" not in rep["ort_optimized_ops"]
    r = subprocess.run([sys.executable, "-m", "gmpq", "export", "--model", "small_cnn", "--weights",
                        str(files / "ft.pt"), "--out", str(tmp_path / "x.gmpq"), "--int-outputs", "int4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'float', 'uint8'" in r.stderr and not (tmp_path / "x.gmpq").exists()


def test_policy_other_than_stored_is_refused_or_overridden_with_warning(files, tmp_path):
    cfg = dict(model="small_cnn", weights=str(files / "ft.pt"), policy=str(files / "w2.json"), onnx=False)
    with pytest.raises(UserError, match="differs from the policy stored"):
        export_model(ExportConfig(**cfg, out=str(tmp_path / "a.gmpq")))
    with pytest.warns(InputWarning, match=r"conv2.conv: w_bits 4 -> 2, a_bits 4 -> 2"):
        rep = export_model(ExportConfig(**cfg, override_policy=True, out=str(tmp_path / "b.gmpq")))
    assert "overrides the policy stored" in rep["policy"]


def _gray_folder(root, classes):
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(g.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(root / split / c / f"{i}.png")
    return root


def test_calibration_data_that_does_not_fit_is_refused(files, tmp_path):
    torch.save({"state_dict": create_model("resnet20").state_dict()}, tmp_path / "r20.pt")
    save_policy(uniform_policy(create_model("resnet20"), "resnet20", 8, 8), tmp_path / "r20.json")
    with pytest.raises(UserError, match=r"--calib-data 'digits' \(train split\) does not fit(.|\n)*1 channel\(s\) but "
                                        r"model 'resnet20' takes 3"):
        export_model(ExportConfig(model="resnet20", weights=str(tmp_path / "r20.pt"), policy=str(tmp_path / "r20.json"),
                                  calib_data="digits", out=str(tmp_path / "r.gmpq")))
    folder = _gray_folder(tmp_path / "two", ["a", "b"])
    with pytest.raises(UserError, match="2 classes but the model has 10 outputs"):
        export_model(ExportConfig(model="small_cnn", weights=str(files / "float.pt"), policy=str(files / "w4.json"),
                                  calib_data=f"imagefolder:{folder}", out=str(tmp_path / "s.gmpq")))
    assert not (tmp_path / "r.gmpq").exists() and not (tmp_path / "s.gmpq").exists()


def test_cli_float_weights_need_calib_data(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gmpq", "export", "--model", "small_cnn", "--weights",
                        str(files / "float.pt"), "--policy", str(files / "w4.json"), "--out", str(tmp_path / "m.gmpq")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--calib-data" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.shared_data
def test_resnet20_integer_onnx_within_0_2_points_on_cifar(shared_data, tmp_path):
    """PTQ W8A8 ResNet-20 from the pretrained float weights: onnxruntime's integer kernels (optimized session) score
    within 0.2 points of the fake-quant model on the 1,017 lossless CIFAR-10 test images."""
    save_policy(uniform_policy(create_model("resnet20"), "resnet20", 8, 8, keep_full_precision=("conv1", "linear")),
                tmp_path / "w8a8.json")
    rep = export_model(ExportConfig(model="resnet20", weights=str(shared_data / "cifar_resnets" /
                                                                  "resnet20-12fca82f.th"),
                                    policy=str(tmp_path / "w8a8.json"), calib_data=f"cifar10_npz:{shared_data}/cifar10",
                                    out=str(tmp_path / "r20.gmpq"), latency=False))
    t = rep["top1"]
    assert t["n_test"] == 1017 and abs(t["onnx_integer_optimized"] - t["fake_quant"]) <= 0.002
    ops = rep["ort_optimized_ops"]  # every conv but the float first one; those before a residual Add: ConvInteger
    assert ops["QLinearConv"] + ops["ConvInteger"] == 18 and len(rep["integer_onnx"]["float_outputs"]) == 9
    assert len(rep["integer_onnx"]["uint8_weight_layers"]) == 18  # 8-bit weights: the exact u8u8 kernels

"""``export_model(cfg) -> report``: a quantized classifier as files to ship, and what they cost and score.

Input: float weights + a policy (post-training quantization: the activation quantizers are calibrated on
``calib_data`` exactly as ``gmpq evaluate --policy`` does), or a fine-tuned checkpoint (its stored policy; no
calibration). Output, next to ``out`` (the packed file, e.g. ``runs/export/r20.gmpq``)::

    r20.gmpq            packed integer weights at their bit-widths (gmpq.quant.export)
    r20.onnx            QDQ reference graph: the fake-quant model op for op (exact; onnxruntime runs it in float)
    r20.int.onnx        integer graph onnxruntime fuses into QLinearConv/QGemm (gmpq.quant.onnx_integer)
    r20.float.onnx      the same network without quantizers (the latency baseline)
    r20.gmpq.json       the deploy report (sizes, top-1, latency); also printed
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from gmpq.data import DataConfig, build_dataset, check_dataset_for_model
from gmpq.deploy.calibration import calibrate_on_data, calibration_loader
from gmpq.deploy.datasets import data_arg
from gmpq.deploy.evaluate import evaluate
from gmpq.deploy.run_eval import EvalConfig, build_eval_model
from gmpq.errors import UserError
from gmpq.io import atomic_write_json
from gmpq.models import model_spec
from gmpq.models.weights import checkpoint_config
from gmpq.quant import export_packed, is_calibrated, theoretical_packed_bytes
from gmpq.quant.modules import quantizers_disabled
from gmpq.quant.policy_agreement import describe


@dataclasses.dataclass
class ExportConfig:
    model: str = "resnet20"
    weights: str | None = None  # float weights (PTQ, needs policy + calib_data) or a fine-tuned checkpoint
    out: str = "runs/export/model.gmpq"  # the packed file; the other files go next to it
    num_classes: int | None = None
    policy: str | None = None
    override_policy: bool = False  # apply ``policy`` where it differs from the checkpoint's stored policy (warns)
    calib_data: str | None = None  # --data syntax; default: the data a fine-tuned checkpoint was trained on
    calib_batches: int = 8
    channels: int | None = None
    onnx: bool = True  # write the ONNX models (and measure them)
    evaluate: bool = True  # top-1 of float / fake-quant / onnxruntime on the calib data's test split
    latency: bool = True
    latency_rounds: int = 15
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int = 1
    int_outputs: str = "float"  # integer ONNX: convolution outputs that feed a float op (gmpq.quant.onnx_outputs)


def _checkpoint_data(weights: str) -> str | None:
    """The training data recorded in a fine-tune checkpoint's config (``name`` or ``name:root``), if any."""
    data = checkpoint_config(weights).get("data", {})
    if not isinstance(data, dict) or not data.get("name"):
        return None
    return data["name"] + (f":{data['root']}" if data.get("root") else "")


def _data(cfg: ExportConfig, quantized_checkpoint: bool) -> DataConfig | None:
    text = cfg.calib_data or (_checkpoint_data(cfg.weights) if quantized_checkpoint else None)
    return None if text is None else DataConfig(**data_arg(text), augment=False, channels=cfg.channels)


class OrtClassifier(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` interface, so ``evaluate`` scores it like the torch models."""

    def __init__(self, path: str | Path, threads: int = 1):
        super().__init__()
        from gmpq.deploy.latency import session

        self.sess = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {self.sess.get_inputs()[0].name: x.cpu().numpy()})[0])


def _float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The float baseline: the model without quantizers, with zero Pads folded into the following Conv (as the
    integer graph has them; onnxruntime does not fold them itself and then reorders NCHWc tensors around them)."""
    import warnings

    import onnx

    from gmpq.quant.onnx_graph import Graph
    from gmpq.quant.onnx_outputs import fold_zero_pads

    with quantizers_disabled(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    gr = Graph(onnx.load(str(path)))
    if fold_zero_pads(gr):
        gr.finish()
        onnx.save(gr.model, str(path))


class _FloatView(nn.Module):
    """The quantized model with its quantizers disabled: the float network with the same weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with quantizers_disabled(self.model):
            return self.model(x)


def export_model(cfg: ExportConfig) -> dict:
    """Write the packed file, the ONNX models and the deploy report; returns the report."""
    if not cfg.weights:
        raise UserError("export needs --weights FILE (float weights with --policy, or a fine-tuned checkpoint)")
    spec = model_spec(cfg.model)
    model, policy, source = build_eval_model(EvalConfig(model=cfg.model, num_classes=cfg.num_classes,
                                                        weights=cfg.weights, policy=cfg.policy,
                                                        override_policy=cfg.override_policy))
    if policy is None:
        raise UserError(f"--weights {cfg.weights!r} is a float checkpoint that stores no policy; pass --policy FILE "
                        "(and --calib-data DATA to calibrate the activation quantizers)")
    model.eval()
    calibrated_now = not is_calibrated(model)
    data = _data(cfg, quantized_checkpoint=not calibrated_now)
    if calibrated_now:
        if data is None:
            raise UserError(f"--weights {cfg.weights!r} holds float weights: post-training quantization calibrates "
                            "the activation quantizers on data; pass --calib-data DATA (e.g. cifar10_npz)")
        calibrate_on_data(model, data, spec, cfg.num_classes, cfg.calib_batches, "cpu", flag="--calib-data")
    report = {"model": cfg.model, "weights": cfg.weights, "policy": source, **describe(policy),
              "calibrated_now": calibrated_now, "calib_data": None if data is None else data.name,
              "calib_batches": cfg.calib_batches if calibrated_now else None}
    calib, test = None, None
    if data is not None and cfg.onnx:
        loader = calibration_loader(data, spec, cfg.num_classes, "--calib-data")
        calib = [b[0] for b, _ in zip(loader, range(cfg.calib_batches))]
        test = _test_loader(data, spec, cfg) if cfg.evaluate else None
    report.update(write_deploy_files(model, policy, spec.input_size, Path(cfg.out), calib, test, cfg, report))
    atomic_write_json(Path(cfg.out).with_suffix(Path(cfg.out).suffix + ".json"), report)
    return report


def write_deploy_files(model: nn.Module, policy: dict, input_size, out: Path, calib: list | None,
                       test: DataLoader | None, cfg: ExportConfig, meta: dict | None = None) -> dict:
    """The packed file and (``cfg.onnx``) the three ONNX models of a calibrated ``model``, with their sizes,
    top-1 (``test``: a loader of ``(x, y)``), the kernels onnxruntime picks and the float-vs-integer latency.

    ``calib``: input batches ``[N, C, H, W]`` for the requantization ranges of the integer ONNX (needed with
    ``cfg.int_outputs == "uint8"``; None there: no integer ONNX). Returns the report fields (``gmpq export``
    writes them to ``OUT.json``).
    """
    stats = export_packed(model, policy, out, meta={"weights": str(cfg.weights)})
    report = {**stats, "theoretical_bytes": theoretical_packed_bytes(model), "packed": str(out)}
    sizes = {"packed": stats["file_bytes"],
             "float_params": sum(t.numel() * 4 for k, t in model.state_dict().items()
                                 if t.is_floating_point() and ".w_quant." not in k and ".a_quant." not in k)}
    if cfg.onnx:
        report.update(_onnx_exports(model, input_size, calib, test, cfg, out, sizes))
    report["sizes_bytes"] = sizes
    return report


def _onnx_exports(model, input_size, calib, test, cfg: ExportConfig, out: Path, sizes: dict) -> dict:
    from gmpq.deploy.latency import compare_latency, op_counts, session
    from gmpq.quant.onnx_export import export_onnx, run_onnx
    from gmpq.quant.onnx_integer import export_integer_onnx

    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    paths = {"qdq": out.with_suffix(".onnx"), "integer": out.with_suffix(".int.onnx"),
             "float": out.with_suffix(".float.onnx")}
    export_onnx(model, x[:1], paths["qdq"])
    report = {"onnx": str(paths["qdq"])}
    with torch.no_grad():
        report["onnx_max_abs_diff"] = float((run_onnx(paths["qdq"], x) - model(x)).abs().max())
    _float_onnx(model, x[:1], paths["float"])
    if calib is None and cfg.int_outputs == "uint8":
        report["integer_onnx"] = "skipped: the requantization ranges need data; pass --calib-data DATA"
        return report
    report["integer_onnx"] = export_integer_onnx(model, x[:1], paths["integer"], calib or [],
                                                 outputs=cfg.int_outputs).as_dict()
    with tempfile.TemporaryDirectory() as tmp:
        session(paths["integer"], cfg.threads, optimized_path=Path(tmp) / "opt.onnx")
        report["ort_optimized_ops"] = op_counts(Path(tmp) / "opt.onnx")
    sizes.update({f"onnx_{k}": p.stat().st_size for k, p in paths.items()})
    report.update({f"onnx_{k}_path": str(p) for k, p in paths.items()})
    if test is not None:
        report["top1"] = _accuracies(model, test, paths["integer"], cfg.threads)
    if cfg.latency:
        report["latency"] = compare_latency({"float": paths["float"], "integer": paths["integer"]},
                                            tuple(input_size), cfg.batch_sizes, cfg.latency_rounds,
                                            threads=cfg.threads)
    return report


def _test_loader(data: DataConfig, spec, cfg: ExportConfig) -> DataLoader | None:
    try:
        test = build_dataset(data, "test", train_transform=False)
    except UserError:
        return None  # a calibration-only dataset: the report has no accuracies
    check_dataset_for_model(test, spec, cfg.num_classes, f"--calib-data {data.name!r} (test split)")
    return DataLoader(test, data.eval_batch_size)


def _accuracies(model: nn.Module, test: DataLoader, integer_path: Path, threads: int) -> dict:
    out = {name: evaluate(m, test)["top1"] for name, m in
           (("float", _FloatView(model)), ("fake_quant", model),
            ("onnx_integer_optimized", OrtClassifier(integer_path, threads)))}
    out["n_test"] = len(test.dataset)
    return out


def format_report(r: dict) -> str:
    """The deploy report as a short text table."""
    lines = [f"deploy report: {r['model']} ({r.get('method')}, policy {r['policy']})"]
    s = r.get("sizes_bytes", {})
    lines.append("  size (KB): " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in s.items()))
    if isinstance(r.get("top1"), dict) and "float" in r["top1"]:
        t = r["top1"]
        lines.append(f"  top-1 (%) on {t['n_test']} test images: float {100 * t['float']:.2f}, fake-quant "
                     f"{100 * t['fake_quant']:.2f}, onnxruntime integer (optimized) "
                     f"{100 * t['onnx_integer_optimized']:.2f}")
    if isinstance(r.get("integer_onnx"), dict):
        i = r["integer_onnx"]
        ops = r.get("ort_optimized_ops", {})
        lines.append(f"  integer ONNX: {len(i['integer_layers'])} integer layers, {len(i['float_layers'])} float, "
                     f"{len(i['requantized_outputs'])} requantized / {len(i['float_outputs'])} exact float outputs; "
                     f"onnxruntime runs {ops.get('QLinearConv', 0)} QLinearConv, {ops.get('ConvInteger', 0)} "
                     f"ConvInteger, {ops.get('QGemm', 0)} QGemm, {ops.get('Conv', 0)} float Conv")
    for bs, v in (r.get("latency") or {}).get("batch", {}).items():
        ms, cpu = v["ms_per_image"], v["cpu_ms_per_image"]
        lines.append(f"  onnxruntime batch {bs}, {r['latency']['threads']} thread, median of "
                     f"{r['latency']['rounds']} interleaved rounds: wall float {ms['float']:.3f} / integer "
                     f"{ms['integer']:.3f} ms/image = {v['speedup']['integer']:.2f}x; CPU time float "
                     f"{cpu['float']:.3f} / integer {cpu['integer']:.3f} ms/image = {v['cpu_speedup']['integer']:.2f}x")
    return "\n".join(lines)

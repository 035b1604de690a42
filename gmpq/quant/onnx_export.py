"""ONNX export of a fake-quant model as a QDQ graph (QuantizeLinear/DequantizeLinear around every quantized
weight and activation), runnable by onnxruntime.

Each quantizer switches to ``onnx_mode``: the same integer grid, written with ``torch.fake_quantize_*`` (a Clip to
the b-bit range followed by an 8-bit Q/DQ pair), which the TorchScript exporter turns into QDQ nodes.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gmpq.quant.calibrate import require_calibrated
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer

OPSET = 17


@contextlib.contextmanager
def onnx_mode(model: nn.Module) -> Iterator[nn.Module]:
    qs = [m for m in model.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    for q in qs:
        q.onnx_mode = True
    try:
        yield model
    finally:
        for q in qs:
            q.onnx_mode = False


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write ``model`` (eval mode, calibrated) to ``path`` with a dynamic batch dimension. ``example`` is
    ``[N, C, H, W]``. The file is written to a temporary name and renamed, so a failed export leaves nothing."""
    require_calibrated(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    was_training = model.training
    model.eval()
    try:
        with onnx_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are static per layer; expected
            warnings.filterwarnings("ignore", "Constant folding")  # strided Slice (CIFAR shortcut): not folded
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return path


def run_onnx(path: str | os.PathLike, x: torch.Tensor, optimize: bool = False) -> torch.Tensor:
    """Run an exported model with onnxruntime on CPU; ``x`` ``[N, C, H, W]`` -> logits.

    ``optimize=False`` runs the QDQ graph as written (reference semantics). With ``optimize=True`` onnxruntime
    fuses QDQ patterns into integer kernels, which requantize intermediate results and so differ slightly.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def qdq_node_counts(path: str | os.PathLike) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts

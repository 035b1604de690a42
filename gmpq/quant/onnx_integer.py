"""Integer ONNX export: a QDQ graph in the exact form that onnxruntime's optimizer fuses into integer kernels.

``export_onnx`` (``onnx_export.py``) writes the fake-quant model as it computes: every quantized value as a
QuantizeLinear/DequantizeLinear pair, convolutions in float. onnxruntime cannot fuse that graph (weights are
computed at run time, BatchNorm sits between the convolution and the next quantizer, residual branches are
float), so it stays a float model. ``export_integer_onnx`` instead writes, for each quantized Conv/Gemm whose
input is quantized (a *integer layer*)::

    Q(x) [-> Clip_u8(lo, hi)] -> DQ ─┐
    int8 weight codes -> DQ(axis 0) ─┼─> Conv -> Q(y) ...      (onnxruntime: QLinearConv, uint8 x int8)
    int32 bias codes  -> DQ(axis 0) ─┘

Containers (documented contract, tested in ``tests/test_quant_onnx_integer.py``):
- Weights: ``b``-bit codes (``|c| <= 2^(b-1)-1``, LSQ: ``[-2^(b-1), 2^(b-1)-1]``) stored as int8, zero point 0,
  one scale per output channel. A BatchNorm that follows the convolution is folded into the scale
  (``s * |gamma/sigma|``, the codes' sign flipped where ``gamma < 0``), so the codes keep their ``b``-bit range.
- Activations (PACT): uint8. Unsigned ``b``-bit codes ``0..2^b-1`` with zero point 0; signed codes
  ``-(2^(b-1)-1)..2^(b-1)-1`` with zero point 128 (``1..255`` at 8 bits). Where the ``b``-bit range is narrower
  than the container (``b < 8``, or signed), a ``Clip`` on the uint8 codes restores the restricted range exactly.
- Bias: int32 codes at scale ``s_x * s_w`` (onnxruntime's QLinearConv contract): the one rounding the fake-quant
  model does not do (at most half a step of the accumulator, ``s_x*s_w/2``).
- Outputs (``gmpq/quant/onnx_outputs.py``): a fused QLinearConv must end in a QuantizeLinear. Where the output
  reaches the next layer's quantizer through ReLU / ReLU6 / Clip / zero Pad only, that quantizer moves onto the
  convolution output and those ops act on the codes (exact: a code Clip, a Pad with the zero point). Otherwise
  (a residual Add, several consumers, the pooling head) ``outputs="float"`` (default) writes ``ConvInteger``
  with the int32 accumulator scaled to float (exact up to float32 summation order); ``outputs="uint8"`` keeps a
  QLinearConv and inserts an 8-bit *requantization* ``Q -> DQ`` (uint8, asymmetric, calibration min/max), a
  rounding the fake-quant model does not do. A Gemm/MatMul output is never requantized (onnxruntime fuses it
  with a float output).

Layers with a float input (weight-only quantization, LSQ+ activations whose zero point is not an integer) keep
the float operator with their dequantized weights (exact, no integer kernel); ``IntegerExportStats`` counts them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.quant.calibrate import require_calibrated
from gmpq.quant.modules import is_quantized, quantizers_disabled
from gmpq.quant.onnx_graph import ActGrid, Graph
from gmpq.quant.onnx_outputs import OUTPUT_MODES, absorb, float_output, fold_zero_pads, output_chain, requant_grid

OPSET = 17
INT_OPS = ("Conv", "Gemm")


@dataclasses.dataclass
class IntegerExportStats:
    integer_layers: list[str] = dataclasses.field(default_factory=list)  # Conv/Gemm with integer input and weight
    float_layers: list[str] = dataclasses.field(default_factory=list)  # quantized weights, float input
    fused_outputs: int = 0  # the next quantizer moved onto the output (exact)
    requantized_outputs: list[str] = dataclasses.field(default_factory=list)  # extra 8-bit Q/DQ inserted
    float_outputs: list[str] = dataclasses.field(default_factory=list)  # ConvInteger with an exact float output
    code_clips: int = 0  # uint8 Clip nodes that restrict codes to a b-bit range (or a ReLU6 bound)
    output_mode: str = "float"
    folded_pads: int = 0  # zero Pad nodes folded into the following Conv's pads
    uint8_weight_layers: list[str] = dataclasses.field(default_factory=list)  # |codes| > 63 (8-bit weights)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def act_grid(module: nn.Module) -> ActGrid | None:
    """The uint8 grid of a layer's input quantizer, or None when the input stays float (not quantized, LSQ+)."""
    q = module.a_quant
    if q.bits >= 32 or q.method != "pact":
        return None
    qmin, qmax = q.qrange
    zp = 0 if qmin >= 0 else 128
    scale = (q.alpha.detach().float() / qmax).item()  # the step of F.pact_fake_quant, in float32 like it
    return ActGrid(float(np.float32(scale)), zp, zp + qmin, zp + qmax)


def weight_codes(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8 [C_out, ...], scale float32 [C_out])`` with ``codes * scale == fake-quant weight``."""
    codes, scale = module.w_quant.codes_and_scale(module.weight)
    scale = scale.float().reshape(-1).expand(codes.shape[0]) if scale.numel() == 1 else scale.float().reshape(-1)
    return codes.cpu().numpy().astype(np.int8), scale.cpu().numpy().astype(np.float32).copy()


def wide_weights(codes: np.ndarray) -> bool:
    """True when int8 weight codes could saturate onnxruntime's u8s8 kernels on CPUs without AVX-VNNI.

    Those kernels (AVX2 ``vpmaddubsw``) add two uint8 x int8 products in an int16: ``2 * 255 * 127 > 32767``.
    With ``|code| <= 63`` (weights of 7 bits or fewer) the sum fits; 8-bit weights go in a uint8 container
    (zero point 128), which onnxruntime computes with exact u8u8 kernels.
    """
    return int(np.abs(codes.astype(np.int16)).max(initial=0)) > 63


# ---------------------------------------------------------------------------------------------------------------


def _float_onnx(model: nn.Module, example: torch.Tensor, opset: int):
    """The model with every quantizer disabled, exported without constant folding so that each weight stays an
    initializer named after its parameter (``<layer>.weight``) and BatchNorm stays a separate node."""
    import onnx

    buf = io.BytesIO()
    with quantizers_disabled(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _fold_bn(gr: Graph, node, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Fold a following inference BatchNorm into the per-channel weight scale; returns (codes, scale, bias, folded)."""
    cons = gr.consumers(node.output[0])
    if node.op_type != "Conv" or len(cons) != 1 or cons[0].op_type != "BatchNormalization" \
            or gr.is_output(node.output[0]):
        return codes, scale, bias, False
    bn = cons[0]
    vals = [gr.value(i) for i in bn.input[1:5]]
    if any(v is None for v in vals):
        return codes, scale, bias, False
    gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    g = gamma / np.sqrt(var + eps)
    sign = np.where(g < 0, -1, 1).astype(np.int16)
    flipped = codes.astype(np.int16) * sign.reshape(-1, *[1] * (codes.ndim - 1))
    if flipped.max(initial=0) > 127:  # an LSQ code -128 with gamma < 0 does not fit int8: keep the BN node
        return codes, scale, bias, False
    new_scale = (scale.astype(np.float64) * np.abs(g)).astype(np.float32)
    new_scale[new_scale == 0] = np.float32(1e-12)  # gamma = 0: the channel is the constant beta
    new_bias = ((bias.astype(np.float64) - mean) * g + beta).astype(np.float32)
    node.output[0] = bn.output[0]
    gr.nodes.remove(bn)
    return flipped.astype(np.int8), new_scale, new_bias, True


def _calibrate_ranges(model_proto, tensors: list[str], batches: Iterable[torch.Tensor]) -> dict[str, tuple]:
    """min/max of each float tensor over the batches, running the graph as written (optimizations off)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    for t in tensors:
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    seen = 0
    for x in batches:
        outs = sess.run(tensors, {sess.get_inputs()[0].name: x.numpy()})
        for t, v in zip(tensors, outs):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
        seen += 1
    if seen == 0:
        raise UserError("integer ONNX export: the calibration batches are empty (needed for the requantization "
                        "ranges of convolution outputs)")
    return {t: (lo[t], hi[t]) for t in tensors}


def export_integer_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                        calib_batches: Iterable[torch.Tensor], opset: int = OPSET,
                        outputs: str = "float") -> IntegerExportStats:
    """Write ``model`` (calibrated fake-quant, eval) as an integer QDQ ONNX model (see the module docstring).

    ``example`` ``[1, C, H, W]`` fixes the traced shapes (the batch stays dynamic); ``calib_batches`` (input
    tensors ``[N, C, H, W]``) give the ranges of the requantized convolution outputs (``outputs="uint8"`` only).
    ``outputs``: what a convolution output that cannot end in the next layer's quantizer becomes, one of
    ``OUTPUT_MODES`` (``gmpq/quant/onnx_outputs.py``): ``"float"`` (exact) or ``"uint8"`` (requantized).
    """
    import onnx

    if outputs not in OUTPUT_MODES:
        raise UserError(f"integer ONNX export: outputs={outputs!r} is not supported; accepted values: "
                        f"{list(OUTPUT_MODES)}")
    require_calibrated(model)
    model.eval()
    layers = {f"{n}.weight": (n, m) for n, m in model.named_modules() if is_quantized(m) and m.w_quant.bits < 32}
    gr = Graph(_float_onnx(model, example, opset))
    stats, input_qs, integer_nodes, exact = IntegerExportStats(output_mode=outputs), {}, [], {}
    stats.folded_pads = fold_zero_pads(gr)
    for node in [n for n in gr.nodes if n.op_type in INT_OPS and len(n.input) > 1 and n.input[1] in layers]:
        name, module = layers[node.input[1]]
        grid = act_grid(module)
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            grid = None  # per-output-channel scales need B as [out, in]
        codes, scale = weight_codes(module)
        bias = gr.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(len(scale), np.float32)
        codes, scale, bias, folded = _fold_bn(gr, node, codes, scale, bias.astype(np.float32))
        if grid is None:  # float input: exact dequantized float weights, onnxruntime runs the float operator
            w = codes.astype(np.float32) * scale.reshape(-1, *[1] * (codes.ndim - 1))
            node.input[1] = gr.add_init(f"{name}.weight_dq", w)
            if folded or len(node.input) > 2:
                _set_bias(node, gr.add_init(f"{name}.bias", bias))
            stats.float_layers.append(name)
            continue
        x_dq = gr.name(f"{name}.input_dq")
        iq = gr.qdq(node.input[0], grid, x_dq, f"{name}.a")
        stats.code_clips += iq.clip is not None
        node.input[0] = x_dq
        input_qs[iq.q.name] = iq
        exact[name] = (scale, bias)
        w_dq = gr.name(f"{name}.weight_dq")
        if wide_weights(codes):  # u8s8 kernels would saturate: uint8 container, zero point 128
            gr.dq_const(f"{name}.w", (codes.astype(np.int16) + 128).astype(np.uint8), scale, w_dq, 128)
            stats.uint8_weight_layers.append(name)
        else:
            gr.dq_const(f"{name}.w", codes, scale, w_dq)
        node.input[1] = w_dq
        b_scale = (np.float32(grid.scale) * scale).astype(np.float32)
        b_codes = np.clip(np.round(bias.astype(np.float64) / b_scale), -2**31, 2**31 - 1).astype(np.int32)
        b_dq = gr.name(f"{name}.bias_dq")
        gr.dq_const(f"{name}.b", b_codes, b_scale, b_dq)
        _set_bias(node, b_dq)
        stats.integer_layers.append(name)
        integer_nodes.append((name, node))
    need = []
    for name, node in integer_nodes:
        if node.op_type != "Conv":
            continue  # QGemm: onnxruntime fuses DQ -> Gemm with a float output
        plan = output_chain(gr, node, input_qs)
        clips = None if plan is None else absorb(gr, node, *plan, f"{name}.out")
        if clips is not None:
            stats.fused_outputs += 1
            stats.code_clips += clips
        elif outputs == "float":
            float_output(gr, node, *exact[name], name)
            stats.float_outputs.append(name)
        elif not gr.is_output(node.output[0]):
            need.append((name, node))
    if need:
        gr.finish()
        ranges = _calibrate_ranges(gr.model, [n.output[0] for _, n in need], calib_batches)
        for name, node in need:
            t = node.output[0]
            node.output[0] = gr.name(f"{name}.acc")
            gr.qdq(node.output[0], requant_grid(*ranges[t]), t, f"{name}.out")
            stats.requantized_outputs.append(name)
    gr.finish()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(gr.model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return stats


def _set_bias(node, name: str) -> None:
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)

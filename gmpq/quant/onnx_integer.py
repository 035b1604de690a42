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
- Each integer convolution must end in a QuantizeLinear for the fusion. When its output (after ReLU/ReLU6/Clip)
  goes straight into the next layer's quantizer and those ops cannot change the quantized value, that quantizer
  is moved onto the convolution output (exact). Otherwise (a residual Add, padding, several consumers) an extra
  8-bit *requantization* ``Q -> DQ`` (uint8, asymmetric, range = min/max of that tensor on the calibration
  batches) is inserted: that rounding of the int32 accumulator to 8 bits is the only other difference from the
  fake-quant model. A Gemm/MatMul output is never requantized (onnxruntime fuses it with a float output).

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

OPSET = 17
INT_OPS = ("Conv", "Gemm")


@dataclasses.dataclass(frozen=True)
class ActGrid:
    """An activation quantizer in a uint8 container: value = ``scale * (code - zero_point)``, code in [lo, hi]."""

    scale: float
    zero_point: int
    lo: int
    hi: int


@dataclasses.dataclass
class IntegerExportStats:
    integer_layers: list[str] = dataclasses.field(default_factory=list)  # Conv/Gemm with integer input and weight
    float_layers: list[str] = dataclasses.field(default_factory=list)  # quantized weights, float input
    fused_outputs: int = 0  # the next quantizer moved onto the output (exact)
    requantized_outputs: list[str] = dataclasses.field(default_factory=list)  # extra 8-bit Q/DQ inserted
    code_clips: int = 0  # uint8 Clip nodes that restrict codes to a b-bit range
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
# small graph helpers over an onnx.GraphProto
# ---------------------------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.g = model, model.graph
        self.nh = numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.consts = {n.output[0]: n for n in self.g.node if n.op_type == "Constant"}
        self.nodes = list(self.g.node)
        self.counter = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}__gmpq{self.counter}"

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of tensor ``name`` (initializer, Constant node, or Identity/Cast of one), else None."""
        if name in self.inits:
            return self.nh.to_array(self.inits[name])
        if name in self.consts:
            from onnx import helper

            attr = self.consts[name].attribute[0]
            return self.nh.to_array(attr.t) if attr.name == "value" else np.array(helper.get_attribute_value(attr))
        prod = self.producer(name)
        if prod is not None and prod.op_type == "Identity":  # the exporter shares equal initializers this way
            return self.value(prod.input[0])
        if prod is not None and prod.op_type == "Cast":
            v = self.value(prod.input[0])
            if v is not None:
                from onnx import helper

                to = helper.get_attribute_value(prod.attribute[0])
                return v.astype(helper.tensor_dtype_to_np_dtype(to))
        return None

    def producer(self, tensor: str):
        for n in self.nodes:
            if tensor in n.output:
                return n
        return None

    def consumers(self, tensor: str) -> list:
        return [n for n in self.nodes if tensor in n.input]

    def is_output(self, tensor: str) -> bool:
        return any(o.name == tensor for o in self.g.output)

    def add_init(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.g.initializer.append(self.nh.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper

        n = helper.make_node(op, inputs, outputs, name=self.name(op), **attrs)
        self.nodes.append(n)
        return n

    def qdq(self, x: str, grid: ActGrid, out: str, base: str) -> tuple[object, int]:
        """``x -> Q [-> Clip] -> DQ -> out``; returns the Q node and the number of Clip nodes added (0 or 1)."""
        s = self.add_init(f"{base}.scale", np.array(grid.scale, np.float32))
        z = self.add_init(f"{base}.zero_point", np.array(grid.zero_point, np.uint8))
        q = self.name(f"{base}.q")
        qnode = self.node("QuantizeLinear", [x, s, z], [q])
        clips = 0
        if (grid.lo, grid.hi) != (0, 255):
            c = self.name(f"{base}.clip")
            self.node("Clip", [q, self.add_init(f"{base}.lo", np.array(grid.lo, np.uint8)),
                               self.add_init(f"{base}.hi", np.array(grid.hi, np.uint8))], [c])
            q, clips = c, 1
        self.node("DequantizeLinear", [q, s, z], [out])
        return qnode, clips

    def dq_const(self, base: str, codes: np.ndarray, scale: np.ndarray, out: str, zero_point: int = 0) -> None:
        zp = np.full(scale.shape, zero_point, codes.dtype)
        self.node("DequantizeLinear", [self.add_init(f"{base}.codes", codes), self.add_init(f"{base}.scale", scale),
                                       self.add_init(f"{base}.zero_point", zp)], [out], axis=0)

    def finish(self) -> None:
        """Topologically sort the nodes, drop unused initializers and stale shape annotations."""
        produced = {i.name for i in self.g.input} | set(self.inits)
        ready, order, pending = set(produced), [], list(self.nodes)
        while pending:
            rest = []
            for n in pending:
                if all(not i or i in ready for i in n.input):
                    order.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise RuntimeError(f"integer ONNX rewrite left a cycle or a dangling input at {rest[0].name}")
            pending = rest
        used = {i for n in order for i in n.input}
        del self.g.node[:]
        self.g.node.extend(order)
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        del self.g.value_info[:]


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


def _fold_bn(gr: _Graph, node, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray
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


def _absorbable(chain: list, gr: _Graph, grid: ActGrid) -> bool:
    """Can ``Q(chain(v))`` be replaced by ``Q(v)`` exactly? ReLU: when the grid has no negative values;
    Clip(a, b): when [a, b] contains the grid's whole value range."""
    lo_v, hi_v = grid.scale * (grid.lo - grid.zero_point), grid.scale * (grid.hi - grid.zero_point)
    for n in chain:
        if n.op_type == "Relu":
            if lo_v < 0:
                return False
        else:  # Clip
            a = gr.value(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            b = gr.value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if (a is not None and float(a) > lo_v) or (b is not None and float(b) < hi_v):
                return False
    return True


def _output_plan(gr: _Graph, node, input_qs: dict) -> object | None:
    """For an integer Conv: the input-Q node of the next layer that can move onto this output, else None."""
    t, chain = node.output[0], []
    while not gr.is_output(t):
        cons = gr.consumers(t)
        if len(cons) != 1:
            return None
        n = cons[0]
        if n.op_type in ("Relu", "Clip"):
            chain.append(n)
            t = n.output[0]
            continue
        if n.name in input_qs and _absorbable(chain, gr, input_qs[n.name]):
            for c in chain:
                gr.nodes.remove(c)
            return n
        return None
    return None


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


def requant_grid(lo: float, hi: float) -> ActGrid:
    """uint8 asymmetric grid covering [min(lo, 0), max(hi, 0)] (zero exactly representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32(max(hi - lo, 1e-8) / 255))
    return ActGrid(scale, int(np.clip(round(-lo / scale), 0, 255)), 0, 255)


def export_integer_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                        calib_batches: Iterable[torch.Tensor], opset: int = OPSET) -> IntegerExportStats:
    """Write ``model`` (calibrated fake-quant, eval) as an integer QDQ ONNX model (see the module docstring).

    ``example`` ``[1, C, H, W]`` fixes the traced shapes (the batch stays dynamic); ``calib_batches`` (input
    tensors ``[N, C, H, W]``) give the ranges of the requantized convolution outputs.
    """
    import onnx

    require_calibrated(model)
    model.eval()
    layers = {f"{n}.weight": (n, m) for n, m in model.named_modules() if is_quantized(m) and m.w_quant.bits < 32}
    gr = _Graph(_float_onnx(model, example, opset))
    stats, input_qs, integer_nodes = IntegerExportStats(), {}, []
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
        qnode, clips = gr.qdq(node.input[0], grid, x_dq, f"{name}.a")
        stats.code_clips += clips
        node.input[0] = x_dq
        input_qs[qnode.name] = grid
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
            continue
        q = _output_plan(gr, node, input_qs)
        if q is not None:
            q.input[0] = node.output[0]
            stats.fused_outputs += 1
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

"""What the integer ONNX export does with the output of an integer convolution (see ``onnx_integer.py``).

1. *Absorb* (exact): the output reaches the next integer layer's input quantizer ``Q`` through ReLU / Clip only
   (one consumer each). The ``Q`` moves onto the convolution output, which onnxruntime then fuses into the
   ``QLinearConv``; the clipping acts on the uint8 codes instead, which is exact because quantization is
   monotone: ``Q(clip(v, a, b)) = clip(Q(v), Q(a), Q(b))`` (a Clip on the codes, left out where the grid's range
   already lies inside). (A zero ``Pad`` in front of a convolution was already folded into its ``pads``:
   ``fold_zero_pads``.)
2. Otherwise (a residual Add, several consumers, the pooling head) the float value is needed, in one of two
   ``outputs`` modes:
   - ``"float"`` (exact): ``ConvInteger`` (uint8 codes x weight codes, int32 accumulator) -> Cast -> Mul by
     ``s_x * s_w`` -> Add float bias. The same integer products as the fake-quant model, only float32 summation
     order differs (~1e-6 relative); the onnxruntime kernel is integer, the scaling three float element-wise ops.
   - ``"uint8"``: ``QLinearConv`` with an extra 8-bit requantization ``Q -> DQ`` of the output (uint8,
     asymmetric, range = min/max of that tensor on the calibration batches): fewer bytes move, but the 8-bit
     rounding of a tensor the fake-quant model keeps in float costs accuracy (MobileNetV2: its linear bottlenecks).
"""

from __future__ import annotations

import numpy as np

from gmpq.quant.onnx_graph import ActGrid, Graph, InputQ

OUTPUT_MODES = ("float", "uint8")


def output_chain(gr: Graph, node, input_qs: dict) -> tuple[InputQ, list] | None:
    """The next layer's input quantizer reached from ``node``'s output through single-consumer Relu/Clip nodes,
    and those nodes; None when the output goes anywhere else."""
    t, chain = node.output[0], []
    while not gr.is_output(t):
        cons = gr.consumers(t)
        if len(cons) != 1:
            return None
        n = cons[0]
        if n.op_type in ("Relu", "Clip"):
            chain.append(n)
            t = n.output[0]
        elif n.name in input_qs:
            return input_qs[n.name], chain
        else:
            return None
    return None


def _chain_codes(gr: Graph, chain: list, grid: ActGrid) -> tuple[int, int] | None:
    """The code range ``[lo, hi]`` equivalent to the chain's clipping; None when a bound is not constant."""
    lo, hi = grid.lo, grid.hi
    for n in chain:
        names = ["", ""] if n.op_type == "Relu" else (list(n.input[1:3]) + ["", ""])[:2]
        bounds = [gr.value(i) if i else None for i in names]
        if any(i and b is None for i, b in zip(names, bounds)):
            return None
        a = 0.0 if n.op_type == "Relu" else bounds[0]
        if a is not None:
            lo = max(lo, grid.code(float(a)))
        if bounds[1] is not None:
            hi = min(hi, grid.code(float(bounds[1])))
    return lo, hi


def absorb(gr: Graph, node, iq: InputQ, chain: list, base: str) -> int | None:
    """Move ``iq``'s Q onto ``node``'s output and ``chain``'s clipping onto the codes (module docstring, case 1).

    Returns the number of code Clip nodes added (0 or 1), or None (graph unchanged) when not exact."""
    codes = _chain_codes(gr, chain, iq.grid)
    if codes is None:
        return None
    iq.q.input[0] = node.output[0]
    for n in chain:
        gr.nodes.remove(n)
    if codes == (iq.grid.lo, iq.grid.hi):
        return 0
    lo, hi = (gr.add_init(f"{base}.{k}", np.array(v, np.uint8)) for k, v in zip(("lo", "hi"), codes))
    if iq.clip is not None:
        iq.clip.input[1], iq.clip.input[2] = lo, hi
        return 0
    iq.clip = gr.node("Clip", [iq.q.output[0], lo, hi], [gr.name(f"{base}.clip")])
    iq.dq.input[0] = iq.clip.output[0]
    return 1


def fold_zero_pads(gr: Graph) -> int:
    """Fold each constant zero ``Pad`` (spatial axes only) whose one consumer is a Conv into the Conv's ``pads``
    (exact; onnxruntime's QLinearConv pads with the input zero point, the value of 0). Returns how many."""
    from onnx import helper

    folded = 0
    for pad in [n for n in gr.nodes if n.op_type == "Pad"]:
        cons = gr.consumers(pad.output[0])
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        value = gr.value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        amounts = gr.value(pad.input[1])
        if len(cons) != 1 or cons[0].op_type != "Conv" or gr.is_output(pad.output[0]) or mode != "constant" \
                or value is None or float(value) != 0.0 or amounts is None or amounts.size != 8 \
                or (len(pad.input) > 3 and pad.input[3]):
            continue
        b, e = amounts[:4].tolist(), amounts[4:].tolist()
        conv = cons[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if b[:2] != [0, 0] or e[:2] != [0, 0] or min(b + e) < 0 or attrs.get("auto_pad", b"NOTSET") != b"NOTSET" \
                or conv.input[0] != pad.output[0]:
            continue
        old = attrs.get("pads", [0, 0, 0, 0])
        new = [old[0] + b[2], old[1] + b[3], old[2] + e[2], old[3] + e[3]]
        keep = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        gr.nodes.remove(pad)
        folded += 1
    return folded


def float_output(gr: Graph, node, weight_scale: np.ndarray, bias: np.ndarray, base: str) -> None:
    """Rewrite the integer Conv ``node`` (inputs: the DQ of its input codes, of its weight codes, of its bias) as
    ``ConvInteger -> Cast -> Mul(s_x * s_w) -> Add(bias)`` with the same float output (module docstring)."""
    from onnx import TensorProto

    x_dq, w_dq = gr.producer(node.input[0]), gr.producer(node.input[1])
    b_dq = gr.producer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    x_scale = gr.value(x_dq.input[1])
    w_codes = gr.value(w_dq.input[0]).astype(np.int16)
    w_codes = w_codes - gr.value(w_dq.input[2]).astype(np.int16).reshape(-1, *[1] * (w_codes.ndim - 1))
    # uint8 weights, zero point 128: onnxruntime's ConvInteger runs uint8 x int8 on a slow path (ResNet-20 W7A8:
    # 3x slower than uint8 x uint8, which is exact and the only fast one here)
    w_u8 = gr.add_init(f"{base}.w.codes_u8", (w_codes + 128).astype(np.uint8))
    w_zp = gr.add_init(f"{base}.w.zero_point", np.array(128, np.uint8))
    attrs = {a.name: a for a in node.attribute}
    acc = gr.node("ConvInteger", [x_dq.input[0], w_u8, x_dq.input[2], w_zp], [gr.name(f"{base}.acc")])
    acc.attribute.extend(attrs.values())
    shape = (1, -1) + (1,) * (w_codes.ndim - 2)
    f = gr.node("Cast", acc.output[:], [gr.name(f"{base}.acc_f")], to=TensorProto.FLOAT)
    s = (np.float32(x_scale) * weight_scale.astype(np.float32)).reshape(shape)
    m = gr.node("Mul", [f.output[0], gr.add_init(f"{base}.out_scale", s)], [gr.name(f"{base}.scaled")])
    gr.node("Add", [m.output[0], gr.add_init(f"{base}.out_bias", bias.astype(np.float32).reshape(shape))],
            [node.output[0]])
    for n in (node, x_dq, w_dq, b_dq):
        if n is not None:
            gr.nodes.remove(n)


def requant_grid(lo: float, hi: float) -> ActGrid:
    """uint8 asymmetric grid covering [min(lo, 0), max(hi, 0)] (zero exactly representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32(max(hi - lo, 1e-8) / 255))
    return ActGrid(scale, int(np.clip(round(-lo / scale), 0, 255)), 0, 255)

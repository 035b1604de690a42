"""A small editable view of an ONNX graph for the integer export (``onnx_integer.py``): constant lookup,
producers/consumers, new nodes and initializers, and the ``Q [-> Clip] -> DQ`` group of an activation quantizer."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ActGrid:
    """An activation quantizer in a uint8 container: value = ``scale * (code - zero_point)``, code in [lo, hi]."""

    scale: float
    zero_point: int
    lo: int
    hi: int

    def code(self, v: float) -> int:
        """The uint8 code QuantizeLinear gives the value ``v`` (float32 division, round half to even, saturate)."""
        return int(np.clip(np.round(np.float32(v) / np.float32(self.scale)) + self.zero_point, 0, 255))


@dataclasses.dataclass
class InputQ:
    """The nodes that quantize one integer layer's input: ``Q -> [Clip on the codes] -> DQ``."""

    grid: ActGrid
    q: object
    clip: object | None
    dq: object


class Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.g = model, model.graph
        self.nh = numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self._folded: dict[str, np.ndarray] = {}  # constant values of node outputs, computed once
        self.nodes = list(self.g.node)
        self.counter = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}__gmpq{self.counter}"

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of tensor ``name``, else None: an initializer, a Constant node, or the output of a
        node whose inputs are all constant (evaluated with ``onnx.reference``; the exporter computes e.g. the
        ``pads`` of ``F.pad`` from constants through Shape/Concat/Reshape/Slice when not constant-folding)."""
        if name in self.inits:
            return self.nh.to_array(self.inits[name])
        if name in self._folded:
            return self._folded[name]
        prod = self.producer(name)
        if prod is None or prod.op_type in ("QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform"):
            return None
        ins = [self.value(i) if i else None for i in prod.input]
        if any(i and v is None for i, v in zip(prod.input, ins)):
            return None
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        feeds = {i: v for i, v in zip(prod.input, ins) if i}
        outs = ReferenceEvaluator(helper.make_model(helper.make_graph(
            [prod], "const", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                              for i, v in feeds.items()],
            [helper.make_empty_tensor_value_info(o) for o in prod.output]),
            opset_imports=self.model.opset_import)).run(None, feeds)
        self._folded.update({o: np.asarray(v) for o, v in zip(prod.output, outs)})
        return self._folded[name]

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

    def code_clip(self, x: str, lo: int, hi: int, base: str):
        """A ``Clip`` of uint8 codes to ``[lo, hi]``; returns the node."""
        return self.node("Clip", [x, self.add_init(f"{base}.lo", np.array(lo, np.uint8)),
                                  self.add_init(f"{base}.hi", np.array(hi, np.uint8))], [self.name(f"{base}.clip")])

    def qdq(self, x: str, grid: ActGrid, out: str, base: str) -> InputQ:
        """``x -> Q [-> Clip] -> DQ -> out`` (the Clip where the grid's code range is narrower than 0..255)."""
        s = self.add_init(f"{base}.scale", np.array(grid.scale, np.float32))
        z = self.add_init(f"{base}.zero_point", np.array(grid.zero_point, np.uint8))
        qnode = self.node("QuantizeLinear", [x, s, z], [self.name(f"{base}.q")])
        clip = self.code_clip(qnode.output[0], grid.lo, grid.hi, base) if (grid.lo, grid.hi) != (0, 255) else None
        dq = self.node("DequantizeLinear", [(clip or qnode).output[0], s, z], [out])
        return InputQ(grid, qnode, clip, dq)

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

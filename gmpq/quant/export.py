"""Packed integer export: each quantized weight stored as integer codes at its real bit-width, plus scales.

File layout (little endian)::

    b"GMPQPACK1\\n" | u32 header_len | zlib(JSON header) | payload

The compact header holds the model name, each quantized layer's spec ``[w_bits, a_bits, w_method, a_method,
per_channel, extra]`` and one record per tensor ``[key, "packed"|"raw", shape, bits|dtype, qmin, nbytes]``
in payload order; a packed weight's scale is the raw tensor ``<layer>.w_quant.scale``.
A ``b``-bit layer takes ``ceil(numel * b / 8)`` bytes. ``load_packed`` rebuilds the
fake-quant model; its outputs equal the exported model's bit-exactly (same codes, same scales).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmpq.errors import UserError
from gmpq.io import atomic_write_bytes
from gmpq.quant.modules import LayerSpec, is_quantized, layer_specs, swap_layers

MAGIC = b"GMPQPACK1\n"


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer codes ``[N]`` (each < 2^bits) into ``ceil(N * bits / 8)`` bytes, LSB first."""
    codes = codes.astype(np.uint16).reshape(-1)
    bitplanes = (codes[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(bitplanes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``[count]`` uint16 codes."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    planes = flat.reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint16)


def quantized_weight(module: nn.Module) -> tuple[str, torch.Tensor]:
    """``(attribute name, tensor)`` of the weight a quantized layer's ``w_quant`` acts on: ``weight``, or the
    first of ``quantized_weights()`` for layer types that declare it (DETR attention: ``in_proj_weight``)."""
    w = module.quantized_weights()[0] if hasattr(module, "quantized_weights") else module.weight
    for attr, p in module.named_parameters(recurse=False):
        if p is w:
            return attr, w
    raise UserError(f"export: cannot find the quantized weight of {type(module).__name__} among its parameters")


def _scale_key(weight_key: str) -> str:
    return weight_key.rsplit(".", 1)[0] + ".w_quant.scale"


def _tensor_bytes(t: torch.Tensor) -> tuple[bytes, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.numpy().astype(np.uint8).tobytes(), "bool"
    return t.numpy().tobytes(), str(t.dtype).replace("torch.", "")


def _bytes_tensor(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    if dtype == "bool":
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).bool().reshape(shape)
    return torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).copy()).reshape(shape)


def export_packed(model: nn.Module, policy: dict, path: str | os.PathLike, meta: dict | None = None) -> dict:
    """Write ``model`` (already quantized per ``policy``) as a packed file. Returns size statistics in bytes:
    ``{"file_bytes", "payload_bytes", "header_bytes", "packed_weight_bytes", "raw_bytes"}``."""
    specs = layer_specs(model)
    if not specs:
        raise UserError("export_packed: the model has no quantized layers; apply a policy first")
    state = model.state_dict()
    records, blobs, packed_keys = [], [], set()
    for name, module in model.named_modules():
        if not is_quantized(module) or module.w_quant.bits >= 32:
            continue
        attr, weight = quantized_weight(module)
        codes, scale = module.w_quant.codes_and_scale(weight)
        qmin, _ = module.w_quant.qrange
        blob = pack_codes((codes - qmin).to(torch.int64).cpu().numpy(), module.w_quant.bits)
        key = f"{name}.{attr}" if name else attr
        records.append([key, "packed", list(codes.shape), module.w_quant.bits, qmin, len(blob)])
        blobs.append(blob)
        blob, dtype = _tensor_bytes(scale.float())
        records.append([_scale_key(key), "raw", list(scale.shape), dtype, 0, len(blob)])
        blobs.append(blob)
        packed_keys.update({key, _scale_key(key)})
    for key, t in state.items():
        if key not in packed_keys:
            blob, dtype = _tensor_bytes(t)
            records.append([key, "raw", list(t.shape), dtype, 0, len(blob)])
            blobs.append(blob)
    header = {
        "format": "gmpq-packed/1", "model": policy.get("model"), "meta": meta or {},
        "layers": {n: [s.w_bits, s.a_bits, s.w_method, s.a_method, s.per_channel, dict(s.extra)]
                   for n, s in specs.items()},
        "tensors": records,  # [key, kind, shape, bits|dtype, qmin, nbytes]; payload offsets follow in this order
    }
    zheader = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    payload = b"".join(blobs)
    data = MAGIC + struct.pack("<I", len(zheader)) + zheader + payload
    atomic_write_bytes(path, data)
    packed = sum(r[5] for r in records if r[1] == "packed")
    return {"file_bytes": len(data), "payload_bytes": len(payload), "header_bytes": len(data) - len(payload),
            "packed_weight_bytes": packed, "raw_bytes": len(payload) - packed}


def theoretical_packed_bytes(model: nn.Module) -> int:
    """The payload at the real bit-widths: ``ceil(numel * bits / 8)`` per quantized weight + 4-byte scales +
    every other state-dict tensor at its dtype size."""
    total, skip = 0, set()
    for name, m in model.named_modules():
        if is_quantized(m) and m.w_quant.bits < 32:
            attr, w = quantized_weight(m)
            total += math.ceil(w.numel() * m.w_quant.bits / 8)
            total += 4 * (w.shape[0] if m.w_quant.per_channel else 1)
            skip.add(f"{name}.{attr}")
    for key, t in model.state_dict().items():
        if key not in skip and not key.endswith("w_quant.scale"):
            total += t.numel() * t.element_size()
    return total


def read_packed(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a packed file: ``(header, state_dict)`` with weights dequantized (``codes * scale``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"packed file {str(path)!r} does not exist")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise UserError(f"{str(path)!r} is not a gmpq packed file (expected it to start with {MAGIC!r})")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(zlib.decompress(data[start:start + hlen]))
    except (zlib.error, json.JSONDecodeError) as e:
        raise UserError(f"packed file {str(path)!r} has a corrupt header: {e}") from None
    payload, offset = data[start + hlen:], 0
    state: dict[str, torch.Tensor] = {}
    packed = []
    for key, kind, shape, fmt, qmin, nbytes in header["tensors"]:
        blob = payload[offset: offset + nbytes]
        offset += nbytes
        if len(blob) != nbytes:
            raise UserError(f"packed file {str(path)!r} is truncated at tensor {key!r}")
        if kind == "packed":
            codes = unpack_codes(blob, fmt, math.prod(shape)).astype(np.float32)
            state[key] = torch.from_numpy(codes).reshape(shape) + qmin
            packed.append(key)
        else:
            state[key] = _bytes_tensor(blob, fmt, shape)
    for key in packed:  # codes * scale, broadcasting a per-channel scale over dim 0
        scale = state[_scale_key(key)]
        view = [-1] + [1] * (state[key].dim() - 1) if scale.numel() > 1 else []
        state[key] = state[key] * scale.reshape(view)
    return header, state


def load_packed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the fake-quant model from a packed file onto ``model`` (the float architecture, any weights).

    Quantizes the layers with the stored specs, loads the dequantized weights and pins each symmetric weight
    quantizer's step to the stored scale, so ``forward`` equals the exported model's exactly.
    """
    header, state = read_packed(path)
    specs = {n: LayerSpec(w, a, wm, am, pc, tuple(extra.items()))
             for n, (w, a, wm, am, pc, extra) in header["layers"].items()}
    swap_layers(model, specs)
    for name, module in model.named_modules():
        key = f"{name}.w_quant.scale"
        if not is_quantized(module) or key not in state:
            continue
        if module.w_quant.method == "symmetric":
            module.w_quant.scale = torch.empty_like(state[key])  # fill the buffer slot: pin the exported step
        else:
            del state[key]  # LSQ: the learned step is stored as a raw tensor already
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"packed file {str(path)!r} does not match the model: missing {missing}, "
                        f"unexpected {unexpected}")
    return model

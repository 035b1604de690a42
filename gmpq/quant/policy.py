"""The policy file: the one contract between producers (search, ILP, hand edits) and consumers (fine-tune, PTQ,
QAT, export).

    {
      "format": "gmpq-policy/1",
      "model": "resnet20",
      "created_by": {"method": "gmpq", ...},
      "default": {"w_bits": 8, "a_bits": 8},            # optional: bits for layers not listed
      "layers": {"layer1.0.conv1": {"w_bits": 4, "a_bits": 3, ...extra fields are kept...}},
      "summary": {...}
    }

``w_bits`` is one of 2..8 or 32 (not quantized); ``a_bits`` one of 2..8, 32 or null (input not quantized).
Optional per-layer ``w_method``/``a_method`` override the consumer's quantizer choice (``w_init``: ``lsq`` or
``mse``, how an LSQ weight step starts; a searched policy records the quantizer its search assumed, so the deployed
layer quantizes as the search did); ``attn_bits`` is passed to layer types that use it (attention). A quantizer
name the consumer does not know is a schema error that lists the accepted names.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import os
from pathlib import Path
from typing import Any

from torch import nn

from gmpq.errors import UserError
from gmpq.io import atomic_write_json, read_json
from gmpq.quant import functional as F
from gmpq.quant.modules import LayerSpec, quantizable_layers, swap_layers
from gmpq.quant.quantizers import ACT_METHODS, WEIGHT_METHODS

FORMAT = "gmpq-policy/1"
EXTRA_SPEC_KEYS = ("attn_bits", "w_init")
W_INITS = ("lsq", "mse")  # per-layer ``w_init`` of an LSQ step: 2 mean|W| / sqrt(Qp), or the MSE-optimal step
BITS_TEXT = f"{list(F.ALLOWED_BITS)}"


def make_policy(model_name: str, layers: dict[str, dict], method: str, summary: dict | None = None,
                default: dict | None = None, **created_by: Any) -> dict:
    """Build a policy dict (copies ``layers``); ``created_by`` records the producer's settings."""
    policy = {
        "format": FORMAT,
        "model": model_name,
        "created_by": {"method": method, "date": datetime.datetime.now().isoformat(timespec="seconds"), **created_by},
        "layers": copy.deepcopy(layers),
        "summary": dict(summary or {}),
    }
    if default is not None:
        policy["default"] = dict(default)
    check_schema(policy)
    return policy


def _check_bits_field(value: Any, field: str, where: str, allow_null: bool) -> str | None:
    ok = (value is None and allow_null) or (isinstance(value, int) and not isinstance(value, bool)
                                            and value in F.ALLOWED_BITS)
    if ok:
        return None
    accepted = BITS_TEXT + (" or null" if allow_null else "")
    return f"{where}: {field}={value!r} is not accepted; accepted values: {accepted}"


def _check_layer(entry: Any, where: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be an object like {{\"w_bits\": 4, \"a_bits\": 4}}, got {type(entry).__name__}"]
    problems = []
    for field, null in (("w_bits", False), ("a_bits", True)):
        if field not in entry:
            problems.append(f"{where}: missing field {field!r}")
        elif (p := _check_bits_field(entry[field], field, where, null)) is not None:
            problems.append(p)
    if "attn_bits" in entry and (p := _check_bits_field(entry["attn_bits"], "attn_bits", where, True)):
        problems.append(p)
    for field, allowed in (("w_method", WEIGHT_METHODS), ("a_method", ACT_METHODS), ("w_init", W_INITS)):
        if field in entry and entry[field] not in allowed:
            problems.append(f"{where}: {field}={entry[field]!r} is not accepted; accepted values: {list(allowed)}")
    return problems


def check_schema(policy: Any, source: str = "policy") -> None:
    """Raise one ``UserError`` listing every schema problem (fields, types, bit-widths)."""
    problems = schema_problems(policy)
    if problems:
        raise UserError(f"{source}: invalid policy:\n  - " + "\n  - ".join(problems))


def schema_problems(policy: Any) -> list[str]:
    """Every schema problem of ``policy`` (fields, types, bit-widths), as a list of messages."""
    if not isinstance(policy, dict):
        return ["a policy must be a JSON object with keys format, model, created_by, layers"]
    problems = []
    if policy.get("format") != FORMAT:
        problems.append(f"field 'format' is {policy.get('format')!r}; accepted value: {FORMAT!r}")
    if not isinstance(policy.get("model"), str):
        problems.append("field 'model' must be a string naming the model (e.g. \"resnet20\")")
    cb = policy.get("created_by")
    if not isinstance(cb, dict) or not isinstance(cb.get("method"), str):
        problems.append("field 'created_by' must be an object with a string 'method' (e.g. {\"method\": \"gmpq\"})")
    layers = policy.get("layers")
    if not isinstance(layers, dict):
        problems.append("field 'layers' must be an object mapping module names to {\"w_bits\": .., \"a_bits\": ..}")
    else:
        for name, entry in layers.items():
            problems += _check_layer(entry, f"layers[{name!r}]")
    if "default" in policy:
        problems += _check_layer(policy["default"], "default")
    if "summary" in policy and not isinstance(policy["summary"], dict):
        problems.append("field 'summary' must be an object")
    return problems


def load_policy(path: str | os.PathLike) -> dict:
    """Read and schema-check a policy file; errors name the file and every bad field."""
    policy = read_json(path, what="policy file")
    check_schema(policy, source=f"policy file {str(path)!r}")
    return policy


def save_policy(policy: dict, path: str | os.PathLike) -> Path:
    check_schema(policy, source=f"policy for {str(path)!r}")
    return atomic_write_json(path, policy)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def resolve_policy(policy: dict, model: nn.Module, source: str = "policy",
                   model_name: str | None = None) -> dict[str, dict]:
    """Validate ``policy`` against ``model``; return the entry of EVERY quantizable layer (default applied).

    One ``UserError`` lists every unknown module name, every non-quantizable target and every quantizable layer
    the policy does not cover (unless it has a ``default``), plus a model-name mismatch when ``model_name`` is given.
    """
    problems = schema_problems(policy)  # reported together with the name problems below: one message
    if not isinstance(policy, dict) or not isinstance(policy.get("layers"), dict):
        check_schema(policy, source)
    qlayers = quantizable_layers(model)
    modules = dict(model.named_modules())
    layers = policy["layers"]
    unknown = [n for n in layers if n not in modules or not n]
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in layers if n in modules and n and n not in qlayers]
    uncovered = [n for n in qlayers if n not in layers] if "default" not in policy else []
    if model_name is not None and policy["model"] != model_name:
        problems.append(f"the policy is for model {policy['model']!r}, not {model_name!r}")
    if unknown:
        problems.append(f"{len(unknown)} layer(s) in the policy are not in the model: "
                        f"{[_suggest(n, list(qlayers)) for n in unknown]}")
    if wrong:
        problems.append(f"{len(wrong)} policy target(s) are not quantizable layers (Conv2d, Linear or registered "
                        f"types): {wrong}")
    if uncovered:
        problems.append(f"{len(uncovered)} quantizable layer(s) of the model are not in the policy (add them or set "
                        f"a 'default'): {uncovered}")
    if problems:
        raise UserError(f"{source} is invalid or does not match the model:\n  - " + "\n  - ".join(problems))
    return {n: dict(layers.get(n, policy.get("default"))) for n in qlayers}


validate_policy = resolve_policy


def layer_bits(policy: dict, model: nn.Module, source: str = "policy",
               model_name: str | None = None) -> dict[str, tuple[int, int | None]]:
    """``{name: (w_bits, a_bits)}`` for every quantizable layer (``model_name``: refuse a policy for another)."""
    return {n: (e["w_bits"], e["a_bits"]) for n, e in resolve_policy(policy, model, source, model_name).items()}


def policy_specs(policy: dict, model: nn.Module, w_method: str = "symmetric", a_method: str = "pact",
                 per_channel: bool = True, source: str = "policy", model_name: str | None = None
                 ) -> dict[str, LayerSpec]:
    """The ``LayerSpec`` of every layer the policy quantizes (full-precision layers are left out)."""
    specs = {}
    for name, e in resolve_policy(policy, model, source, model_name).items():
        extra = tuple((k, e[k]) for k in EXTRA_SPEC_KEYS if k in e)
        spec = LayerSpec(e["w_bits"], e["a_bits"], e.get("w_method", w_method), e.get("a_method", a_method),
                         per_channel, extra)
        if not spec.is_full_precision or extra:
            specs[name] = spec
    return specs


def apply_policy(model: nn.Module, policy: dict, w_method: str = "symmetric", a_method: str = "pact",
                 per_channel: bool = True, source: str = "policy", model_name: str | None = None) -> nn.Module:
    """Quantize ``model`` in place per ``policy`` and return it (parameter names unchanged).

    Activation quantizers then need ``gmpq.quant.calibrate`` before the model is used.
    """
    return swap_layers(model, policy_specs(policy, model, w_method, a_method, per_channel, source, model_name))


def uniform_policy(model: nn.Module, model_name: str, w_bits: int, a_bits: int | None,
                   keep_full_precision: tuple[str, ...] = (), summary: dict | None = None) -> dict:
    """Every quantizable layer at ``w_bits``/``a_bits`` except ``keep_full_precision`` (32 / null)."""
    F.check_bits(w_bits, "w_bits")
    if a_bits is not None:
        F.check_bits(a_bits, "a_bits")
    layers = {n: ({"w_bits": F.FULL_PRECISION, "a_bits": None} if n in keep_full_precision
                  else {"w_bits": w_bits, "a_bits": a_bits}) for n in quantizable_layers(model)}
    return make_policy(model_name, layers, "uniform", summary, w_bits=w_bits, a_bits=a_bits,
                       full_precision=list(keep_full_precision))

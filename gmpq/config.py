"""Configs are dataclasses; a recipe (YAML) supplies values; ``--set key=value`` overrides them.

    cfg = load_config(SearchConfig, "recipes/quickstart.yaml", ["epochs=3", "optim.lr=1e-3"])
    save_config(cfg, out_dir / "config.yaml")

Nested dataclasses are addressed with dotted keys. Unknown keys and values of the wrong type fail with a
``UserError`` that names the key, the file and the accepted keys or type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gmpq.errors import UserError
from gmpq.io import atomic_write_text
from gmpq.runtime.settings import RENAMED

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except UserError as e:
                errors.append(str(e))
        raise UserError(f"{source}: {key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{source}: {key}={value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: {key}={value!r} should be a list, e.g. {key}=[2,3,4]")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} should be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} should be a mapping with keys {sorted(_field_types(tp))}")
        return _build(tp, value, source, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"{source}: {key}={value!r} should be true or false")
    if tp in (int, float) and isinstance(value, bool):
        raise UserError(f"{source}: {key}={value!r} should be a number")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"{source}: {key}={value!r} has the wrong type; expected {_type_name(tp)}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], values: dict, source: str, prefix: str = "") -> T:
    fields = _field_types(cls)
    unknown = sorted(set(values) - set(fields))
    renamed = [f"{prefix}{k} -> {RENAMED[prefix + k]}" for k in unknown if prefix + k in RENAMED]
    if renamed:
        raise UserError(f"{source}: renamed setting(s), one name for every stage now: {'; '.join(renamed)}")
    if unknown:
        raise UserError(
            f"{source}: unknown key(s) {[prefix + k for k in unknown]}; accepted keys: "
            f"{[prefix + k for k in fields]}"
        )
    base = cls()  # every config field has a default
    kwargs = {}
    for name, tp in fields.items():
        if name not in values:
            continue
        if dataclasses.is_dataclass(tp) and isinstance(values[name], dict):
            merged = {**dataclasses.asdict(getattr(base, name)), **values[name]}
            kwargs[name] = _build(tp, merged, source, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(values[name], tp, prefix + name, source)
    try:
        cfg = dataclasses.replace(base, **kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise UserError(f"{source}: {e}") from None
    _check_ranges(cfg, source, prefix)
    return cfg


def parse_overrides(pairs: list[str]) -> dict:
    """``["a.b=3", "c=[2,3]"]`` -> ``{"a": {"b": 3}, "c": [2, 3]}``; values are parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set epochs=3")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a mapping of config keys to values")
    return data


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Resolve a config: dataclass defaults <- ``base`` <- recipe file <- ``--set`` overrides."""
    values = dict(base or {})
    source = "config"
    if recipe is not None:
        values = _deep_merge(values, read_recipe(recipe))
        source = f"recipe {str(recipe)!r}"
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides))
        source = f"{source} with --set {' '.join(overrides)}"
    return _build(cls, values, source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) so a run can be reproduced from its outputs."""
    plain = json.loads(json.dumps(config_to_dict(cfg)))  # tuples -> lists, so safe_dump accepts them
    return atomic_write_text(path, yaml.safe_dump(plain, sort_keys=False))


# ---- Numeric ranges of settings -------------------------------------------------------------------------------
# One table for every config class, keyed by the setting's name (the last part of a dotted key); a key
# ``"ClassName.name"`` overrides the generic entry for one class. Each entry is (low, high, low_inclusive,
# high_inclusive); None = unbounded. ``None`` values (settings that are optional) are not checked.
# Checked when a config is loaded (``load_config``), so every verb inherits it.
_POS = (0, None, False, False)  # > 0
_NONNEG = (0, None, True, False)  # >= 0
_ONE_UP = (1, None, True, False)  # >= 1
_UNIT = (0, 1, True, False)  # [0, 1)
SETTING_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    # learning rates and step sizes
    **{k: _POS for k in ("lr", "arch_lr", "pretrain_lr", "lr_backbone", "backbone_pretrain_lr", "temperature",
                         "gamma", "target_gbops", "grad_clip")},
    # counts of epochs, images, steps, batches (0 allowed where 0 means "none" or "all")
    **{k: _NONNEG for k in ("epochs", "pretrain_epochs", "backbone_pretrain_epochs", "warmup_iters", "num_workers",
                            "max_images", "tol", "weight_decay", "zeta", "eta", "lambda_kl", "clip_max_norm",
                            "max_size_mb", "max_gbops", "min_size", "max_size", "lr_drop")},
    **{k: _ONE_UP for k in ("batch_size", "eval_batch_size", "train_subset", "test_subset", "image_size",
                            "max_train_images", "max_test_images", "max_steps_per_epoch", "calib_batches",
                            "num_images", "max_probes", "min_probes", "pool", "topk", "eval_every",
                            "checkpoint_every", "threads", "num_threads", "backbone_pretrain_crop",
                            "num_classes", "input_size")},
    "trainable_layers": _NONNEG,
    "momentum": _UNIT,
    "dropout": _UNIT,
    "fixed_p": _POS,
    "weight": _NONNEG,
    # detection configs resize with these sizes (0 is not "the default" there)
    "DetectorConfig.min_size": _ONE_UP,
    "DetectorConfig.max_size": _ONE_UP,
    "target_bits": (2, 8, True, True),
    "targets": (2, 8, True, True),
}


def _range_text(r: tuple) -> str:
    lo, hi, lo_in, hi_in = r
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _in_range(v: float, r: tuple) -> bool:
    lo, hi, lo_in, hi_in = r
    if v != v:  # NaN
        return False
    ok_lo = lo is None or (v >= lo if lo_in else v > lo)
    ok_hi = hi is None or (v <= hi if hi_in else v < hi)
    return ok_lo and ok_hi


def _check_ranges(cfg: Any, source: str, prefix: str) -> None:
    """Raise one ``UserError`` naming every setting of ``cfg`` (not nested) outside its accepted range."""
    problems = []
    for f in dataclasses.fields(cfg):
        r = SETTING_RANGES.get(f"{type(cfg).__name__}.{f.name}", SETTING_RANGES.get(f.name))
        value = getattr(cfg, f.name)
        if r is None or value is None or isinstance(value, bool):
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in items if isinstance(v, (int, float)) and not _in_range(v, r)]
        if bad:
            problems.append(f"{prefix}{f.name}={value!r} is out of range; accepted: {_range_text(r)}")
    cands = getattr(cfg, "candidate_bits", None)
    target = getattr(cfg, "target_bits", None)
    if cands and isinstance(target, (int, float)) and not min(cands) <= target <= max(cands):
        problems.append(f"{prefix}target_bits={target} is outside the candidate bits {list(cands)}; accepted: "
                        f"[{min(cands)}, {max(cands)}] (an average of the candidates)")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))

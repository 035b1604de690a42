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
        return dataclasses.replace(base, **kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise UserError(f"{source}: {e}") from None


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


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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

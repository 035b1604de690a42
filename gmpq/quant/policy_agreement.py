"""Which policy applies to a checkpoint that stores one.

``gmpq finetune`` stores the policy it trained with in ``model_final.pt`` / ``checkpoint.pt``. Packing or evaluating
those weights with another policy gives a model that looks plausible and is wrong (other bit-widths than the
quantizers were trained for), so: the stored policy is used unless the user overrides it explicitly, and then a
warning names every difference.
"""

from __future__ import annotations

import warnings
from typing import Any

from gmpq.errors import InputWarning, UserError
from gmpq.quant.policy import load_policy

COMPARED = ("w_bits", "a_bits", "attn_bits", "w_method", "a_method")


def _entries(policy: dict) -> dict[str, dict]:
    out = {n: e for n, e in policy.get("layers", {}).items() if isinstance(e, dict)}
    if isinstance(policy.get("default"), dict):
        out["<default>"] = policy["default"]
    return out


def policy_differences(stored: dict, given: dict) -> list[str]:
    """One line per layer whose bits or quantizer method differ, e.g. ``"conv1: w_bits 4 -> 2"`` (stored -> given),
    plus the layers only one of them lists. An empty list means the two policies quantize alike."""
    a, b = _entries(stored), _entries(given)
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            diffs.append(f"{name}: only in the stored policy")
        elif name not in a:
            diffs.append(f"{name}: only in the given policy")
        else:
            changed = [f"{k} {a[name].get(k)!r} -> {b[name].get(k)!r}" for k in COMPARED
                       if a[name].get(k) != b[name].get(k)]
            if changed:
                diffs.append(f"{name}: {', '.join(changed)}")
    if stored.get("model") != given.get("model"):
        diffs.insert(0, f"model: {stored.get('model')!r} -> {given.get('model')!r}")
    return diffs


def _shown(diffs: list[str], limit: int = 12) -> str:
    lines = diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])
    return "\n  - " + "\n  - ".join(lines)


def choose_policy(stored: dict | None, given_path: str | None, override: bool, checkpoint: str,
                  flag: str = "--policy", override_flag: str = "--override-policy") -> tuple[dict | None, str]:
    """-> (the policy to apply, a description of where it came from).

    stored: the checkpoint's policy (None if it stores none); given_path: the user's ``--policy`` (None if not
    given). A given policy equal to the stored one is accepted silently; a different one is refused unless
    ``override``, and then used with a warning on stderr naming the differences.
    """
    if given_path is None:
        return stored, (f"stored in {checkpoint}" if stored is not None else "none")
    given = load_policy(given_path)
    if stored is None:
        return given, str(given_path)
    diffs = policy_differences(stored, given)
    if not diffs:
        return given, str(given_path)
    if not override:
        raise UserError(
            f"{flag} {str(given_path)!r} differs from the policy stored in {checkpoint!r} (the one its weights were "
            f"trained with) in {len(diffs)} place(s) (stored -> given):{_shown(diffs)}\n"
            f"omit {flag} to use the stored policy, or add {override_flag} to apply yours anyway")
    warn(f"{override_flag}: applying {str(given_path)!r} instead of the policy stored in {checkpoint!r}; "
         f"{len(diffs)} difference(s) (stored -> given):{_shown(diffs)}")
    return given, f"{given_path} (overrides the policy stored in {checkpoint})"


def warn(message: str) -> None:
    """A warning for the user (the CLI prints it as ``PROG: warning: ...``)."""
    warnings.warn(message, InputWarning, stacklevel=3)


def describe(policy: dict | None) -> dict[str, Any]:
    """Fields for a result file: the producing method and the model the policy is for."""
    if policy is None:
        return {"method": "float"}
    return {"method": policy.get("created_by", {}).get("method"), "policy_model": policy.get("model")}

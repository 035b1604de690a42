"""``detr-ptq`` command line (same conventions as ``gmpq``: thin verbs, ``UserError`` -> exit 2)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gmpq.cli import run_cli

VERB_MODULES: list[str] = [
    "detr_ptq.cli_data",
    "detr_ptq.cli_train",
    "detr_ptq.cli_eval",
    "detr_ptq.cli_ptq",
    "detr_ptq.cli_qat",
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("detr-ptq", VERB_MODULES, "DETR quantization: Hessian mixed-precision PTQ and Q-DETR QAT.", argv)


if __name__ == "__main__":
    sys.exit(main())

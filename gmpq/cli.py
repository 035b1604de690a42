"""``gmpq`` command line: one verb per stage; each verb is a thin layer over a ``(inputs, config) -> artifact``
function. Verb modules expose ``register(subparsers)``; errors of type ``UserError`` are printed without a
traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from gmpq.errors import NonFiniteLossError, UserError

# Each module registers its verbs; the order is the order of ``gmpq --help``.
VERB_MODULES = [
    "gmpq.quant.cli",
    "gmpq.search.cli",
    "gmpq.deploy.cli",
    "gmpq.detection.cli",
]


def build_parser(prog: str, modules: Sequence[str], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def run_cli(prog: str, modules: Sequence[str], description: str, argv: Sequence[str] | None = None) -> int:
    parser = build_parser(prog, modules, description)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("gmpq", VERB_MODULES, "Mixed-precision quantization: search, policies, fine-tune, export.", argv)


if __name__ == "__main__":
    sys.exit(main())

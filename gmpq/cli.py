"""``gmpq`` command line: one verb per stage; each verb is a thin layer over a ``(inputs, config) -> artifact``
function. Verb modules expose ``register(subparsers)``; errors of type ``UserError`` are printed without a
traceback and exit with status 2; an ``OSError`` that escaped the writers (disk full, permissions, a missing
file) is printed as the file and the cause, exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence

from gmpq.errors import InputWarning, NonFiniteLossError, UserError

# Each module registers its verbs; the order is the order of ``gmpq --help``.
VERB_MODULES = [
    "gmpq.quant.cli",
    "gmpq.search.cli",
    "gmpq.deploy.cli",
    "gmpq.attribution.cli",
    "gmpq.detection.cli",
]


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and sizes: an integer >= 1, else a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (>= 1)")
    return value


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
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, prog, warnings.showwarning)
        return _run(prog, func, args)


def _show_warning(prog: str, default, message, category, filename, lineno, file=None, line=None) -> None:
    """``InputWarning``s read as ``PROG: warning: MESSAGE`` (no source line: they are for users)."""
    if issubclass(category, InputWarning):
        print(f"{prog}: warning: {message}", file=sys.stderr)
    else:
        default(message, category, filename, lineno, file, line)


def _run(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    try:
        return int(func(args) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # an environment fault, not a bug: name the file and the cause, no traceback
        from gmpq.io import os_error_cause

        where = f" {str(e.filename)!r}" if e.filename else ""
        print(f"{prog}: error:{where} {os_error_cause(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("gmpq", VERB_MODULES, "Mixed-precision quantization: search, policies, fine-tune, export.", argv)


if __name__ == "__main__":
    sys.exit(main())

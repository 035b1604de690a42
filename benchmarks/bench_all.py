"""Run every benchmark in benchmarks/ with short settings (``make bench``) and print one table of their ratios.

Each benchmark runs in its own process (fresh memory, its own thread settings) and prints a markdown table; from
each table the columns that are ratios (`` / (``, ``speed`` or ``ratio`` in the header) are collected into one
table ``| benchmark | row | measure | value |``. A benchmark that fails is listed with its exit status and the tail
of its error output; the others still run. No GPU needed (every benchmark runs on the CPU here).

    python benchmarks/bench_all.py [--only deploy hessian] [--timeout 900]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> arguments of the short run (the benchmark files' own defaults are the full runs)
SHORT = {
    "search": ["--steps", "2", "--batch", "32", "--threads", "1", "--device", "cpu"],
    "hessian": ["--quick"],
    "deploy": ["--quick"],
}
RATIO_WORDS = (" / (", "speed", "ratio")  # "time / (b)", "speed-up", ...: not "s/step"


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Each block of consecutive ``|``-lines of ``text`` as rows of cells (the ``|---|`` rule dropped)."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.strip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def ratio_rows(name: str, text: str) -> list[tuple[str, str, str, str]]:
    """``(benchmark, row label, measure, value)`` for every ratio column of every table in ``text``."""
    out = []
    for table in markdown_tables(text):
        header, rows = table[0], table[1:]
        cols = [i for i, h in enumerate(header) if i > 0 and any(w in h.lower() for w in RATIO_WORDS)]
        for row in rows:
            out += [(name, row[0], header[i], row[i]) for i in cols if i < len(row)]
    return out


def run(name: str, args: list[str], timeout: int) -> tuple[int, float, str, str]:
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), *args], capture_output=True, text=True,
                           timeout=timeout)
        return r.returncode, time.time() - t0, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        return 124, time.time() - t0, e.stdout or "", f"timed out after {timeout} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(SHORT), default=None)
    p.add_argument("--timeout", type=int, default=900, help="seconds per benchmark")
    args = p.parse_args()
    missing = sorted(f.stem.removeprefix("bench_") for f in HERE.glob("bench_*.py")
                     if f.stem not in ("bench_all",) and f.stem.removeprefix("bench_") not in SHORT)
    if missing:
        print(f"note: no short settings for {missing}; add them to SHORT in {Path(__file__).name}")
    rows, status = [], []
    for name in args.only or sorted(SHORT):
        code, secs, out, err = run(name, SHORT[name], args.timeout)
        print(f"## bench_{name}.py {' '.join(SHORT[name])}  (exit {code}, {secs:.0f} s)\n{out.strip()}\n")
        if code != 0:
            print("\n".join(err.strip().splitlines()[-8:]) + "\n")
        status.append((name, code, secs))
        rows += ratio_rows(name, out)
    print("| benchmark | row | measure | value |\n|---|---|---|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for name, code, _ in status:
        if code != 0:
            print(f"| {name} | FAILED (exit {code}) | - | - |")
    return 0 if all(code == 0 for _, code, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())

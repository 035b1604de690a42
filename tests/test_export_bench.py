"""benchmarks/bench_all.py collects the ratio columns of every benchmark's markdown table into one table."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench_all():
    spec = importlib.util.spec_from_file_location("bench_all", BENCH / "bench_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratio_columns_are_collected():
    mod = load_bench_all()
    out = ("resnet20, batch 32\n| variant | s/step | peak MB | time / (b) | memory / (b) |\n|---|---:|---:|---:|---:|\n"
           "| (a) float | 0.100 | 50 | 0.50 | 0.40 |\n| (b) W4A4 | 0.200 | 120 | 1.00 | 1.00 |\n\nother text\n"
           "| case | CPU speedup b32 | size KB |\n|---|---:|---|\n| resnet20_w8a8 | 0.97 | 280 |\n")
    assert mod.ratio_rows("x", out) == [
        ("x", "(a) float", "time / (b)", "0.50"), ("x", "(a) float", "memory / (b)", "0.40"),
        ("x", "(b) W4A4", "time / (b)", "1.00"), ("x", "(b) W4A4", "memory / (b)", "1.00"),
        ("x", "resnet20_w8a8", "CPU speedup b32", "0.97")]


def test_every_benchmark_has_short_settings():
    mod = load_bench_all()
    files = {p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py")} - {"all"}
    assert files == set(mod.SHORT)

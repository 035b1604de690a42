"""``gmpq report``: the ARD of ``gmpq attribution`` and the quantized-layer BOPs join each run's row; seeds group."""

import json
import statistics

import pytest

from gmpq.deploy.report import group_rows, load_results, report
from gmpq.errors import UserError


def _run(folder, top1, bops=0.8, policy=None, ard=None, sub="attribution"):
    folder.mkdir(parents=True)
    r = {"top1": top1, "bops_g": bops, "size_mb": 0.1, "method": "gmpq"}
    if policy is not None:
        r["policy"] = str(policy)
    (folder / "result.json").write_text(json.dumps(r))
    if ard is not None:
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "attribution.json").write_text(json.dumps({"ard_mean": ard, "ard_std": 1.0, "n_images": 7}))
    return folder / "result.json"


def test_report_shows_ard_and_quantized_bops_when_available(tmp_path):
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"summary": {"bops_g": 0.8, "quantized_bops_g": 0.36}}))
    with_ard = _run(tmp_path / "a_seed0", 0.9, policy=pol, ard=12.5)
    plain = _run(tmp_path / "b", 0.8)
    rep = report([with_ard, plain], tmp_path / "rep")
    a, b = rep["runs"]
    assert a["ard"] == 12.5 and a["ard_images"] == 7 and a["quantized_bops_g"] == 0.36
    assert "ard" not in b and "quantized_bops_g" not in b
    header, _, row_a, row_b = rep["markdown"].splitlines()
    assert "| ARD |" in header and "BOPs quantized layers (G)" in header
    assert row_a.endswith("| 12.50 |") and row_b.endswith("| - |")
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["ard"] == 12.5
    # without any attribution result the column is left out
    assert "ARD" not in report([plain], tmp_path / "rep2")["markdown"]


def test_ard_also_found_in_the_run_folder_itself(tmp_path):
    (row,) = load_results([_run(tmp_path / "r", 0.5, ard=3.0, sub=".")])
    assert row["ard"] == 3.0


def test_attribution_file_without_ard_is_a_clear_error(tmp_path):
    p = _run(tmp_path / "r", 0.5)
    (tmp_path / "r" / "attribution").mkdir()
    (tmp_path / "r" / "attribution" / "attribution.json").write_text(json.dumps({"n_images": 3}))
    with pytest.raises(UserError, match=r"attribution\.json.*ard_mean"):
        load_results([p])


def test_group_gives_mean_and_sample_std_over_seeds(tmp_path):
    top1 = [0.81, 0.84, 0.86]
    ards = [10.0, 14.0, 15.0]
    paths = [_run(tmp_path / f"ft_gmpq_seed{i}", t, ard=a) for i, (t, a) in enumerate(zip(top1, ards))]
    paths.append(_run(tmp_path / "float", 0.92))
    rep = report(paths, tmp_path / "rep", group=True)
    g, f = rep["groups"]
    assert g["name"] == "ft_gmpq" and g["runs"] == 3 and f["name"] == "float" and f["runs"] == 1
    assert g["top1"] == {"mean": statistics.fmean(top1), "std": statistics.stdev(top1), "n": 3}
    assert g["ard"]["mean"] == statistics.fmean(ards) and f["top1"]["std"] is None and "ard" not in f
    md = rep["markdown"]
    assert f"| ft_gmpq | gmpq | 3 | {100 * statistics.fmean(top1):.2f} ± {100 * statistics.stdev(top1):.2f} |" in md
    assert md.index("mean ± std") < md.index("every run")
    assert group_rows([{"name": "x-seed1", "top1": 0.5}], ["top1"])[0]["name"] == "x"

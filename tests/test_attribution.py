"""Attribution Rank Distance by hand, captum's Grad-CAM equal to the project's own, and ``gmpq attribution`` on real
CIFAR-10: ARD 0 for the float model against itself, > 0 against a 2-bit version."""

from __future__ import annotations

import json

import pytest
import torch

from gmpq.attribution.ard import attribution_rank_distance, pixel_ranks
from gmpq.attribution.cam import captum_gradcam
from gmpq.cli import main
from gmpq.models import create_model, model_spec
from gmpq.search.gradcam import capture_features, grad_cam, upsample


def test_pixel_ranks_and_ard_by_hand():
    f = torch.tensor([[[0.9, 0.1], [0.5, 0.3]]])  # ranks: 0, 3, 1, 2
    q = torch.tensor([[[0.2, 0.8], [0.5, 0.1]]])  # ranks: 2, 0, 1, 3
    assert pixel_ranks(f).tolist() == [[0, 3, 1, 2]]
    assert pixel_ranks(q).tolist() == [[2, 0, 1, 3]]
    # top-2 float pixels: 0 (rank 0 -> 2) and 2 (rank 1 -> 1): mean displacement (2 + 0) / 2
    assert attribution_rank_distance(f, q, top=2).tolist() == [1.0]
    assert attribution_rank_distance(f, q, top=100).tolist() == [(2 + 3 + 0 + 1) / 4]  # capped at 4 pixels


def test_ard_of_a_map_with_itself_is_zero_even_with_ties():
    m = torch.rand(5, 8, 8).round(decimals=1)  # many ties
    assert attribution_rank_distance(m, m.clone()).eq(0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        attribution_rank_distance(m, m[:, :4])


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_captum_gradcam_equals_the_projects_gradcam(name, one_thread):
    spec = model_spec(name)
    model = create_model(name).eval().double()
    x = torch.randn(4, spec.input_size[0], *spec.input_size[1:], dtype=torch.float64)
    target = torch.tensor([0, 3, 5, 9])
    with capture_features(model, spec.feature_layer) as store:
        logits = model(x)
    ours = upsample(grad_cam(store["features"], logits, target, create_graph=False), tuple(x.shape[-2:]))
    theirs = captum_gradcam(model, spec.feature_layer, x, target)
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours.detach(), rtol=1e-10, atol=1e-12)


def test_attribution_cli_on_real_cifar10(shared_data, tmp_path, one_thread):
    w = str(shared_data / "cifar_resnets" / "resnet20-12fca82f.th")
    data = f"cifar10_npz:{shared_data / 'cifar10'}"
    common = ["attribution", "--model", "resnet20", "--weights", w, "--data", data, "--images", "16",
              "--calib-batches", "1"]
    assert main(common + ["--out", str(tmp_path / "self"), "--grid", "2"]) == 0
    same = json.loads((tmp_path / "self" / "attribution.json").read_text())
    assert same["ard_mean"] == 0.0 and same["float_top1"] == same["quant_top1"] and same["n_images"] == 16
    assert (tmp_path / "self" / "gradcam_grid.png").stat().st_size > 0
    assert main(["policy", "uniform", "--model", "resnet20", "--w-bits", "2", "--a-bits", "2",
                 "--out", str(tmp_path / "w2a2.json")]) == 0
    assert main(common + ["--policy", str(tmp_path / "w2a2.json"), "--grid", "0", "--out", str(tmp_path / "q")]) == 0
    quant = json.loads((tmp_path / "q" / "attribution.json").read_text())
    assert quant["ard_mean"] > 1.0 and not (tmp_path / "q" / "gradcam_grid.png").exists()

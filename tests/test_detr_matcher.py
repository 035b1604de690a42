"""Hungarian matcher vs brute force, the set criterion's known optimum, and the post-processor."""

from __future__ import annotations

import itertools

import pytest
import torch

from detr_ptq.models.criterion import SetCriterion, make_weight_dict
from detr_ptq.models.matcher import HungarianMatcher, match_cost
from detr_ptq.models.postprocess import PostProcess
from gmpq.runtime.terms import weighted_total


def _random_case(gen: torch.Generator, q: int, n: int, k: int = 5):
    logits = torch.randn(q, k + 1, generator=gen)
    boxes = torch.rand(q, 4, generator=gen) * 0.5 + 0.1
    labels = torch.randint(0, k, (n,), generator=gen)
    tgt = torch.rand(n, 4, generator=gen) * 0.5 + 0.1
    return logits, boxes, labels, tgt


@pytest.mark.parametrize("q,n", [(3, 1), (4, 2), (5, 3), (6, 4), (5, 5)])
def test_matcher_equals_brute_force(q, n):
    gen = torch.Generator().manual_seed(q * 10 + n)
    matcher = HungarianMatcher()
    for _ in range(5):
        logits, boxes, labels, tgt = _random_case(gen, q, n)
        rows, cols = matcher({"pred_logits": logits[None], "pred_boxes": boxes[None]},
                             [{"labels": labels, "boxes": tgt}])[0]
        cost = match_cost(logits, boxes, labels, tgt, 1.0, 5.0, 2.0)
        best = min(sum(cost[perm[j], j] for j in range(n)) for perm in itertools.permutations(range(q), n))
        assert len(rows) == n and sorted(cols.tolist()) == list(range(n))
        torch.testing.assert_close(cost[rows, cols].sum(), best)


def test_matcher_batched_equals_per_image_and_handles_empty_targets():
    gen = torch.Generator().manual_seed(0)
    cases = [_random_case(gen, 6, n) for n in (2, 0, 4)]
    outputs = {"pred_logits": torch.stack([c[0] for c in cases]), "pred_boxes": torch.stack([c[1] for c in cases])}
    targets = [{"labels": c[2], "boxes": c[3]} for c in cases]
    batched = HungarianMatcher()(outputs, targets)
    for i, c in enumerate(cases):
        single = HungarianMatcher()({"pred_logits": c[0][None], "pred_boxes": c[1][None]}, [targets[i]])[0]
        assert all(torch.equal(a, b) for a, b in zip(batched[i], single))
    assert len(batched[1][0]) == 0


def test_criterion_perfect_prediction_has_zero_box_loss_and_weights_in_one_place():
    num_classes, q = 4, 5
    tgt = {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}
    boxes = torch.full((1, q, 4), 0.05)
    boxes[0, 2], boxes[0, 4] = tgt["boxes"][0], tgt["boxes"][1]
    logits = torch.full((1, q, num_classes + 1), -20.0)
    logits[0, :, num_classes] = 20.0  # no-object everywhere ...
    logits[0, 2, num_classes], logits[0, 2, 1] = -20.0, 20.0  # ... except the two matched queries
    logits[0, 4, num_classes], logits[0, 4, 3] = -20.0, 20.0
    out = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}]}
    weights = make_weight_dict(1.0, 5.0, 2.0, num_aux=1)
    crit = SetCriterion(num_classes, HungarianMatcher(), weights, eos_coef=0.1)
    terms = crit(out, [tgt])
    assert set(terms) == {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error",
                          "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "class_error", "cardinality_error"):
        assert float(terms[k]) == pytest.approx(0.0, abs=1e-5), k
    fake = {k: torch.tensor(1.0) for k in terms}
    assert float(weighted_total(fake, weights)) == pytest.approx(2 * (1 + 5 + 2))


def test_postprocess_scales_boxes_to_original_pixels():
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 9.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.1, 0.1]]])
    res = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    torch.testing.assert_close(res["boxes"][0], torch.tensor([50.0, 25.0, 150.0, 75.0]))
    assert res["labels"].tolist() == [1, 0]  # the no-object logit never becomes a label
    assert res["scores"][0] > 0.9 and res["scores"][1] < 0.01

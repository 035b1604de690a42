"""Q-DETR foreground-aware query matching: vectorized selection, matching and loss against Python-loop references."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou

from detr_ptq.models.matcher import box_cxcywh_to_xyxy
from detr_ptq.qat.fqm import fqm_distill_loss, match_teacher, pad_targets, pairwise_giou, select_foreground

TAU = 0.7


def rand_boxes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Valid cxcywh boxes [*shape, 4]: centres in (0.2, 0.8), sizes in (0.05, 0.4)."""
    c = 0.2 + 0.6 * torch.rand(*shape, 2, generator=gen, dtype=torch.float64)
    wh = 0.05 + 0.35 * torch.rand(*shape, 2, generator=gen, dtype=torch.float64)
    return torch.cat([c, wh], dim=-1)


def giou1(a: torch.Tensor, b: torch.Tensor) -> float:
    return generalized_box_iou(box_cxcywh_to_xyxy(a[None]), box_cxcywh_to_xyxy(b[None]))[0, 0].item()


def ref_select(s_boxes: torch.Tensor, gts: torch.Tensor, tau: float) -> list[bool]:
    """One image: s_boxes [Q, 4], gts [n, 4] -> keep per query, by the rule written as loops."""
    keep = [False] * len(s_boxes)
    for g in gts:
        best = max(giou1(g, s) for s in s_boxes)
        for j, s in enumerate(s_boxes):
            if giou1(g, s) > tau * best:
                keep[j] = True
    return keep


def ref_match(s_boxes: torch.Tensor, t_boxes: torch.Tensor) -> list[int]:
    out = []
    for s in s_boxes:
        scores = [2 * giou1(s, t) - 5 * (s - t).abs().sum().item() for t in t_boxes]
        out.append(max(range(len(scores)), key=lambda k: (scores[k], -k)))
    return out


def make_case(seed: int, n_layers: int | None):
    gen = torch.Generator().manual_seed(seed)
    batch = 1 + seed % 3
    q, qt, e = 5 + seed % 3, 4 + seed % 4, 3
    lead = (n_layers, batch) if n_layers else (batch,)
    counts = [(seed + b) % 4 for b in range(batch)]
    counts[seed % batch] = 0  # always one image without gt
    targets = [{"boxes": rand_boxes(n, gen=gen)} for n in counts]
    return dict(
        targets=targets,
        s_feats=torch.randn(*lead, q, e, generator=gen, dtype=torch.float64),
        t_feats=torch.randn(*lead, qt, e, generator=gen, dtype=torch.float64),
        s_boxes=rand_boxes(*lead, q, gen=gen),
        t_boxes=rand_boxes(*lead, qt, gen=gen),
    )


def test_pairwise_giou_matches_torchvision(one_thread):
    gen = torch.Generator().manual_seed(1)
    a, b = rand_boxes(2, 5, gen=gen), rand_boxes(2, 6, gen=gen)
    want = torch.stack([generalized_box_iou(box_cxcywh_to_xyxy(x), box_cxcywh_to_xyxy(y)) for x, y in zip(a, b)])
    torch.testing.assert_close(pairwise_giou(a, b), want)


def test_pad_targets():
    boxes, valid = pad_targets([{"boxes": torch.rand(2, 4)}, {"boxes": torch.zeros(0, 4)}], "cpu")
    assert boxes.shape == (2, 2, 4) and valid.tolist() == [[True, True], [False, False]]
    assert (boxes[1] == 0).all()
    boxes, valid = pad_targets([{"boxes": torch.zeros(0, 4)}], "cpu")
    assert boxes.shape == (1, 0, 4) and valid.shape == (1, 0)


@pytest.mark.parametrize("n_layers", [None, 2])
@pytest.mark.parametrize("seed", range(6))
def test_select_and_match_equal_loop_reference(seed, n_layers, one_thread):
    c = make_case(seed, n_layers)
    gt, valid = pad_targets(c["targets"], "cpu")
    s_boxes, t_boxes = c["s_boxes"], c["t_boxes"]
    if n_layers:
        keep = select_foreground(s_boxes, gt.expand(n_layers, -1, -1, -1), valid.expand(n_layers, -1, -1), TAU)
    else:
        keep = select_foreground(s_boxes, gt, valid, TAU)
    idx = match_teacher(s_boxes, t_boxes)
    flat_s, flat_t = s_boxes.reshape(-1, *s_boxes.shape[-2:]), t_boxes.reshape(-1, *t_boxes.shape[-2:])
    batch = len(c["targets"])
    want_keep = [ref_select(s, c["targets"][i % batch]["boxes"], TAU) for i, s in enumerate(flat_s)]
    want_idx = [ref_match(s, t) for s, t in zip(flat_s, flat_t)]
    assert keep.reshape(-1, keep.shape[-1]).tolist() == want_keep
    assert idx.reshape(-1, idx.shape[-1]).tolist() == want_idx
    assert idx.dtype == torch.int64


def test_hand_made_case():
    gt = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    valid = torch.tensor([[True]])
    s = torch.tensor([[[0.5, 0.5, 0.2, 0.2],  # exact copy: GIoU 1 = G
                       [0.52, 0.5, 0.2, 0.2],  # shifted by 0.02: IoU 0.82 > 0.7
                       [0.6, 0.5, 0.2, 0.2],  # shifted by 0.1: IoU 1/3 < 0.7
                       [0.1, 0.1, 0.05, 0.05]]])  # far away: negative GIoU
    assert select_foreground(s, gt, valid, 0.7).tolist() == [[True, True, False, False]]
    assert select_foreground(s, gt, torch.tensor([[False]]), 0.7).tolist() == [[False] * 4]
    # No query overlaps the gt at all (G <= 0): nothing is selected, by design.
    assert not select_foreground(s[:, 3:], gt, valid, 0.7).any()
    t = torch.tensor([[[0.1, 0.1, 0.05, 0.05], [0.6, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    # Queries 0 and 1 -> teacher 2 (exact or nearest; duplicate 3 loses the tie), 2 -> 1, 3 -> 0.
    assert match_teacher(s, t).tolist() == [[2, 2, 1, 0]]


def test_loss_zero_for_identical_student_and_teacher(one_thread):
    c = make_case(2, 2)
    gt, valid = pad_targets(c["targets"], "cpu")
    feats = c["s_feats"].clone().requires_grad_(True)
    loss, stats = fqm_distill_loss(feats, c["s_feats"], c["s_boxes"], c["s_boxes"], gt, valid, TAU)
    assert stats["fqm_pairs"] > 0
    loss.backward()
    assert loss.item() == 0.0 and (feats.grad == 0).all()


def test_loss_positive_when_selected_feature_differs(one_thread):
    c = make_case(2, None)
    gt, valid = pad_targets(c["targets"], "cpu")
    keep = select_foreground(c["s_boxes"], gt, valid, TAU)
    b, j = keep.nonzero()[0].tolist()
    teacher = c["s_feats"].clone()
    teacher[b, j] += 1.0
    loss, _ = fqm_distill_loss(c["s_feats"], teacher, c["s_boxes"], c["s_boxes"], gt, valid, TAU)
    assert loss.item() > 0
    # A difference at an unselected query does not count.
    b, j = (~keep).nonzero()[0].tolist()
    teacher = c["s_feats"].clone()
    teacher[b, j] += 1.0
    loss, _ = fqm_distill_loss(c["s_feats"], teacher, c["s_boxes"], c["s_boxes"], gt, valid, TAU)
    assert loss.item() == 0.0


@pytest.mark.parametrize("n_layers", [None, 3])
@pytest.mark.parametrize("seed", [2, 5, 7, 8])
def test_loss_equals_loop_reference(seed, n_layers, one_thread):
    c = make_case(seed, n_layers)
    gt, valid = pad_targets(c["targets"], "cpu")
    loss, stats = fqm_distill_loss(c["s_feats"], c["t_feats"], c["s_boxes"], c["t_boxes"], gt, valid, TAU)
    s_f, t_f = c["s_feats"], c["t_feats"]
    s_b, t_b = c["s_boxes"], c["t_boxes"]
    if not n_layers:
        s_f, t_f, s_b, t_b = s_f[None], t_f[None], s_b[None], t_b[None]
    terms = []
    for layer in range(s_f.shape[0]):
        for b, target in enumerate(c["targets"]):
            keep = ref_select(s_b[layer, b], target["boxes"], TAU)
            match = ref_match(s_b[layer, b], t_b[layer, b])
            terms += [((s_f[layer, b, j] - t_f[layer, b, match[j]]) ** 2).mean().item()
                      for j in range(len(keep)) if keep[j]]
    assert stats["fqm_pairs"] == len(terms) > 0
    assert stats["fqm_selected"] == pytest.approx(len(terms) / (s_f.shape[0] * len(c["targets"])))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_loss_without_gt_is_differentiable_zero(one_thread):
    c = make_case(0, 2)
    feats = c["s_feats"].clone().requires_grad_(True)
    gt, valid = pad_targets([{"boxes": torch.zeros(0, 4)}] * feats.shape[1], "cpu")
    loss, stats = fqm_distill_loss(feats, c["t_feats"], c["s_boxes"], c["t_boxes"], gt, valid, TAU)
    assert loss.item() == 0.0 and stats == {"fqm_selected": 0.0, "fqm_pairs": 0.0}
    assert loss.requires_grad
    loss.backward()
    assert (feats.grad == 0).all()


def test_loss_does_not_backprop_into_teacher_or_boxes(one_thread):
    c = make_case(3, None)
    gt, valid = pad_targets(c["targets"], "cpu")
    t_feats, s_boxes = c["t_feats"].requires_grad_(True), c["s_boxes"].requires_grad_(True)
    loss, _ = fqm_distill_loss(c["s_feats"].requires_grad_(True), t_feats, s_boxes, c["t_boxes"], gt, valid, TAU)
    loss.backward()
    assert t_feats.grad is None and s_boxes.grad is None

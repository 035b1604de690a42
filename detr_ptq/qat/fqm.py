"""Foreground-aware query matching (FQM) and the query distillation loss of Q-DETR (Xu et al., CVPR 2023).

Q-DETR distils the decoder query features of the full-precision teacher into the quantized student, but only at
the student queries that look at an object, each paired with the teacher query that predicts the same box:

1. Foreground selection. For each ground-truth box ``i`` of an image let ``G_i = max_j GIoU(gt_i, s_j)`` over the
   student's predicted boxes ``s_j``. Student query ``j`` is kept iff ``GIoU(gt_i, s_j) > tau * G_i`` for some
   ``i``.
2. Matching. Each kept student query takes the teacher query ``k`` maximizing
   ``2 * GIoU(s_j, t_k) - 5 * L1(s_j, t_k)`` (DETR's matching weights, L1 summed over the 4 cxcywh coordinates).
3. Loss. Mean squared error between the matched student and teacher feature vectors, per decoder layer.

Everything is vectorized over the leading dims (decoder layer, image) and the queries. Boxes are normalized
cxcywh in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from detr_ptq.models.matcher import box_cxcywh_to_xyxy

_EPS = 1e-12  # only guards degenerate (zero-area) boxes against 0/0; real boxes have areas far above it
COST_GIOU = 2.0
COST_L1 = 5.0


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalized IoU of every pair: a [..., N, 4], b [..., M, 4] (cxcywh; leading dims broadcast) -> [..., N, M].

    Same values as ``torchvision.ops.generalized_box_iou`` on each leading index.
    """
    a, b = box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b)
    area_a = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]))[..., :, None]  # [..., N, 1]
    area_b = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[..., None, :]  # [..., 1, M]
    a, b = a[..., :, None, :], b[..., None, :, :]  # [..., N, 1, 4], [..., 1, M, 4]
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=_EPS)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def pad_targets(targets: list[dict], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Stack the ground-truth boxes of a batch: targets[b]["boxes"] [n_b, 4] cxcywh ->
    (boxes [B, N, 4] zero-padded, valid [B, N] bool) with N = max_b n_b (0 when no image has a box)."""
    n = max((len(t["boxes"]) for t in targets), default=0)
    dtype = targets[0]["boxes"].dtype if targets else torch.float32
    boxes = torch.zeros(len(targets), n, 4, dtype=dtype, device=device)
    valid = torch.zeros(len(targets), n, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        k = len(t["boxes"])
        boxes[b, :k] = t["boxes"].to(device=device, dtype=dtype)
        valid[b, :k] = True
    return boxes, valid


def select_foreground(student_boxes: Tensor, gt_boxes: Tensor, gt_valid: Tensor, tau: float) -> Tensor:
    """Q-DETR FQM foreground selection: student_boxes [..., Q, 4], gt_boxes [..., N, 4], gt_valid [..., N] bool
    -> keep [..., Q] bool.

    With ``G_i = max_j GIoU(gt_i, s_j)`` over the queries, query ``j`` is kept iff ``GIoU(gt_i, s_j) > tau * G_i``
    for some valid ``i``. A gt box with ``G_i <= 0`` (no query overlaps it, or even comes near) selects nothing: for
    ``tau <= 1`` no query can beat ``tau * G_i >= G_i``. That is intended: such a box has no foreground query.
    Padded gt boxes (valid False) and images without gt select nothing.
    """
    valid = gt_valid[..., :, None]  # [..., N, 1]
    safe_gt = torch.where(valid, gt_boxes, torch.full_like(gt_boxes, 0.5))  # padding would be a 0-area box
    giou = pairwise_giou(safe_gt, student_boxes)  # [..., N, Q]
    best = giou.max(dim=-1, keepdim=True).values  # [..., N, 1]
    return ((giou > tau * best) & valid).any(dim=-2)


def match_teacher(student_boxes: Tensor, teacher_boxes: Tensor) -> Tensor:
    """Q-DETR FQM matching: student_boxes [..., Q, 4], teacher_boxes [..., Qt, 4] -> index [..., Q] int64 of the
    teacher query maximizing ``2 * GIoU(s_j, t_k) - 5 * L1(s_j, t_k)`` (L1 summed over cxcywh). Ties go to the
    lowest index. One teacher query may serve several student queries."""
    l1 = (student_boxes[..., :, None, :] - teacher_boxes[..., None, :, :]).abs().sum(dim=-1)  # [..., Q, Qt]
    score = COST_GIOU * pairwise_giou(student_boxes, teacher_boxes) - COST_L1 * l1
    return score.argmax(dim=-1)


def fqm_distill_loss(student_feats: Tensor, teacher_feats: Tensor, student_boxes: Tensor, teacher_boxes: Tensor,
                     gt_boxes: Tensor, gt_valid: Tensor, tau: float) -> tuple[Tensor, dict[str, float]]:
    """Q-DETR FQM distillation loss over the decoder layers.

    student_feats [L, B, Q, E], teacher_feats [L, B, Qt, E] (decoder outputs per layer), student_boxes
    [L, B, Q, 4], teacher_boxes [L, B, Qt, 4] (cxcywh, the boxes predicted from those layers), gt_boxes [B, N, 4],
    gt_valid [B, N] (from ``pad_targets``). 3-D inputs without the L dim are accepted as L = 1.

    Per layer, the foreground student queries are selected (``select_foreground``) and matched to teacher queries
    (``match_teacher``) with that layer's boxes, without gradient. The loss is the squared feature difference,
    averaged over the E elements and over all selected (layer, image, query) pairs; the teacher is a constant.
    With nothing selected it is a zero still attached to the student graph (backward and DDP keep working).

    Returns (loss [], {"fqm_selected": mean selected queries per image and layer, "fqm_pairs": total pairs}).
    The statistics are Python floats, so this call synchronizes with the device once.
    """
    if student_feats.dim() == 3:
        student_feats, teacher_feats = student_feats[None], teacher_feats[None]
        student_boxes, teacher_boxes = student_boxes[None], teacher_boxes[None]
    if student_feats.shape[:3] != student_boxes.shape[:3] or teacher_feats.shape[:3] != teacher_boxes.shape[:3]:
        raise ValueError(f"features and boxes disagree: student {tuple(student_feats.shape)} vs "
                         f"{tuple(student_boxes.shape)}, teacher {tuple(teacher_feats.shape)} vs "
                         f"{tuple(teacher_boxes.shape)}")
    n_layers, batch = student_feats.shape[:2]
    dtype = torch.promote_types(student_feats.dtype, torch.float32)  # half/bf16 under autocast -> float32
    with torch.no_grad():
        s_boxes, t_boxes = student_boxes.detach().to(dtype), teacher_boxes.detach().to(dtype)
        keep = select_foreground(s_boxes, gt_boxes.to(dtype).expand(n_layers, -1, -1, -1),
                                 gt_valid.expand(n_layers, -1, -1), tau)  # [L, B, Q]
        idx = match_teacher(s_boxes, t_boxes)  # [L, B, Q]
        matched = teacher_feats.detach().gather(2, idx[..., None].expand(-1, -1, -1, teacher_feats.shape[-1]))
    sq = (student_feats.to(dtype) - matched.to(dtype)).pow(2).mean(dim=-1)  # [L, B, Q]
    pairs = keep.sum()
    # where() rather than boolean indexing: no branch on the count, and the zero keeps its grad_fn.
    loss = torch.where(keep, sq, torch.zeros_like(sq)).sum() / pairs.clamp(min=1)
    n = float(pairs.item())
    return loss, {"fqm_selected": n / max(n_layers * batch, 1), "fqm_pairs": n}

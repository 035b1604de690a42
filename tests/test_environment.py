"""The installed torch/torchvision pair must be compatible: torchvision's compiled ops load and run."""

import torch
import torchvision
from torchvision.ops import box_iou, nms, roi_align


def test_torchvision_compiled_ops_load():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert box_iou(boxes[:1], boxes[:1]).item() == 1.0
    out = roi_align(torch.rand(1, 2, 8, 8), [boxes[:1] / 2], output_size=2)
    assert out.shape == (1, 2, 2, 2)
    assert torchvision.__version__.split(".")[:2] >= ["0", "29"] or int(torchvision.__version__.split(".")[1]) >= 29

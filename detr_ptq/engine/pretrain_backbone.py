"""Backbone pretraining as a classifier of object crops: the tiny detector's stand-in for DETR's
ImageNet-pretrained ResNet.

DETR learns localisation long before it learns classes when its backbone starts from random weights: the only
class signal reaches the backbone through the decoder's cross-attention. A few epochs of plain classification of
fixed-size crops centred on the training boxes (objects at their native scale, neighbours included) give the
backbone class features first, as ImageNet pretraining does for the official model.

The loop is the project's one training loop (``gmpq.runtime.fit``): ``pretrain_task`` supplies the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from detr_ptq.data.coco import CocoDetection
from detr_ptq.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gmpq.io import load_image
from gmpq.runtime import Task


def object_crops(dataset: CocoDetection, size: int) -> tuple[Tensor, Tensor]:
    """-> (crops [N, 3, size, size] uint8, labels [N] = category ids): a window of ``size`` pixels centred on
    each non-crowd box, shifted to stay inside the image (images smaller than ``size`` are zero-padded)."""
    crops, labels = [], []
    for info in dataset.images:
        image = TF.pil_to_tensor(load_image(dataset.img_folder / info["file_name"]))
        _, h, w = image.shape
        image = F.pad(image, (0, max(0, size - w), 0, max(0, size - h)))
        for ann in dataset.anns[info["id"]]:
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            x0 = int(min(max(round(x + bw / 2 - size / 2), 0), image.shape[2] - size))
            y0 = int(min(max(round(y + bh / 2 - size / 2), 0), image.shape[1] - size))
            crops.append(image[:, y0:y0 + size, x0:x0 + size])
            labels.append(ann["category_id"])
    return torch.stack(crops), torch.tensor(labels, dtype=torch.int64)


class CropClassifier(nn.Module):
    """``body`` (image [B, 3, H, W] -> {"0": features [B, C, h, w]}) + a temporary linear head on the
    average-pooled features -> logits [B, num_classes]."""

    def __init__(self, body: nn.Module, out_channels: int, num_classes: int):
        super().__init__()
        self.body, self.head = body, nn.Linear(out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)["0"].mean(dim=(2, 3)))


def pretrain_task(body: nn.Module, out_channels: int, num_classes: int, crops: Tensor, labels: Tensor, lr: float,
                  batch_size: int = 64, shift: int = 4, seed: int = 0) -> Task:
    """The engine task that trains ``body`` in place: AdamW (weight decay 1e-4), cross-entropy on crops shifted by
    up to ``shift`` pixels (one shift per batch, from the global RNG the engine checkpoints); terms ``ce`` and
    ``acc`` (logged only: the epoch's ``train_acc`` is the training accuracy)."""
    model = CropClassifier(body, out_channels, num_classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(crops, labels), batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    size = crops.shape[-1] - 2 * shift
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def loss_terms(net: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        dx, dy = torch.randint(0, 2 * shift + 1, (2,)).tolist()
        device = next(model.parameters()).device
        x = ((x[:, :, dy:dy + size, dx:dx + size].float() / 255 - mean) / std).to(device)
        logits, y = net(x), y.to(device)
        return {"ce": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean().detach()}

    return Task(model=model, optimizer=optimizer, loader=loader, loss_terms=loss_terms, weights={"ce": 1.0},
                name="backbone_pretrain", on_epoch_start=lambda epoch: model.train())

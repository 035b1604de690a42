"""Backbone pretraining as a classifier of object crops: the tiny detector's stand-in for DETR's
ImageNet-pretrained ResNet.

DETR learns localisation long before it learns classes when its backbone starts from random weights: the only
class signal reaches the backbone through the decoder's cross-attention. A few epochs of plain classification of
fixed-size crops centred on the training boxes (objects at their native scale, neighbours included) give the
backbone class features first, as ImageNet pretraining does for the official model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from tqdm import tqdm

from detr_ptq.data.coco import CocoDetection
from detr_ptq.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gmpq.io import load_image


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


def _normalize(crops: Tensor) -> Tensor:
    return TF.normalize(crops.float() / 255, IMAGENET_MEAN, IMAGENET_STD)


def pretrain_backbone(body: nn.Module, out_channels: int, num_classes: int, crops: Tensor, labels: Tensor,
                      epochs: int, lr: float, batch_size: int = 64, shift: int = 4, seed: int = 0,
                      progress: bool = False) -> dict[str, float]:
    """Train ``body`` (image [B, 3, H, W] -> {"0": features [B, C, h, w]}) with a temporary linear head on
    average-pooled features; random shifts of up to ``shift`` pixels. -> {"train_accuracy": last epoch}."""
    head = nn.Linear(out_channels, num_classes)
    params = [p for p in body.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    size = crops.shape[-1] - 2 * shift
    body.train()
    accuracy = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(crops), generator=gen)
        correct = 0
        for start in tqdm(range(0, len(order), batch_size), desc=f"backbone pretrain {epoch}", disable=not progress,
                          mininterval=10):
            idx = order[start:start + batch_size]
            dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
            x = _normalize(crops[idx, :, dy:dy + size, dx:dx + size])
            logits = head(body(x)["0"].mean(dim=(2, 3)))
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(-1) == labels[idx]).sum().item()
        accuracy = correct / len(order)
        print(f"backbone pretrain epoch {epoch}: loss {loss.item():.4f}  train accuracy {accuracy:.4f}", flush=True)
    return {"train_accuracy": accuracy}

"""Attribution Rank Distance (ARD), GMPQ paper Fig. 1(b): how far the most important pixels of the float model
move in the quantized model's ranking.

For one image, rank every pixel by attribution (rank 0 = most important) in the float map and in the quantized
map; ARD is the mean, over the ``top`` most important pixels of the FLOAT map, of ``|rank_float - rank_quant|``.
A model compared with itself gives exactly 0. Ties are ranked by pixel index (a stable sort), so equal maps give
equal rankings.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pixel_ranks(maps: Tensor) -> Tensor:
    """``[N, H, W]`` attribution maps -> ``[N, H*W]`` rank of every pixel (0 = largest), ties by pixel index."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def attribution_rank_distance(float_maps: Tensor, quant_maps: Tensor, top: int = 100) -> Tensor:
    """ARD per image ``[N]`` (in pixels of rank) between maps ``[N, H, W]`` of the same size; ``top`` is capped by
    the pixel count."""
    if float_maps.shape != quant_maps.shape:
        raise ValueError(f"maps differ in shape: {tuple(float_maps.shape)} vs {tuple(quant_maps.shape)}")
    rf, rq = pixel_ranks(float_maps), pixel_ranks(quant_maps)
    k = min(top, rf.shape[1])
    top_pixels = torch.sort(float_maps.flatten(1), dim=1, descending=True, stable=True).indices[:, :k]
    return (rf.gather(1, top_pixels) - rq.gather(1, top_pixels)).abs().float().mean(dim=1)

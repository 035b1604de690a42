"""``run_attribution(cfg) -> result``: Grad-CAM of the float and the quantized model on test images, their
Attribution Rank Distance, and a PNG grid of overlays.

Outputs in ``cfg.out_dir`` (atomic): ``attribution.json`` (ARD mean / std / per image, accuracies on the images),
``gradcam_grid.png`` (image | float Grad-CAM | quantized Grad-CAM, one row per image) and ``config.yaml``.
Without a policy or quantized weights the "quantized" model is the float model itself (ARD 0).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from gmpq.attribution.ard import attribution_rank_distance
from gmpq.attribution.cam import captum_gradcam
from gmpq.config import save_config
from gmpq.data import DataConfig, build_dataset
from gmpq.errors import UserError
from gmpq.io import atomic_write_bytes, atomic_write_json, ensure_writable_dir
from gmpq.models import create_model, model_spec

TARGETS = ("float", "label")


@dataclasses.dataclass
class AttributionConfig:
    model: str = "resnet20"
    num_classes: int | None = None
    weights: str | None = None  # float weights (required)
    policy: str | None = None  # quantize the float model with this policy (calibrated on the train split)
    quant_weights: str | None = None  # or: a quantized checkpoint (e.g. gmpq finetune's model_final.pt)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    images: int = 256  # test images compared (the first ones of the test split)
    grid: int = 8  # rows of the PNG grid
    top: int = 100  # float-map pixels whose rank displacement is averaged (paper: 100)
    layer: str | None = None  # Grad-CAM layer; None = the model's last feature map
    target: str = "float"  # class both maps explain: "float" (the float model's prediction) or "label"
    calib_batches: int = 8
    device: str = "cpu"
    out_dir: str = "runs/attribution"

    def __post_init__(self):
        if self.images < 1 or self.grid < 0 or self.top < 1:
            raise ValueError("images and top must be >= 1, grid >= 0")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} is not accepted; accepted values: {list(TARGETS)}")


def _quantized(cfg: AttributionConfig, float_model: nn.Module, spec) -> nn.Module:
    if cfg.policy is None and cfg.quant_weights is None:
        return copy.deepcopy(float_model)
    from gmpq.deploy.calibration import calibrate_on_data
    from gmpq.deploy.run_eval import EvalConfig, build_eval_model
    from gmpq.quant import is_calibrated

    ecfg = EvalConfig(model=cfg.model, num_classes=cfg.num_classes, weights=cfg.quant_weights or cfg.weights,
                      policy=cfg.policy, data=cfg.data, calib_batches=cfg.calib_batches, device=cfg.device)
    model, _, _ = build_eval_model(ecfg)
    model = model.to(cfg.device)
    if not is_calibrated(model):
        calibrate_on_data(model, cfg.data, spec, cfg.num_classes, cfg.calib_batches, cfg.device)
    return model.eval()


def attribution_maps(model: nn.Module, layer: str, loader, n: int, device, explain: nn.Module | None = None
                     ) -> tuple[torch.Tensor, ...]:
    """Grad-CAM maps ``[n, H, W]``, the images, labels and predictions of the first ``n`` images. The class
    explained is the label, or the prediction of ``explain`` (e.g. the float model) when given."""
    maps, xs, ys, preds = [], [], [], []
    seen = 0
    for x, y in loader:
        x, y = x[: n - seen].to(device), y[: n - seen].to(device)
        with torch.no_grad():
            target = y if explain is None else explain(x).argmax(1)
        maps.append(captum_gradcam(model, layer, x, target).cpu())
        with torch.no_grad():
            preds.append(model(x).argmax(1).cpu())
        xs.append(x.cpu())
        ys.append(y.cpu())
        seen += len(y)
        if seen >= n:
            break
    return torch.cat(maps), torch.cat(xs), torch.cat(ys), torch.cat(preds)


def run_attribution(cfg: AttributionConfig) -> dict:
    """ARD between the float and the quantized model (see the module docstring); returns the result dict."""
    if cfg.weights is None:
        raise UserError("attribution needs the float model's weights: --weights FILE")
    out = ensure_writable_dir(cfg.out_dir)
    spec = model_spec(cfg.model)
    layer = cfg.layer or spec.feature_layer
    float_model = create_model(cfg.model, cfg.num_classes, cfg.weights).to(cfg.device).eval()
    test = build_dataset(cfg.data, "test", train_transform=False)
    from gmpq.search.gradcam import check_attribution_map  # a 1 x 1 map has no ranking to compare

    check_attribution_map(float_model, layer, tuple(test[0][0].shape), cfg.model)
    quant_model = _quantized(cfg, float_model, spec)
    loader = DataLoader(test, batch_size=min(cfg.data.eval_batch_size, cfg.images))
    explain = float_model if cfg.target == "float" else None
    fm, x, y, fp = attribution_maps(float_model, layer, loader, cfg.images, cfg.device, explain)
    qm, _, _, qp = attribution_maps(quant_model, layer, loader, cfg.images, cfg.device, explain)
    ard = attribution_rank_distance(fm, qm, cfg.top)
    result = {"model": cfg.model, "weights": cfg.weights, "policy": cfg.policy, "quant_weights": cfg.quant_weights,
              "data": cfg.data.test_name or cfg.data.name, "layer": layer, "target": cfg.target, "n_images": len(y),
              "top": cfg.top,
              "ard_mean": float(ard.mean()), "ard_std": float(ard.std()) if len(ard) > 1 else 0.0,
              "float_top1": float((fp == y).float().mean()), "quant_top1": float((qp == y).float().mean()),
              "ard_per_image": [round(float(v), 3) for v in ard]}
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "attribution.json", result)
    if cfg.grid:
        save_grid(x[: cfg.grid], fm[: cfg.grid], qm[: cfg.grid], ard[: cfg.grid], spec, out / "gradcam_grid.png")
    return result


def save_grid(x: torch.Tensor, fm: torch.Tensor, qm: torch.Tensor, ard: torch.Tensor, spec, path: Path) -> Path:
    """PNG: one row per image: the image, the float Grad-CAM overlay, the quantized Grad-CAM overlay (with ARD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    rows = len(x)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for i in range(rows):
        img = (x[i] * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
        for j, (title, cam) in enumerate((("image", None), ("float", fm[i]), (f"quantized, ARD {ard[i]:.1f}", qm[i]))):
            ax = axes[i][j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            if cam is not None:
                ax.imshow((cam / (cam.max() + 1e-12)).numpy(), cmap="jet", alpha=0.5)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

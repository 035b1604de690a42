"""An offline detection dataset: real handwritten digit glyphs on textured canvases, written in COCO format.

Glyphs are scikit-learn's ``load_digits`` (1,797 real 8x8 scans from 43 writers, bundled with scikit-learn, no
download). Train and held-out splits draw glyphs from disjoint halves of that set, so held-out images contain
handwriting the detector never saw. Each image gets 1-6 digits, upscaled to random sizes and aspect ratios,
alpha-blended in a colour that contrasts with a random smooth texture; boxes are the tight boxes of the glyph ink.

Category ids are ``digit + 1`` (1..10, names ``"0"``..``"9"``), so a DETR with ``num_classes = 11`` uses the ids
as labels directly, as the official DETR does with COCO's 91 ids. Every image is drawn from its own generator
seeded by ``(seed, split, index)``: a split is reproducible alone and independent of the other's size.

Layout: ``OUT/annotations/instances_{train,val}.json`` and ``OUT/{train,val}/NNNNNN.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gmpq.io import atomic_write_json, ensure_writable_dir

SPLIT_IDS = {"train": 0, "val": 1}
GLYPH_SPLIT = 1000  # glyphs [0, 1000) for train, [1000, 1797) for val


@dataclass
class DigitsConfig:
    canvas: int = 96  # pixels, square
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 14  # glyph height in pixels
    max_size: int = 40
    max_overlap_iou: float = 0.05


def _glyphs(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    sl = slice(0, GLYPH_SPLIT) if split == "train" else slice(GLYPH_SPLIT, None)
    return d.images[sl] / 16.0, d.target[sl]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float in [0, 1]: low-frequency colour noise + a gradient + fine grain."""
    coarse = rng.uniform(0, 1, (rng.integers(2, 7), rng.integers(2, 7), 3)).astype(np.float32)
    img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                     dtype=np.float32) / 255
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    img = 0.6 * img + 0.3 * rng.uniform() * grad[..., None] + 0.2
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def render_image(rng: np.random.Generator, glyphs: np.ndarray, labels: np.ndarray,
                 cfg: DigitsConfig) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    """-> (image [H, W, 3] uint8, [(bbox [x, y, w, h] in pixels, digit)])."""
    img = _texture(rng, cfg.canvas)
    objects: list[tuple[list[float], int]] = []
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(n * 20):  # rejection sampling for placements that barely overlap
        if len(objects) == n:
            break
        k = int(rng.integers(len(glyphs)))
        h = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        w = max(6, int(round(h * rng.uniform(0.6, 1.0))))
        x, y = int(rng.integers(0, cfg.canvas - w + 1)), int(rng.integers(0, cfg.canvas - h + 1))
        alpha = np.asarray(Image.fromarray((glyphs[k] * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                           dtype=np.float32) / 255
        ys, xs = np.nonzero(alpha > 0.25)
        if len(xs) == 0:
            continue
        box = [float(x + xs.min()), float(y + ys.min()), float(xs.max() - xs.min() + 1),
               float(ys.max() - ys.min() + 1)]
        if any(_iou(box, other) > cfg.max_overlap_iou for other, _ in objects):
            continue
        patch = img[y:y + h, x:x + w]
        dark = patch.mean() > 0.5
        colour = rng.uniform(0.0, 0.25, 3) if dark else rng.uniform(0.75, 1.0, 3)
        a = np.clip(alpha * rng.uniform(1.2, 2.0), 0, 1)[..., None]
        img[y:y + h, x:x + w] = patch * (1 - a) + colour * a
        objects.append((box, int(labels[k])))
    return (img * 255).round().astype(np.uint8), objects


def make_split(out_dir: Path, split: str, num_images: int, seed: int, cfg: DigitsConfig) -> dict:
    """Write ``num_images`` PNGs and the COCO json for ``split``; returns the COCO dict."""
    glyphs, labels = _glyphs(split)
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        image, objects = render_image(rng, glyphs, labels, cfg)
        name = f"{i:06d}.png"
        # Images are plain writes (an fsync per file would make generation slow); the json index is written
        # atomically last, so a split without its json is visibly incomplete.
        Image.fromarray(image).save(img_dir / name, format="PNG")
        images.append({"id": i + 1, "file_name": name, "height": cfg.canvas, "width": cfg.canvas})
        for box, digit in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": digit + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    coco = {
        "info": {"description": f"digits-coco {split} split, seed {seed}", "canvas": cfg.canvas},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)],
    }
    atomic_write_json(out_dir / "annotations" / f"instances_{split}.json", coco)
    return coco


def make_digits_coco(out_dir: str | Path, seed: int = 0, num_train: int = 4000, num_val: int = 500,
                     cfg: DigitsConfig | None = None) -> dict[str, int]:
    """Generate both splits; returns ``{"train": n_boxes, "val": n_boxes}``."""
    cfg = cfg or DigitsConfig()
    out = ensure_writable_dir(out_dir)
    counts = {}
    for split, n in (("train", num_train), ("val", num_val)):
        if n > 0:
            counts[split] = len(make_split(out, split, n, seed, cfg)["annotations"])
    return counts

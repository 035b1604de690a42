"""Data: the digits generator, COCO/VOC readers and their errors, the DETR transform and collate."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from detr_ptq.data.coco import CocoDetection, coco_paths, load_coco_json
from detr_ptq.data.digits_coco import DigitsConfig, make_split
from detr_ptq.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetrTrainTransform,
    DetrTransform,
    collate,
    crop,
    hflip,
    resize,
    target_size,
)
from detr_ptq.data.voc import VOC_CLASSES, VocDetection
from gmpq.errors import UserError


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_digits_generator_is_deterministic_and_valid(tmp_path):
    a = make_split(tmp_path / "a", "val", 12, seed=3, cfg=DigitsConfig())
    make_split(tmp_path / "b", "val", 12, seed=3, cfg=DigitsConfig())
    c = make_split(tmp_path / "c", "val", 12, seed=4, cfg=DigitsConfig())
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a["annotations"] != c["annotations"]
    # The first images do not depend on how many are generated.
    d = make_split(tmp_path / "d", "val", 5, seed=3, cfg=DigitsConfig())
    assert d["annotations"] == [x for x in a["annotations"] if x["image_id"] <= 5]
    counts = {}
    for ann in a["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        x, y, w, h = ann["bbox"]
        assert 1 <= ann["category_id"] <= 10 and w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96
    assert all(1 <= n <= 6 for n in counts.values()) and len(counts) == 12
    ds = CocoDetection(tmp_path / "a" / "val", tmp_path / "a" / "annotations" / "instances_val.json",
                       DetrTransform(96, 96))
    image, target = ds[0]
    assert image.shape == (3, 96, 96) and ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_not_coco_json_errors(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="is not COCO format: expected an object"):
        load_coco_json(p)
    p.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UserError, match=r"missing or non-list key\(s\) \['categories'\]"):
        load_coco_json(p)
    p.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(UserError, match=r"images\[0\] lacks \['file_name'\]"):
        load_coco_json(p)
    p.write_text(json.dumps({"images": [], "categories": [],
                             "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2]}]}))
    with pytest.raises(UserError, match=r"bbox=\[1, 2\] should be \[x, y, width, height\]"):
        load_coco_json(p)
    p.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_coco_json(p)
    with pytest.raises(UserError, match=r"found \[\]"):
        coco_paths(tmp_path)


def test_undecodable_image_names_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    coco = {"images": [{"id": 1, "file_name": "bad.jpg"}], "annotations": [], "categories": [{"id": 1}]}
    ds = CocoDetection(tmp_path / "imgs", coco, DetrTransform(32, 32))
    with pytest.raises(UserError, match=r"bad\.jpg.*cannot be decoded"):
        ds[0]


def test_official_resize_rule():
    assert target_size(640, 480, 800, 1333) == (800, 1066)  # (height, width)
    assert target_size(480, 640, 800, 1333) == (1066, 800)
    assert target_size(2000, 500, 800, 1333) == (333, 1332)  # the longest side caps the scale
    assert target_size(96, 96, 96, 96) == (96, 96)


def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 6), {"image_id": 1})
    b = (torch.ones(3, 5, 3), {"image_id": 2})
    images, mask, targets = collate([a, b])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert mask[0, 4].all() and not mask[0, :4].any()
    assert mask[1, :, 3:].all() and not mask[1, :, :3].any()
    assert images[1, :, :, 3:].abs().sum() == 0 and [t["image_id"] for t in targets] == [1, 2]


def _voc_tree(root, objects_xml: str):
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "000001.jpg")
    (root / "ImageSets/Main/val.txt").write_text("000001\n")
    (root / "Annotations/000001.xml").write_text(
        f"<annotation><size><width>40</width><height>30</height></size>{objects_xml}</annotation>")


def test_voc_reader(tmp_path):
    obj = ("<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>2</ymin>"
           "<xmax>20</xmax><ymax>12</ymax></bndbox></object>")
    _voc_tree(tmp_path, obj.format("dog", 0, 1) + obj.format("car", 1, 5))
    ds = VocDetection(tmp_path, "val", DetrTransform(30, 40))
    anns = ds.coco["annotations"]
    assert [a["category_id"] for a in anns] == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("car") + 1]
    assert anns[0]["bbox"] == [0.0, 1.0, 20.0, 11.0] and [a["iscrowd"] for a in anns] == [0, 1]
    _, target = ds[0]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]  # difficult objects are not targets
    with pytest.raises(UserError, match=r"splits found: \['val'\]"):
        VocDetection(tmp_path, "train", DetrTransform(30, 40))


def test_voc_bad_xml(tmp_path):
    _voc_tree(tmp_path, "<object><name>dog</name></object>")
    with pytest.raises(UserError, match="not a valid VOC XML"):
        VocDetection(tmp_path, "val", DetrTransform(30, 40))


def test_make_digits_coco_verb(tmp_path, capsys):
    from detr_ptq.cli import main

    assert main(["make-digits-coco", "--out", str(tmp_path), "--seed", "1", "--train", "3", "--val", "2"]) == 0
    assert len(list((tmp_path / "train").glob("*.png"))) == 3 and len(list((tmp_path / "val").glob("*.png"))) == 2
    ann, _, split = coco_paths(tmp_path)
    assert split == "val" and load_coco_json(ann)["categories"][0] == {"id": 1, "name": "0", "supercategory": "digit"}
    assert "val: 2 images" in capsys.readouterr().out


# --- training augmentation: boxes stay on their objects ---------------------------------------------------------

COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def _painted(w: int = 120, h: int = 90) -> tuple[Image.Image, dict]:
    """A black image with three solid rectangles of distinct colours; the target boxes are exactly those
    rectangles (x0, y0, x1, y1 pixels, end exclusive), labels 1, 2, 3."""
    boxes = torch.tensor([[5.0, 10, 40, 50], [60, 5, 110, 30], [30, 55, 95, 85]])
    img = Image.new("RGB", (w, h))
    for (x0, y0, x1, y1), color in zip(boxes.int().tolist(), COLORS):
        img.paste(color, (x0, y0, x1, y1))
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "size": torch.tensor([h, w])}
    return img, target


def _color_bbox(pixels: torch.Tensor, color: tuple[int, int, int]) -> list[float] | None:
    """Tight (x0, y0, x1, y1) of the pixels of ``pixels [H, W, 3]`` (0..255) closer to ``color`` than to black
    and to the other colours; None when there is none."""
    want = torch.tensor(color, dtype=torch.float32)
    mask = ((pixels - want).abs().max(dim=-1).values < 128)
    if not mask.any():
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _pixels(img: Image.Image) -> torch.Tensor:
    return pil_to_tensor(img).permute(1, 2, 0).float()


def test_hflip_box_pixels_equal_the_flipped_image_pixels():
    img, target = _painted()
    out, t = hflip(img, target)
    assert t["boxes"].tolist() == [[80, 10, 115, 50], [10, 5, 60, 30], [25, 55, 90, 85]]
    for (x0, y0, x1, y1), (a0, b0, a1, b1) in zip(target["boxes"].int().tolist(), t["boxes"].int().tolist()):
        before = _pixels(img.crop((x0, y0, x1, y1)).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        assert torch.equal(_pixels(out.crop((a0, b0, a1, b1))), before)
    assert [_color_bbox(_pixels(out), c) for c in COLORS] == t["boxes"].tolist()


def test_crop_shifts_clips_and_drops_boxes():
    img, target = _painted()
    out, t = crop(img, target, top=20, left=50, height=60, width=60)  # box 1 is outside, 2 and 3 are clipped
    assert out.size == (60, 60) and t["size"].tolist() == [60, 60]
    assert t["labels"].tolist() == [2, 3] and t["boxes"].tolist() == [[10, 0, 60, 10], [0, 35, 45, 60]]
    pixels = _pixels(out)
    assert [_color_bbox(pixels, c) for c in COLORS] == [None] + t["boxes"].tolist()


def test_resize_keeps_boxes_on_their_objects():
    img, target = _painted()
    out, t = resize(img, target, 45, None)  # half size
    assert out.size == (60, 45) and torch.equal(t["boxes"], target["boxes"] / 2)
    for color, box in zip(COLORS, t["boxes"].tolist()):
        got = _color_bbox(_pixels(out), color)
        assert max(abs(a - b) for a, b in zip(got, box)) <= 1.0, (got, box)  # bilinear edges: one pixel


@pytest.mark.parametrize("seed", range(12))
def test_train_augmentation_keeps_boxes_on_their_objects(seed):
    """Flip, multi-scale resize and crop together: every returned box is the coloured rectangle of its label in
    the returned image (within the one pixel of bilinear resizing), and no visible object lost its box."""
    img, target = _painted()
    torch.manual_seed(seed)
    tensor, t = DetrTrainTransform(min_size=80, max_size=200)(img, target)
    h, w = tensor.shape[-2:]
    assert t["size"].tolist() == [h, w] and h <= 200 and w <= 200
    pixels = (tensor * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None])
    pixels = (pixels * 255).permute(1, 2, 0)
    cx, cy, bw, bh = (t["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    by_label = dict(zip(t["labels"].tolist(), boxes.tolist()))
    for label, color in enumerate(COLORS, start=1):
        seen = _color_bbox(pixels, color)
        if label not in by_label:  # cropped away (or to a sliver that resizing blurred away)
            assert seen is None or (seen[2] - seen[0]) * (seen[3] - seen[1]) <= 4, (label, seen)
            continue
        box = by_label[label]
        if (box[2] - box[0]) < 2 or (box[3] - box[1]) < 2:
            continue  # a clipped sliver: too thin to have a pixel of pure colour after resizing
        assert seen is not None and max(abs(a - b) for a, b in zip(seen, box)) <= 1.5, (label, seen, box)


def test_train_augmentation_at_800_is_the_official_recipe():
    aug = DetrTrainTransform(800, 1333)
    assert aug.scales == tuple(range(480, 801, 32)) and aug.crop_pre_scales == (400, 500, 600)
    assert aug.crop_range == (384, 600) and aug.max_size == 1333
    img, target = _painted(640, 480)  # multi-scale: the output size varies from draw to draw
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        sizes.add(tuple(aug(img, target)[1]["size"].tolist()))
    assert len(sizes) > 4

"""PASCAL VOC detection (``VOCdevkit/VOC20XX/{Annotations,JPEGImages,ImageSets/Main}``) as COCO-style data.

``voc_to_coco`` turns a split into a COCO dict (category ids 1..20 in ``VOC_CLASSES`` order, so a DETR uses
``num_classes = 21``); ``VocDetection`` is ``CocoDetection`` over that dict, so training and COCO evaluation
treat VOC and COCO the same way. ``difficult`` objects become ``iscrowd = 1``: ignored by the evaluation and
dropped from training targets, as the VOC protocol ignores them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from detr_ptq.data.coco import CocoDetection
from gmpq.errors import UserError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _parse_xml(path: Path) -> tuple[int, int, list[tuple[str, list[float], bool]]]:
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        w, h = int(size.find("width").text), int(size.find("height").text)
        objects = []
        for obj in root.findall("object"):
            bb = obj.find("bndbox")
            x0, y0, x1, y1 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult") is not None and obj.find("difficult").text.strip() == "1"
            # VOC boxes are 1-based inclusive pixel indices.
            objects.append((obj.find("name").text.strip(), [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1], difficult))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"VOC annotation {str(path)!r} is not a valid VOC XML file with size/object/bndbox "
                        f"entries ({type(e).__name__}: {e})") from None
    return w, h, objects


def voc_to_coco(voc_root: str | Path, split: str = "val") -> dict:
    """``voc_root`` = ``VOCdevkit/VOC2007`` (or 2012). -> COCO dict with image file names under JPEGImages."""
    root = Path(voc_root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        found = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise UserError(f"VOC split file {str(ids_file)!r} does not exist; splits found: {found}")
    cat_ids = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    images, annotations = [], []
    for idx, stem in enumerate(ids_file.read_text().split(), start=1):
        w, h, objects = _parse_xml(root / "Annotations" / f"{stem}.xml")
        images.append({"id": idx, "file_name": f"{stem}.jpg", "width": w, "height": h})
        for name, box, difficult in objects:
            if name not in cat_ids:
                raise UserError(f"VOC annotation {stem}.xml: class {name!r} is not one of {list(VOC_CLASSES)}")
            annotations.append({"id": len(annotations) + 1, "image_id": idx, "category_id": cat_ids[name],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(difficult)})
    categories = [{"id": i, "name": n} for n, i in cat_ids.items()]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


class VocDetection(CocoDetection):
    """``CocoDetection`` over ``voc_to_coco(voc_root, split)``; images from ``voc_root/JPEGImages``."""

    def __init__(self, voc_root: str | Path, split: str, transform) -> None:
        super().__init__(Path(voc_root) / "JPEGImages", voc_to_coco(voc_root, split), transform)

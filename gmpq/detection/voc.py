"""PASCAL VOC in the standard VOCdevkit layout::

    VOCdevkit/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{trainval,test}.txt}
    VOCdevkit/VOC2012/...

A split is named ``YEAR/SPLIT`` (e.g. ``VOC2007/test``). XML boxes are 1-based inclusive pixel indices; they become
continuous ``[xmin - 1, ymin - 1, xmax, ymax]``, so ``(x2 - x1)`` is the devkit's ``xmax - xmin + 1``. Labels are
``1 + index`` in ``class_names`` (the 20 VOC classes by default); ``difficult`` is kept per box.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from gmpq.detection.data import DetectionDataset, DetRecord, clean_boxes, image_size, warn_counts
from gmpq.errors import UserError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def parse_voc_xml(path: Path) -> tuple[int, int, list[tuple[str, list[float], bool]]]:
    """-> (width, height, [(class name, [x1, y1, x2, y2], difficult)]); width/height are 0 when absent."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise UserError(f"VOC annotation {str(path)!r} does not exist") from None
    except ET.ParseError as e:
        raise UserError(f"VOC annotation {str(path)!r} is not valid XML ({e})") from None
    size = root.find("size")
    try:
        w = int(float(size.findtext("width", "0"))) if size is not None else 0
        h = int(float(size.findtext("height", "0"))) if size is not None else 0
        objects = []
        for k, obj in enumerate(root.findall("object")):
            bb = obj.find("bndbox")
            if bb is None or obj.findtext("name") is None:
                raise ValueError(f"object {k} has no <name> or no <bndbox>")
            x0, y0, x1, y1 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            objects.append((obj.findtext("name").strip(), [x0 - 1, y0 - 1, x1, y1], difficult))
    except (TypeError, ValueError) as e:
        raise UserError(f"VOC annotation {str(path)!r}: expected <size><width>/<height> and objects with <name> and "
                        f"<bndbox> xmin/ymin/xmax/ymax numbers ({e})") from None
    return w, h, objects


def available_splits(root: Path) -> list[str]:
    return sorted(f"{p.parent.parent.parent.name}/{p.stem}" for p in root.glob("*/ImageSets/Main/*.txt")
                  if "_" not in p.stem)


def split_ids(root: Path, split: str) -> tuple[Path, list[str]]:
    """``VOCdevkit`` root and ``YEAR/SPLIT`` -> (year folder, image ids)."""
    year, _, name = split.partition("/")
    ids_file = root / year / "ImageSets" / "Main" / f"{name}.txt"
    if not name or not ids_file.is_file():
        raise UserError(f"VOC split {split!r}: {str(ids_file)!r} does not exist; splits found under {str(root)!r}: "
                        f"{available_splits(root)} (name them YEAR/SPLIT, e.g. VOC2007/test)")
    return root / year, ids_file.read_text().split()


def load_voc(root: str | Path, splits: list[str], class_names: list[str] | tuple[str, ...] = VOC_CLASSES,
             flip: bool = False, max_images: int | None = None) -> DetectionDataset:
    """Read every annotation of ``splits`` (e.g. ``["VOC2007/trainval", "VOC2012/trainval"]``) under ``root``.

    Missing annotation/image files and unknown class names raise one ``UserError`` listing them; boxes with zero
    area or outside the image are skipped (clipped when partly outside), counted and warned about.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"VOC root {str(root)!r} is not a folder (expected a VOCdevkit folder holding VOC2007/...)")
    label_of = {n: i + 1 for i, n in enumerate(class_names)}
    records, counts, examples = [], Counter(), []
    missing_xml, missing_img, unknown = [], [], defaultdict(list)
    for split in splits:
        year_dir, ids = split_ids(root, split)
        for stem in ids:
            if max_images is not None and len(records) >= max_images:
                break
            xml, img = year_dir / "Annotations" / f"{stem}.xml", year_dir / "JPEGImages" / f"{stem}.jpg"
            if not xml.is_file():
                missing_xml.append(str(xml))
                continue
            if not img.is_file():
                missing_img.append(str(img))
                continue
            w, h, objects = parse_voc_xml(xml)
            if w <= 0 or h <= 0:
                w, h = image_size(img)
            for name, _, _ in objects:
                if name not in label_of:
                    unknown[name].append(str(xml))
            objects = [o for o in objects if o[0] in label_of]
            boxes = np.array([o[1] for o in objects], dtype=np.float32).reshape(-1, 4)
            boxes, keep, c = clean_boxes(boxes, w, h)
            if c["zero_area"] + c["outside"] + c["clipped"]:
                examples.append(f"{year_dir.name}/{stem}")
            counts += c
            records.append(DetRecord(len(records) + 1, img, w, h, boxes[keep],
                                     np.array([label_of[o[0]] for o in objects], dtype=np.int64).reshape(-1)[keep],
                                     np.array([o[2] for o in objects], dtype=bool).reshape(-1)[keep]))
    problems = []
    if missing_xml:
        problems.append(f"{len(missing_xml)} annotation file(s) listed in the split files do not exist: "
                        f"{missing_xml[:10]}")
    if missing_img:
        problems.append(f"{len(missing_img)} image file(s) do not exist: {missing_img[:10]}")
    if unknown:
        listed = {n: f"{len(f)} box(es), e.g. in {f[0]}" for n, f in unknown.items()}
        problems.append(f"unknown class name(s) {listed}; accepted class names: {list(class_names)} "
                        "(set data.classes to use other names)")
    if problems:
        raise UserError(f"VOC data {str(root)!r} splits {splits}:\n  - " + "\n  - ".join(problems))
    if not records:
        raise UserError(f"VOC data {str(root)!r} splits {splits} hold no images")
    warn_counts(counts, f"VOC data {str(root)!r} {splits}", examples)
    stats = {"images": len(records), "boxes": int(sum(len(r.boxes) for r in records)),
             "difficult": int(sum(r.difficult.sum() for r in records)), **{f"boxes_{k}": v for k, v in counts.items()}}
    return DetectionDataset(records, list(class_names), flip, stats, {"format": "voc", "splits": list(splits)})

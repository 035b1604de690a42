"""VOC reader: a tiny VOCdevkit written by the tests (real JPEG files and XML), bad input, box cleaning."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmpq.detection.data import clean_boxes
from gmpq.detection.datasets import parse_data_arg
from gmpq.detection.voc import VOC_CLASSES, load_voc
from gmpq.errors import UserError

COLORS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "car": (40, 40, 220)}


def _xml(stem: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def write_tiny_voc(root: Path, n_train: int = 6, n_test: int = 4, size: tuple[int, int] = (128, 96),
                   seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2007`` with ``trainval``/``test`` splits: JPEG images of coloured rectangles (one to two
    objects of the classes cat/dog/car, VOC 1-based inclusive boxes); every third test image has a difficult box."""
    rng = np.random.default_rng(seed)
    year = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year / d).mkdir(parents=True, exist_ok=True)
    w, h = size
    splits = {"trainval": [f"{i:06d}" for i in range(n_train)],
              "test": [f"{i:06d}" for i in range(n_train, n_train + n_test)]}
    for split, stems in splits.items():
        for k, stem in enumerate(stems):
            img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
            objects = []
            for j in range(1 + k % 2):
                name = list(COLORS)[(k + j) % 3]
                bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
                x0 = int(rng.integers(1, w - bw)) if j == 0 else max(1, w - bw - 2)
                y0 = int(rng.integers(1, h - bh))
                img[y0 - 1:y0 - 1 + bh, x0 - 1:x0 - 1 + bw] = COLORS[name]
                difficult = int(split == "test" and k % 3 == 2 and j == 0)
                objects.append((name, (x0, y0, x0 + bw - 1, y0 + bh - 1), difficult))
            Image.fromarray(img).save(year / "JPEGImages" / f"{stem}.jpg", quality=95)
            (year / "Annotations" / f"{stem}.xml").write_text(_xml(stem, w, h, objects))
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root / "VOCdevkit"


def test_tiny_voc_loads_with_devkit_coordinates(tmp_path):
    root = write_tiny_voc(tmp_path)
    ds = load_voc(root, ["VOC2007/trainval"])
    assert len(ds) == 6 and ds.num_boxes() == 9 and ds.stats["boxes"] == 9
    x, t = ds[0]
    assert x.shape == (3, 96, 128) and 0 <= float(x.min()) and float(x.max()) <= 1
    xml = (root / "VOC2007/Annotations/000000.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    xmax = int(xml.split("<xmax>")[1].split("<")[0])
    assert float(t["boxes"][0, 0]) == xmin - 1 and float(t["boxes"][0, 2]) == xmax  # width = xmax - xmin + 1
    assert t["labels"].dtype.is_floating_point is False and set(t["labels"].tolist()) <= {8, 12, 7}  # cat dog car
    test = load_voc(root, ["VOC2007/test"])
    assert int(sum(r.difficult.sum() for r in test.records)) == 1
    assert parse_data_arg(str(root)) == {"format": "voc", "root": str(root)}


def test_flip_mirrors_boxes(tmp_path):
    root = write_tiny_voc(tmp_path, n_train=2, n_test=1)
    ds = load_voc(root, ["VOC2007/trainval"], flip=True)
    rec = ds.records[0]
    seen = set()
    for _ in range(20):
        x, t = ds[0]
        b = t["boxes"][0].numpy()
        flipped = not np.allclose(b, rec.boxes[0])
        if flipped:
            np.testing.assert_allclose(b, [rec.width - rec.boxes[0, 2], rec.boxes[0, 1],
                                           rec.width - rec.boxes[0, 0], rec.boxes[0, 3]])
        seen.add(flipped)
    assert seen == {True, False}


def test_clean_boxes_counts():
    boxes = np.array([[10, 10, 20, 20],  # fine
                      [5, 5, 5, 30],  # zero width
                      [200, 10, 220, 20],  # right of a 100-wide image
                      [-5, 90, 30, 120],  # partly outside: clipped
                      [30, 20, 10, 40]], dtype=np.float32)  # x2 < x1
    out, keep, counts = clean_boxes(boxes, 100, 100)
    assert keep.tolist() == [True, False, False, True, False]
    assert counts == {"zero_area": 2, "outside": 1, "clipped": 1}
    np.testing.assert_array_equal(out[3], [0, 90, 30, 100])


def test_bad_boxes_are_skipped_counted_and_warned(tmp_path):
    root = write_tiny_voc(tmp_path, n_train=2, n_test=1)
    ann = root / "VOC2007/Annotations/000000.xml"
    # xmax = xmin - 1 is zero width in 1-based inclusive coordinates (xmax = xmin is one pixel wide)
    objs = [("cat", (10, 10, 40, 40), 0), ("dog", (20, 20, 19, 50), 0), ("car", (300, 10, 320, 30), 0)]
    ann.write_text(_xml("000000", 128, 96, objs))
    with pytest.warns(UserWarning, match=r"skipped 2 box\(es\) \(1 with zero area, 1 outside the image\)"):
        ds = load_voc(root, ["VOC2007/trainval"])
    assert ds.stats["boxes_zero_area"] == 1 and ds.stats["boxes_outside"] == 1
    assert len(ds.records[0].boxes) == 1


def test_bad_input_messages(tmp_path):
    root = write_tiny_voc(tmp_path, n_train=3, n_test=1)
    year = root / "VOC2007"
    with pytest.raises(UserError, match=r"splits found .*'VOC2007/test', 'VOC2007/trainval'"):
        load_voc(root, ["VOC2012/trainval"])
    (year / "Annotations/000001.xml").unlink()
    with pytest.raises(UserError, match=r"1 annotation file\(s\) .* do not exist: .*000001.xml"):
        load_voc(root, ["VOC2007/trainval"])
    write_tiny_voc(tmp_path, n_train=3, n_test=1)
    (year / "Annotations/000002.xml").write_text(_xml("000002", 128, 96, [("unicorn", (1, 1, 9, 9), 0)]))
    with pytest.raises(UserError, match=r"unknown class name\(s\) \{'unicorn'.*accepted class names: \['aeroplane'"):
        load_voc(root, ["VOC2007/trainval"])
    (year / "Annotations/000002.xml").write_text("<annotation><size>")
    with pytest.raises(UserError, match=r"000002.xml' is not valid XML"):
        load_voc(root, ["VOC2007/trainval"])
    write_tiny_voc(tmp_path, n_train=3, n_test=1)
    (year / "JPEGImages/000001.jpg").write_bytes(b"not a jpeg")
    ds = load_voc(root, ["VOC2007/trainval"])
    with pytest.raises(UserError, match=r"000001.jpg' cannot be decoded"):
        ds[1]
    with pytest.raises(UserError, match="expected voc:VOCDEVKIT_FOLDER"):
        parse_data_arg(str(tmp_path / "nowhere"))


def test_custom_class_list(tmp_path):
    root = write_tiny_voc(tmp_path, n_train=3, n_test=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_voc(root, ["VOC2007/trainval"], class_names=("cat", "dog", "car"))
    assert ds.class_names == ["cat", "dog", "car"]
    assert set(np.concatenate([r.labels for r in ds.records]).tolist()) <= {1, 2, 3}
    assert "cat" in VOC_CLASSES

"""Datasets: counts, shapes, normalization, augmentation invariants, seeded subsets, and every error message."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from gmpq.config import load_config
from gmpq.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    DataConfig,
    balanced_subset_indices,
    build_dataset,
    build_loaders,
    list_datasets,
)
from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.errors import UserError

# ----- digits (embedded in scikit-learn) -----


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def test_digits_counts_shapes_and_fixed_split():
    train, test = build_dataset(DataConfig(), "train"), build_dataset(DataConfig(), "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.num_classes == 10 and train.classes == [str(d) for d in range(10)]
    x, y = test[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    # the split does not depend on the run seed; every class is in the test set (stratified)
    other = build_dataset(DataConfig(seed=123), "test")
    torch.testing.assert_close(_stack(other)[0], _stack(test)[0], rtol=0, atol=0)
    assert torch.bincount(test.targets).min() >= 35


def test_digits_normalization():
    # at the native 8x8 size the pixels are the raw 0..16 values / 16, normalized by the dataset's mean/std
    x, _ = _stack(build_dataset(DataConfig(image_size=8, augment=False), "train"))
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.03
    raw = x * DIGITS_STD[0] + DIGITS_MEAN[0]
    torch.testing.assert_close(raw * 16, (raw * 16).round(), rtol=0, atol=1e-4)  # integer levels 0..16
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6


def _shift(img: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """[C, H, W] moved by (dy, dx) pixels, uncovered pixels set to ``fill``."""
    c, h, w = img.shape
    out = torch.full_like(img, fill)
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[:, max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


def _matches_shift(aug: torch.Tensor, plain: torch.Tensor, pad: int, fill: torch.Tensor, flips: bool) -> bool:
    candidates = [plain, plain.flip(-1)] if flips else [plain]
    fill = fill.view(-1, 1, 1)
    for base in candidates:
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                shifted = _shift(base, dy, dx, 0.0)
                mask = _shift(torch.ones_like(base), dy, dx, 0.0).bool()
                expected = torch.where(mask, shifted, fill.expand_as(base))
                if torch.allclose(aug, expected, atol=1e-5):
                    return True
    return False


def test_digits_augmentation_is_shifts_only():
    aug = build_dataset(DataConfig(), "train")
    plain = build_dataset(DataConfig(augment=False), "train")
    zero = torch.tensor([(0 - DIGITS_MEAN[0]) / DIGITS_STD[0]])  # black padding, normalized
    pairs = [(aug[i][0], plain[i][0]) for i in range(12)]
    # every augmented image is a pure shift of at most 2 px (a flipped glyph would match no shift)
    assert all(_matches_shift(a, p, pad=2, fill=zero, flips=False) for a, p in pairs)
    assert any(not torch.equal(a, p) for a, p in pairs)  # and augmentation does happen


def test_eval_transform_is_deterministic():
    ds = build_dataset(DataConfig(), "train", train_transform=False)
    torch.testing.assert_close(ds[5][0], ds[5][0], rtol=0, atol=0)


# ----- subsets and loaders -----


def test_balanced_subset_indices():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    idx = balanced_subset_indices(targets, 12, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == 12
    assert torch.bincount(targets[idx]).tolist() == [4, 4, 4]
    assert balanced_subset_indices(targets, 12, seed=0) == idx
    assert balanced_subset_indices(targets, 12, seed=1) != idx
    # a class with too few images gives what it has; the rest comes from the others
    assert torch.bincount(targets[balanced_subset_indices(targets, 30, seed=0)]).tolist() == [13, 12, 5]


def test_subsets_are_deterministic_by_seed_and_balanced():
    def pick(seed):
        cfg = DataConfig(train_subset=50, test_subset=20, seed=seed, augment=False)
        return build_dataset(cfg, "train"), build_dataset(cfg, "test")

    (a, at), (b, _), (c, _) = pick(0), pick(0), pick(1)
    assert (len(a), len(at)) == (50, 20)
    assert a.indices == b.indices and a.indices != c.indices
    assert torch.bincount(a.targets).tolist() == [5] * 10 and torch.bincount(at.targets).tolist() == [2] * 10
    assert a.num_classes == 10 and a.classes == [str(d) for d in range(10)]
    torch.testing.assert_close(a[3][0], b[3][0], rtol=0, atol=0)


def test_loaders_shuffle_by_seed():
    def first_labels(seed):
        train, test = build_loaders(DataConfig(batch_size=16, eval_batch_size=32, seed=seed))
        return next(iter(train))[1], next(iter(test))[1]

    (a, ta), (b, tb), (c, _) = first_labels(0), first_labels(0), first_labels(1)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(ta, tb)
    x, _ = next(iter(build_loaders(DataConfig(batch_size=16))[0]))
    assert x.shape == (16, 1, 16, 16)


def test_distributed_loaders_use_distributed_sampler(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train, test = build_loaders(DataConfig(train_subset=40, test_subset=20), distributed=True)
    finally:
        dist.destroy_process_group()
    assert isinstance(train.sampler, torch.utils.data.DistributedSampler) and train.sampler.shuffle
    assert isinstance(test.sampler, torch.utils.data.DistributedSampler) and not test.sampler.shuffle
    assert len(train.sampler) == 40 and len(test.sampler) == 20


# ----- CIFAR on the real shared data -----


@pytest.mark.shared_data
def test_cifar10_npz_and_jpeg(shared_data):
    cfg = DataConfig(name="cifar10_npz", root=str(shared_data / "cifar10"), augment=False)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (5085, 1017)
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and train.num_classes == 10
    x, y = test[0]
    raw = np.load(shared_data / "cifar10" / "cifar10_original_subset.npz")
    pixels = torch.from_numpy(raw["x_test"][0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x * std + mean, pixels, rtol=0, atol=1e-5)
    assert y == int(raw["y_test"][0])
    jpeg = build_dataset(DataConfig(name="cifar10_jpeg", root="${GMPQ_DATA}/cifar10"), "test")
    assert len(jpeg) == 10000 and jpeg[0][0].shape == (3, 32, 32)


@pytest.mark.shared_data
def test_cifar_augmentation_is_crop_and_flip(shared_data):
    cfg = DataConfig(name="cifar10_npz", root=str(shared_data / "cifar10"), train_subset=20)
    aug, plain = build_dataset(cfg, "train"), build_dataset(cfg, "train", train_transform=False)
    black = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    pairs = [(aug[i][0], plain[i][0]) for i in range(6)]
    assert all(_matches_shift(a, p, pad=4, fill=black, flips=True) for a, p in pairs)
    assert any(not torch.equal(a, p) for a, p in pairs)


@pytest.mark.shared_data
def test_train_on_npz_test_on_jpeg(shared_data):
    cfg = load_config(DataConfig, None, ["name=cifar10_npz", "root=${GMPQ_DATA}/cifar10", "test_name=cifar10_jpeg",
                                         "test_subset=100"])
    train, test = build_loaders(cfg)
    assert len(train.dataset) == 5085 and len(test.dataset) == 100
    assert torch.bincount(test.dataset.targets).tolist() == [10] * 10


def test_cifar_npz_errors(tmp_path):
    with pytest.raises(UserError, match="cifar10_original_subset.npz") as e:
        build_dataset(DataConfig(name="cifar10_npz", root=str(tmp_path)), "train")
    assert "does not exist" in str(e.value)
    np.savez(tmp_path / "cifar10_original_subset.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(name="cifar10_npz", root=str(tmp_path)), "train")
    assert "lacks arrays ['y_train']" in str(e.value) and "['x_train']" in str(e.value)
    with pytest.raises(UserError, match="only a test split"):
        build_dataset(DataConfig(name="cifar10_jpeg", root=str(tmp_path)), "train")
    with pytest.raises(UserError, match="image_size=64"):
        build_dataset(DataConfig(name="cifar10_npz", root=str(tmp_path), image_size=64), "train")


# ----- the official CIFAR-10 python folder, faked in its pickle format -----


def _write_fake_cifar(folder, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, fh)
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, fh)
    return written


def test_cifar10_python_folder(tmp_path):
    written = _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        cfg = DataConfig(name="cifar10", root=str(root), augment=False)
        train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
        assert (len(train), len(test)) == (20, 4) and train.classes[9] == "truck"
    data, labels = written["data_batch_2"]
    x, y = train[5]  # batch 2, image 1: rows are R plane, G plane, B plane of 32x32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(x * std + mean, expected, rtol=0, atol=1e-5)
    assert y == labels[1]


def test_cifar10_python_folder_missing(tmp_path):
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    msg = str(e.value)
    assert "cifar-10-batches-py/{data_batch_1..5,test_batch}" in msg and "data_batch_1" in msg
    assert str(tmp_path) in msg
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="is not a CIFAR-10 python batch"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")


# ----- ImageFolder -----


def _write_images(folder, classes, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog"], 3)
    _write_images(tmp_path / "val", ["cat", "dog"], 2)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, batch_size=2)
    train, test = build_loaders(cfg)
    assert len(train.dataset) == 6 and len(test.dataset) == 4
    assert test.dataset.classes == ["cat", "dog"] and test.dataset.num_classes == 2
    x, y = next(iter(test))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    assert next(iter(train))[0].shape == (2, 3, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="needs data.root"):
        build_dataset(DataConfig(name="imagefolder"), "train")
    _write_images(tmp_path / "train", ["cat", "dog", "emu"], 1)
    with pytest.raises(UserError, match=r"lacks folder\(s\) \['val'\]"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), "train")
    _write_images(tmp_path / "val", ["cat", "dog", "fox"], 1)
    with pytest.raises(UserError) as e:
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), "test")
    assert "only in train: ['emu'], only in val: ['fox']" in str(e.value)
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "cat").mkdir(parents=True)
        (empty / split / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images in") as e:
        build_dataset(DataConfig(name="imagefolder", root=str(empty)), "train")
    assert ".png" in str(e.value)


def _write_gray(folder, classes, per_class: int = 2) -> None:
    rng = np.random.default_rng(1)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(folder / c / f"{i}.png")


def test_imagefolder_channels_grayscale_and_conversions(tmp_path):
    """Grayscale images stay 1 channel (normalized with the mean ImageNet statistics); channels=3 replicates the
    gray level on three channels; channels=1 turns RGB images into PIL's luma."""
    for split in ("train", "val"):
        _write_gray(tmp_path / "gray" / split, ["a", "b"])
        _write_images(tmp_path / "rgb" / split, ["a", "b"])
    gray = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "gray"), image_size=16), "test")
    assert gray.channels == 1
    x, _ = gray[0]
    raw = torch.from_numpy(np.asarray(Image.open(tmp_path / "gray" / "val" / "a" / "0.png"), dtype=np.float32))
    assert x.shape == (1, 16, 16)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    pixels = x * std + mean  # back to [0, 1]: the resized gray image
    assert 0 <= pixels.min() and pixels.max() <= 1 and abs(pixels.mean() - raw.mean() / 255) < 0.02
    as_rgb = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "gray"), image_size=16, channels=3),
                           "test")[0][0]
    back = [as_rgb[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]
    assert torch.allclose(back[0], pixels[0], atol=1e-5) and torch.allclose(back[2], pixels[0], atol=1e-5)
    rgb = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "rgb"), image_size=16), "test")
    assert rgb.channels == 3 and rgb[0][0].shape == (3, 16, 16)
    as_gray = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "rgb"), image_size=16, channels=1),
                            "test")
    assert as_gray[0][0].shape == (1, 16, 16)
    with pytest.raises(UserError, match=r"dataset 'digits': data.channels=3 is not supported; its images have 1"):
        build_dataset(DataConfig(name="digits", channels=3), "test")
    with pytest.raises(UserError, match=r"data.channels=2 is not supported; accepted: 1, 3"):
        DataConfig(channels=2)


def test_imagefolder_corrupt_image_is_named(tmp_path):
    for split in ("train", "val"):
        _write_images(tmp_path / split, ["a", "b"])
    (tmp_path / "val" / "b" / "9.png").write_bytes(b"\x89PNG truncated")
    ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16), "test")
    with pytest.raises(UserError, match=r"image '.*val/b/9\.png' cannot be decoded"):
        [ds[i] for i in range(len(ds))]


def test_labels_out_of_range_and_one_class_are_refused(tmp_path):
    x = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 10, -1])
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(UserError, match=r"dataset 'cifar10_npz' at '.*bad\.npz' \(train split\) has 2 label\(s\) "
                                        r"outside 0\.\.9 .*\[-1, 10\]"):
        build_dataset(DataConfig(name="cifar10_npz", root=str(tmp_path / "bad.npz")), "train")
    np.savez(tmp_path / "one.npz", x_train=x, y_train=np.zeros(6), x_test=x, y_test=np.zeros(6),
             classes=np.array(["cat"]))
    with pytest.raises(UserError, match=r"has 1 class\(es\) \['cat'\]; a classifier needs at least 2"):
        build_dataset(DataConfig(name="cifar10_npz", root=str(tmp_path / "one.npz")), "test")


def test_dataset_must_fit_the_model():
    from gmpq.data import check_dataset_for_model
    from gmpq.models import model_spec

    digits = build_dataset(DataConfig(name="digits"), "test")
    check_dataset_for_model(digits, model_spec("small_cnn"), None, "digits")  # fits: no error
    with pytest.raises(UserError) as e:
        check_dataset_for_model(digits, model_spec("resnet20"), 100, "--data 'digits'")
    msg = str(e.value)
    assert "--data 'digits' does not fit the model" in msg
    assert "1 channel(s) but model 'resnet20' takes 3" in msg and "10 classes but the model has 100 outputs" in msg


# ----- config errors -----


def test_unknown_dataset_lists_names():
    with pytest.raises(UserError) as e:
        DataConfig(name="mnist")
    for name in list_datasets():
        assert name in str(e.value)
    assert set(list_datasets()) == {"digits", "cifar10", "cifar10_npz", "cifar10_jpeg", "imagefolder"}
    with pytest.raises(UserError, match="data.test_name='svhn'"):
        load_config(DataConfig, None, ["test_name=svhn"])
    with pytest.raises(UserError, match="batch_size=0"):
        DataConfig(batch_size=0)
    with pytest.raises(UserError, match="split='val'"):
        build_dataset(DataConfig(), "val")

"""Model registry: every model builds and its spec is true; weight loading errors; pretrained CIFAR ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmpq.data import DataConfig, build_dataset
from gmpq.errors import UserError
from gmpq.models import create_model, list_models, load_weights, model_spec
from gmpq.models.cifar_resnet import CifarResNet

RESNET20 = "cifar_resnets/resnet20-12fca82f.th"
RESNET32 = "cifar_resnets/resnet32-d509ac18.th"


@pytest.mark.parametrize("name", list_models())
def test_model_builds_and_spec_is_true(name):
    spec = model_spec(name)
    model = create_model(name, num_classes=7).eval()
    modules = dict(model.named_modules())
    assert isinstance(modules[spec.first_layer], nn.Conv2d)
    assert modules[spec.first_layer].in_channels == spec.input_size[0]
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert spec.first_layer == first_conv
    assert isinstance(modules[spec.classifier], nn.Linear)
    assert modules[spec.classifier].out_features == 7
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert spec.classifier == last_linear

    captured = {}
    modules[spec.feature_layer].register_forward_hook(lambda m, i, o: captured.update(fmap=o))
    batch = 1 if spec.input_size[1] >= 224 else 3
    x = torch.randn(batch, *spec.input_size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (batch, 7)
    fmap = captured["fmap"]
    assert fmap.ndim == 4 and fmap.shape[0] == batch and fmap.shape[-1] > 1  # a spatial map, not pooled
    if spec.head == "gap_linear":  # closed-form CAM: logits are the classifier applied to the pooled map
        with torch.no_grad():
            expected = modules[spec.classifier](fmap.mean(dim=(2, 3)))
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_default_num_classes_comes_from_spec():
    assert create_model("resnet20").linear.out_features == model_spec("resnet20").num_classes == 10


def test_unknown_model_lists_registered_names():
    with pytest.raises(UserError) as e:
        create_model("resnet21")
    for name in list_models():
        assert name in str(e.value)
    with pytest.raises(UserError, match="resnet20"):
        model_spec("nope")


def test_bad_num_classes():
    with pytest.raises(UserError, match="num_classes"):
        create_model("small_cnn", num_classes=0)


def test_small_cnn_size():
    n = sum(p.numel() for p in create_model("small_cnn").parameters())
    assert 20_000 <= n <= 60_000


def test_cifar_resnet_depths_and_parameter_free_shortcuts():
    for depth, blocks in ((20, 3), (32, 5), (44, 7), (56, 9)):
        model = create_model(f"resnet{depth}")
        assert len(model.layer1) == len(model.layer2) == len(model.layer3) == blocks
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == depth - 1  # depth counts the convs plus the final linear
    # option A: a downsampling block has exactly the parameters of its two convs and BNs
    block = create_model("resnet20").layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


# ----- weight files -----

def _small_state() -> dict:
    return create_model("small_cnn").state_dict()


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix"])
def test_load_weights_formats(tmp_path, wrap):
    src = create_model("small_cnn")
    state = src.state_dict()
    if wrap == "module_prefix":
        state = {"module." + k: v for k, v in state.items()}
    obj = state if wrap in ("bare", "module_prefix") else {wrap: state, "epoch": 3}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    dst = create_model("small_cnn", weights=path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)


def test_load_weights_lists_every_mismatch_grouped(tmp_path):
    state = _small_state()
    del state["conv1.conv.weight"], state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["fc.weight"] = torch.zeros(3, 64)
    state["conv5.bn.weight"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        load_weights(create_model("small_cnn"), path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (2): conv1.conv.weight, fc.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatches (2)" in msg
    assert "fc.weight: checkpoint (3, 64) vs model (10, 64)" in msg
    assert "conv5.bn.weight: checkpoint (5,) vs model (64,)" in msg


def test_load_weights_non_strict_reports_and_loads_the_rest(tmp_path):
    src = create_model("small_cnn", num_classes=3)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = create_model("small_cnn", num_classes=10)
    report = load_weights(dst, path, strict=False)
    assert report["missing"] == [] and report["unexpected"] == []
    assert [r.split(":")[0] for r in report["shape_mismatch"]] == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(dst.conv1.conv.weight, src.conv1.conv.weight, rtol=0, atol=0)


def test_load_weights_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        load_weights(create_model("small_cnn"), tmp_path / "nope.pth")
    assert "nope.pth" in str(e.value)
    for name, content in (("text.pth", b"this is not a checkpoint\n"), ("cut.pth", b"PK\x03\x04garbage")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError, match="not a readable PyTorch checkpoint") as e:
            load_weights(create_model("small_cnn"), path)
        assert name in str(e.value)
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="holds no state dict"):
        load_weights(create_model("small_cnn"), path)


# ----- pretrained CIFAR ResNets on the real lossless test images -----

def _accuracy(model: nn.Module, shared_data, test_subset: int | None = None) -> float:
    cfg = DataConfig(name="cifar10_npz", root=str(shared_data / "cifar10"), augment=False, test_subset=test_subset)
    ds = build_dataset(cfg, "test")
    loader = torch.utils.data.DataLoader(ds, batch_size=512)
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(ds)


@pytest.mark.shared_data
def test_pretrained_resnet20_accuracy(shared_data):
    model = create_model("resnet20", weights=shared_data / RESNET20).eval()
    acc = _accuracy(model, shared_data)
    assert acc > 0.90  # reference: 91.6 % (932 / 1017)


@pytest.mark.shared_data
def test_pretrained_resnet32_loads(shared_data):
    model = create_model("resnet32", weights=shared_data / RESNET32).eval()
    assert isinstance(model, CifarResNet) and len(model.layer1) == 5
    assert _accuracy(model, shared_data, test_subset=300) > 0.88  # 92.8 % on all 1,017


@pytest.mark.shared_data
def test_resnet20_weights_do_not_fit_resnet32(shared_data):
    with pytest.raises(UserError) as e:
        create_model("resnet32", weights=shared_data / RESNET20)
    msg = str(e.value)
    assert "missing keys (60)" in msg and "layer1.4.conv1.weight" in msg and "layer3.3.bn2.running_var" in msg
    assert "unexpected keys" not in msg and "shape mismatches" not in msg


def test_small_cnn_learns_digits():
    """The quickstart model reaches > 95 % on the digits test split after a few epochs (97.8 % after 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: extra threads only add overhead on a shared 2-core CI runner
    try:
        acc = _train_small_cnn_on_digits(epochs=4)
    finally:
        torch.set_num_threads(threads)
    assert acc > 0.95


def _train_small_cnn_on_digits(epochs: int) -> float:
    from gmpq.data import build_loaders

    train, test = build_loaders(DataConfig(name="digits", batch_size=64))
    model = create_model("small_cnn")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * len(train))
    model.train()
    for _ in range(epochs):
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    return correct / len(test.dataset)


@pytest.mark.shared_data
def test_imagenet_mobilenetv2_tf_padding_loads_strictly_and_matters(shared_data, one_thread):
    """The ImageNet MobileNetV2 loads strictly into ``mobilenetv2`` (torchvision names), and its TF 'SAME' padding
    is what the weights expect: on 64 validation images the padded network beats the symmetric one."""
    import torchvision
    from PIL import Image
    from torchvision import transforms as T

    weights = shared_data / "imagenet" / "mobilenet_v2_imagenet.pth"
    tf_model = create_model("mobilenetv2", weights=weights).eval()
    assert set(tf_model.state_dict()) == set(torchvision.models.mobilenet_v2().state_dict())
    sym = torchvision.models.mobilenet_v2(num_classes=1000).eval()
    sym.load_state_dict(torch.load(weights, weights_only=True))
    root = shared_data / "imagenet" / "val_1300"
    rows = [ln.split() for ln in (root / "labels.txt").read_text().splitlines()][:64]
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.open(root / "images" / f).convert("RGB")) for f, _ in rows])
    y = torch.tensor([int(c) for _, c in rows])
    with torch.no_grad():
        acc_tf = (tf_model(x).argmax(1) == y).float().mean().item()
        acc_sym = (sym(x).argmax(1) == y).float().mean().item()
    assert acc_tf > acc_sym

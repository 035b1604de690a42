"""Shared fixtures. Tests that need ../shared/data read it from $GMPQ_DATA: they skip with a reason when it
is unset, and fail instead of skipping when CI=true (CI must never skip them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _shared_data() -> Path | None:
    root = os.environ.get("GMPQ_DATA")
    if root and Path(root).is_dir():
        return Path(root)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = _shared_data()
    if root is None:
        msg = "GMPQ_DATA is unset or not a folder: set it to ../shared/data to run tests on real data"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " (CI must not skip these tests)")
        pytest.skip(msg)
    return root


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Pin torch to one thread: small models run faster, and much faster on a loaded 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def train_digits_cnn():
    """``fn(epochs) -> small_cnn`` trained in float on scikit-learn's digits (Adam 3e-3, batch 64, seed 0): the
    deployment starting point of the deploy and export tests."""
    from torch import nn

    from gmpq.data import DataConfig, build_loaders
    from gmpq.models import create_model

    def train(epochs: int) -> nn.Module:
        torch.manual_seed(0)
        model = create_model("small_cnn")
        loader, _ = build_loaders(DataConfig(name="digits", batch_size=64))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return model

    return train

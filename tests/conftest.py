"""Shared fixtures: hand-weighted and seeded tiny models, real photos, side-effect checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

os.environ.setdefault("CONVSCOPE_OFFLINE", "1")  # tests never touch the network


def shapes_folder(root: Path, *, per_class: int = 12, rgb: bool = False) -> Path:
    """Three classes (bars, blobs, frames) of synthetic 28x28 grey images, a sub-folder each; with
    ``rgb`` tinted 56x56 colour images instead (photos for a 1-channel model to convert)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for label, name in enumerate(["bars", "blobs", "frames"]):
        for i in range(per_class):
            image = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            if label == 0:
                image[:, 4 + i % 5 :: 7] = 255
            elif label == 1:
                image[8:20, 8:20] = 220
            else:
                image[2:26, 2:5] = image[2:26, 23:26] = 255
            (root / name).mkdir(parents=True, exist_ok=True)
            if rgb:
                tint = np.array([1.0, 0.3 + 0.2 * label, 0.6], dtype=np.float32)
                colour = (image[..., None].astype(np.float32) * tint).astype(np.uint8)
                Image.fromarray(np.repeat(np.repeat(colour, 2, 0), 2, 1), "RGB").save(root / name / f"{i}.png")
            else:
                Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def skimage_photo(name: str) -> Path:
    import skimage

    return Path(skimage.data_dir) / name


def grace_hopper_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """scikit-image's Chelsea the cat (451x300 RGB)."""
    return Image.open(skimage_photo("chelsea.png")).convert("RGB")


@pytest.fixture(scope="session")
def coffee() -> Image.Image:
    return Image.open(skimage_photo("coffee.png")).convert("RGB")


@pytest.fixture(scope="session")
def default_model():
    """The pretrained EfficientNet-Lite0 (offline weights package), shared across tests."""
    from convscope.models.load import load_model

    return load_model()


class HandSet(nn.Module):
    """1 -> 2 channel 3x3 conv with all-ones kernels and biases (0, -1), then ReLU and 2x2 max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=True)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.copy_(torch.tensor([0.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x)))


@pytest.fixture
def tiny_handset() -> HandSet:
    return HandSet()


class TinyCNN(nn.Module):
    """Seeded; in-place ReLU, max-pool, and one ReLU module reused twice (like ResNet blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "forward_hooks": sum(len(m._forward_hooks) for m in model.modules()),
        "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
        "backward_hooks": sum(len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
                              for m in model.modules()),
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "forwards": [type(m).forward for m in model.modules()],
        "instance_forwards": [m.__dict__.get("forward") for m in model.modules()],
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def assert_no_side_effects() -> Callable[..., Any]:
    """``assert_no_side_effects(model, fn)``: run ``fn`` (which may raise) and check that hooks,
    modes, requires_grad, .grad, forwards and weights are exactly as before."""

    def check(model: nn.Module, fn: Callable[[], Any]) -> Any:
        before = _state(model)
        result = None
        try:
            result = fn()
        finally:
            after = _state(model)
            for key in before:
                assert _same(before[key], after[key]), f"{key} changed"
        return result

    return check


@pytest.fixture(scope="session")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real ``convscope serve`` (default model) on a free port, with its own TMPDIR.

    Yields ``(base_url, tmpdir)``; shared by the API and browser tests.
    """
    from web_server import running_server

    folder = tmp_path_factory.mktemp("web")
    tmpdir = folder / "tmp"
    tmpdir.mkdir()
    with running_server(env={"TMPDIR": str(tmpdir)}, log=folder / "server.log") as base:
        yield base, tmpdir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut, run a mutant's tests fastest first (its recorded durations).

    mutmut hands each mutant the set of tests that reach the mutated function, in no particular
    order, and stops at the first failure (``-x``). A mutant a quick test kills then costs that test
    rather than whichever slow test happened to come first. Ordinary runs are left alone.
    """
    import sys

    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    state = sys.modules.get("mutmut.state")
    durations: dict[str, float] = state.state().duration_by_test if state is not None else {}
    if durations:
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))


def recalibrated(module: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics re-estimated on ``images`` (cumulative average), then eval
    mode: untouched random weights give maps near 1e-15 that no peer comparison can use."""
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None
    module.train()
    with torch.no_grad():
        module(images)
    return module.eval()

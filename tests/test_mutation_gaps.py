"""Tests for the bugs mutation testing showed no test would catch (issue 14).

Each test uses the input that tells the right code from the mutant: a dilated kernel, an
asymmetric pad, a span the stride divides exactly, unequal mean and std, a large k, a chain
long enough to reach the cut-off. The values are worked out by hand in the comments.
"""

from __future__ import annotations

import torch
from torch import nn

from convscope.methods import _incremental as inc
from convscope.methods.occlusion import grid_origins, occlusion
from convscope.methods.predict import classify
from convscope.models.load import wrap_model
from convscope.preprocess import IMAGENET, Preprocess
from convscope.probes.geometry import Geometry, trace


def _last_geometry(model: nn.Module, size: int) -> Geometry:
    return trace(model, torch.zeros(1, 1, size, size))[-1].geometry


def test_dilated_conv_receptive_field() -> None:
    # k=3, d=2: effective kernel 2*(3-1)+1 = 5 -> size 1 + 4 = 5; jump 1;
    # start 0.5 + ((5 - 1)/2 - 2) * 1 = 0.5 (padding 2 keeps the grid centred).
    geo = _last_geometry(nn.Conv2d(1, 1, 3, dilation=2, padding=2), 12)
    assert (geo.size, geo.jump, geo.start, geo.exact) == (5.0, 1.0, 0.5, True)


def test_dilated_conv_after_stride_scales_by_jump() -> None:
    # conv 2/2 -> size 2, jump 2, start 1.0; then dilated 3x3 (k'=5), pad 0:
    # size 2 + 4*2 = 10, jump 2, start 1.0 + (2 - 0) * 2 = 5.0.
    model = nn.Sequential(nn.Conv2d(1, 1, 2, stride=2), nn.Conv2d(1, 1, 3, dilation=2))
    geo = _last_geometry(model, 16)
    assert (geo.size, geo.jump, geo.start) == (10.0, 2.0, 5.0)


def test_asymmetric_zero_pad_uses_top_entry() -> None:
    # ZeroPad2d((left=2, right=0, top=1, bottom=0)): start 0.5 - 1 = -0.5 along the height;
    # the 3x3 conv then adds (3 - 1)/2 = 1: start 0.5, size 3, jump 1.
    model = nn.Sequential(nn.ZeroPad2d((2, 0, 1, 0)), nn.Conv2d(1, 1, 3))
    calls = trace(model, torch.zeros(1, 1, 10, 10))
    assert calls[0].geometry.start == -0.5
    assert (calls[1].geometry.size, calls[1].geometry.jump, calls[1].geometry.start) == (3.0, 1.0, 0.5)


def test_cover_border_adds_no_window_when_the_stride_divides_the_span() -> None:
    # (224 - 16) / 8 = 26 exactly: the last window ends on the border already -> 27 positions.
    assert grid_origins(224, 16, 8, cover_border=True) == tuple(range(0, 209, 8))
    assert len(grid_origins(224, 16, 8, cover_border=True)) == 27
    assert grid_origins(12, 4, 4, cover_border=True) == (0, 4, 8)
    # A remainder still adds the clipped window: (13 - 4) / 4 = 2.25 -> 4 positions.
    assert grid_origins(13, 4, 4, cover_border=True) == (0, 4, 8, 12)


def test_preprocess_with_imagenet_stats_equals_torchvision(photo) -> None:
    from torchvision import transforms

    reference = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    assert IMAGENET.mean != IMAGENET.std  # a swap of the two must show
    expected = reference(photo).unsqueeze(0)
    got = IMAGENET.to_tensor(photo)
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(IMAGENET.to_display(got), reference.transforms[2](reference.transforms[1](
        reference.transforms[0](photo))).unsqueeze(0), rtol=0, atol=1e-5)


def test_preprocess_grayscale_stats_per_channel() -> None:
    # One channel, mean 0.25, std 0.5: pixel 255 -> (1 - 0.25) / 0.5 = 1.5; pixel 0 -> -0.5.
    from PIL import Image

    pre = Preprocess(resize=None, crop=2, mean=(0.25,), std=(0.5,), channels=1)
    image = Image.new("L", (2, 2), 255)
    image.putpixel((0, 0), 0)
    torch.testing.assert_close(pre.to_tensor(image), torch.tensor([[[[-0.5, 1.5], [1.5, 1.5]]]]))


def test_classify_top50_is_sorted(default_model, photo) -> None:
    prediction = classify(default_model, photo, topk=50)[0]
    probabilities = prediction.probabilities
    assert probabilities.shape == (50,)
    assert bool((probabilities[:-1] >= probabilities[1:]).all()), probabilities
    # and the ranking is the full softmax's
    with torch.no_grad():
        logits = default_model.module(default_model.preprocess.to_tensor(photo).to(default_model.device))
    assert prediction.indices.tolist() == logits[0].argsort(descending=True)[:50].tolist()


class _ConvChain(nn.Module):
    """14 same-size 3x3 convolutions (+ReLU) on a 1x32x32 input, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(14):
            layers += [nn.Conv2d(2 if layers else 1, 2, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 32 * 32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_incremental_chain_stops_at_the_recompute_fraction() -> None:
    # Window 8, stride 8 on 32 px: four origins 0, 8, 16, 24. Each 3x3 convolution widens a
    # square's changed rows by one on each side, clipped at the map's edges. After k of them
    # the border squares change 8 + k rows; the inner ones 8 + 2k, or 16 + k once the edge
    # clips them (k >= 8). For k >= 8 the mean is 12 + k, and the mean changed area
    # (12 + k)^2 / 32^2 of the map:
    #   k = 12: 24^2 / 1024 = 0.5625 <= 0.6   k = 13: 25^2 / 1024 = 0.610 > 0.6
    # So the chain holds conv 1..12 and their ReLUs (features.0..23) and stops before conv 13.
    assert inc.FULL_RECOMPUTE_FRACTION == 0.6
    model = _ConvChain()
    loaded = wrap_model(model, preprocess=Preprocess(None, 32, (0.0,), (1.0,), 1), categories=("a", "b", "c"))
    result = occlusion(loaded, torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1)), 0,
                       window=8, stride=8, fill=0.0)
    assert result.stats.mode == "incremental"
    assert result.stats.incremental_layers == tuple(f"features.{i}" for i in range(24))
    # Work per copy: convs 13 and 14 and the head in full; conv k <= 12 on a patch between
    # the mean changed area (exact cells) and the inner squares' area (chunks run each band
    # at its largest member).
    macs = [1 * 2 * 9] + [2 * 2 * 9] * 13  # per output cell
    head = 2 * 32 * 32 * 3
    full = sum(m * 32 * 32 for m in macs) + head
    tail = sum(m * 32 * 32 for m in macs[12:]) + head
    border = [min(32, 8 + k) for k in range(1, 13)]
    inner = [min(32, 8 + 2 * k, 16 + k) for k in range(1, 13)]
    low = tail + sum(m * ((b + i) / 2) ** 2 for m, b, i in zip(macs, border, inner))
    high = tail + sum(m * i * i for m, i in zip(macs, inner))
    assert low / full - 1e-9 <= result.stats.work_fraction <= high / full + 1e-9  # 0.431 .. 0.533

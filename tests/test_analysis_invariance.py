"""Invariance curves: identity, hand-computed distances, whole-pixel translation, CLI record."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convscope.analysis._features import forward_features
from convscope.analysis.invariance import invariance, transform_image
from convscope.errors import BadArgument
from convscope.methods.predict import classify
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess


class OnesConv(nn.Module):
    """1 -> 1 channel 3x3 all-ones conv (no padding, no bias), ReLU, then a fixed 2-class linear layer."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear((side - 2) ** 2, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.copy_(torch.stack([torch.linspace(-1, 1, (side - 2) ** 2), torch.zeros((side - 2) ** 2)]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


GREY = Preprocess(resize=None, crop=6, mean=(0.0,), std=(1.0,), channels=1)


def _conv_valid(a: np.ndarray) -> np.ndarray:
    return np.array([[a[i:i + 3, j:j + 3].sum() for j in range(a.shape[1] - 2)] for i in range(a.shape[0] - 2)])


def test_distances_equal_hand_computation() -> None:
    loaded = wrap_model(OnesConv(6), preprocess=GREY, categories=("a", "b"))
    pixels = (np.arange(36).reshape(6, 6) * 7 % 256).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    curves = invariance(loaded, [image], "translate", [0, 1, -2], layers=["conv", "classifier_input"], pad="mean")
    original = pixels.astype(np.float64) / 255
    fill = np.round(pixels.mean())
    down1 = np.vstack([np.full((1, 6), fill), pixels[:-1]]) / 255  # content moves down, top row = mean colour
    up2 = np.vstack([pixels[2:], np.full((2, 6), fill)]) / 255
    base = _conv_valid(original)
    expected = [0.0, np.linalg.norm(_conv_valid(down1) - base), np.linalg.norm(_conv_valid(up2) - base)]
    np.testing.assert_allclose(curves.distance["conv"][0].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(curves.relative_distance["conv"][0].numpy(), np.array(expected) / np.linalg.norm(base), rtol=1e-5)
    # all sums are positive, so the ReLU output (the linear layer's input) moves the same way
    np.testing.assert_allclose(curves.distance["classifier_input"][0].numpy(), expected, rtol=1e-5)
    weights = np.linspace(-1, 1, 16)
    for k, shifted in enumerate([original, down1, up2]):
        logit = float((_conv_valid(shifted).flatten() * weights).sum())
        target = curves.targets[0]
        p = 1 / (1 + np.exp(-logit)) if int(target) == 0 else 1 / (1 + np.exp(logit))
        assert float(curves.probability[0, k]) == pytest.approx(p, rel=1e-5)


def test_identity_is_exact_and_matches_classify(tiny_cnn, assert_no_side_effects) -> None:  # type: ignore[no-untyped-def]
    loaded = wrap_model(tiny_cnn, preprocess=Preprocess(resize=None, crop=16), categories=tuple("abcde"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]
    for transform, amounts in (("translate", [-4, 0, 4]), ("scale", [1.0, 1.3]), ("rotate", [0, 90, 360])):
        curves = assert_no_side_effects(tiny_cnn, lambda t=transform, a=amounts: invariance(
            loaded, images, t, a, layers=["conv1", "conv2", "classifier_input"]))
        identity = [i for i, a in enumerate(amounts) if a in (0, 1.0, 360)]
        for layer in curves.layers:
            assert (curves.distance[layer][:, identity] == 0).all()
            moved = [i for i in range(len(amounts)) if i not in identity]
            assert (curves.distance[layer][:, moved] > 0).all()
        predictions = classify(loaded, images)
        assert curves.targets.tolist() == [int(p.indices[0]) for p in predictions]
        for i, p in enumerate(predictions):
            for k in identity:
                assert float(curves.probability[i, k]) == pytest.approx(float(p.probabilities[0]), abs=1e-6)
                assert int(curves.top_class[i, k]) == int(p.indices[0])
        assert curves.probability.shape == (3, len(amounts)) and curves.top_class.dtype == torch.int64


def test_whole_pixel_translation_moves_the_feature_map() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    loaded = wrap_model(conv, preprocess=Preprocess(resize=None, crop=32, mean=(0.0,), std=(1.0,), channels=1))
    pattern = np.zeros((32, 32), dtype=np.uint8)
    pattern[10:18, 12:20] = 200
    pattern[13:15, 14:17] = 90
    image = Image.fromarray(pattern, mode="L")
    for shift in (3, -5):
        moved = transform_image(image, "translate", shift, pad="reflect", preprocess=loaded.preprocess)
        batch = loaded.preprocess.to_tensor([image, moved])
        _, features = forward_features(loaded, batch, ["0"])
        maps = features["0"].view(2, 3, 32, 32)
        if shift > 0:
            torch.testing.assert_close(maps[1][:, shift + 1:31], maps[0][:, 1:31 - shift], rtol=0, atol=1e-6)
        else:
            s = -shift
            torch.testing.assert_close(maps[1][:, 1:31 - s], maps[0][:, 1 + s:31], rtol=0, atol=1e-6)
        assert not torch.allclose(maps[1], maps[0])


def test_translation_amount_is_in_network_pixels() -> None:
    # a 64-row image seen by a 32-pixel network: one network pixel is two image rows
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None] * 3, (1, 64)), mode="L")
    moved = np.asarray(transform_image(image, "translate", 2, preprocess=Preprocess(resize=None, crop=32, channels=1)))
    np.testing.assert_array_equal(moved[4:], np.asarray(image)[:-4])


def test_rotation_by_90_degrees_of_a_square_image_is_a_transpose_flip() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    rotated = np.asarray(transform_image(Image.fromarray(pixels), "rotate", 90))
    np.testing.assert_array_equal(rotated, np.rot90(pixels))  # counter-clockwise on screen


def test_bad_arguments(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    image = Image.new("RGB", (16, 16))
    with pytest.raises(BadArgument, match="--transform shear"):
        invariance(tiny_cnn, [image], "shear")
    with pytest.raises(BadArgument, match="zoom factor must be positive"):
        invariance(tiny_cnn, [image], "scale", [0.0])
    with pytest.raises(BadArgument, match="--pad"):
        invariance(tiny_cnn, [image], "rotate", [10], pad="wrap")
    with pytest.raises(TypeError, match="decoded images"):
        invariance(tiny_cnn, torch.zeros(1, 3, 16, 16), "rotate", [10])


def test_cli_writes_the_specified_record(tmp_path: Path) -> None:
    import subprocess

    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "convscope", "invariance", str(tmp_path / "a.png"), str(tmp_path / "broken.png"),
         str(tmp_path / "b.png"), "--model", "tiny", "--weights", "random", "--transform", "translate",
         "--amounts=-4,0,4", "--layers", "conv1,classifier_input", "-o", str(out)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    record = json.loads((out / "invariance.json").read_text())
    assert list(record) == ["transform", "amounts", "layers", "images"]
    assert record["amounts"] == [-4.0, 0.0, 4.0] and record["layers"] == ["conv1", "classifier_input"]
    assert [Path(r["image"]).name for r in record["images"]] == ["a.png", "b.png"]
    for row in record["images"]:
        assert list(row) == ["image", "target", "distance", "relative_distance", "probability", "top_class"]
        assert row["distance"]["conv1"][1] == 0.0 and row["distance"]["classifier_input"][1] == 0.0
        assert len(row["probability"]) == 3 and row["top_class"][1] == row["target"]
    assert {"invariance_translate.png", "invariance_translate_mean.png", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_amounts_are_bounded_before_anything_is_made(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    # Issue 21, findings 5 and 9: a count and a size limit, checked before the amounts are copied.
    class Huge(Sequence[float]):
        """10**15 amounts that must be counted, never copied (the code as it was copied them all)."""

        def __len__(self) -> int:
            return 10**15

        def __getitem__(self, index):  # type: ignore[no-untyped-def]
            raise AssertionError("the amounts were read before their count was checked")

    image = Image.new("RGB", (16, 16))
    with pytest.raises(BadArgument, match=r"^--amounts: gives 1000000000000000 amounts, over the limit of 1000$"):
        invariance(tiny_cnn, [image], "rotate", Huge())
    with pytest.raises(BadArgument, match=r"^--amounts: 1e\+308 must be between -1e\+06 and 1e\+06$"):
        invariance(tiny_cnn, [image], "translate", [0.0, 1e308])


def test_many_amounts_in_small_batches_equal_one_big_batch(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    # Copies are made one batch at a time; the curves do not depend on the batch size.
    loaded = wrap_model(tiny_cnn, preprocess=Preprocess(resize=None, crop=16), categories=tuple("abcde"))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    amounts = [0.0, 10.0, 20.0, 360.0, 45.0, 90.0, 0.0]
    small = invariance(loaded, [image], "rotate", amounts, batch_size=2)
    big = invariance(loaded, [image], "rotate", amounts, batch_size=64)
    torch.testing.assert_close(small.probability, big.probability)
    for layer in small.layers:
        torch.testing.assert_close(small.distance[layer], big.distance[layer])
    assert small.distance[small.layers[0]][0, 0] == 0 and small.distance[small.layers[0]][0, 3] == 0

"""Correspondence (§4.3): Δ against a brute-force double loop, a synthetic consistent part,
PARTS parsing, the CLI on scikit-image's LFW faces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convscope.analysis.correspondence import correspondence, hamming_pairs, parse_parts, sign_change, square
from convscope.errors import BadArgument
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess


def brute_force(changes: torch.Tensor) -> int:
    signs = torch.sign(changes)
    total = 0
    for i in range(len(signs)):
        for j in range(len(signs)):
            if i != j:
                total += int((signs[i] != signs[j]).sum())
    return total


def test_delta_equals_a_brute_force_double_loop() -> None:
    torch.manual_seed(0)
    changes = torch.randn(7, 50)
    changes[changes.abs() < 0.4] = 0.0  # zero is a third sign value
    result = sign_change(changes)
    expected = brute_force(changes)
    assert result.delta == expected
    assert result.normalized == pytest.approx(expected / (7 * 6 * 50))
    signs = torch.sign(changes)
    for i in range(7):
        for j in range(7):
            assert int(result.pairs[i, j]) == int((signs[i] != signs[j]).sum())
    per_pair = torch.tensor([float((signs[i] != signs[j]).sum()) / 50 for i in range(7) for j in range(7) if i != j])
    assert result.std == pytest.approx(float(per_pair.std(unbiased=False)))
    assert hamming_pairs(changes[:1].repeat(3, 1)).sum() == 0


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(self.relu(self.conv(x)))).flatten(1))


def synthetic_set(count: int = 8) -> list[Image.Image]:
    """Different noise backgrounds, the same 8x8 textured part at the same place."""
    rng = np.random.default_rng(0)
    part = rng.integers(0, 256, (8, 8))
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (32, 32))
        pixels[4:12, 18:26] = part
        images.append(Image.fromarray(pixels.astype(np.uint8), mode="L"))
    return images


def test_a_part_drawn_at_the_same_place_is_more_consistent_than_random_boxes(assert_no_side_effects) -> None:  # type: ignore[no-untyped-def]
    net = TwoLayer()
    loaded = wrap_model(net, preprocess=Preprocess(resize=None, crop=32, mean=(0.5,), std=(0.25,), channels=1))
    images = synthetic_set()
    result = assert_no_side_effects(net, lambda: correspondence(
        loaded, images, {"part": [4, 18, 12, 26]}, layers=["conv", "conv2", "classifier_input"], random=6, seed=1))
    assert result.layers == ("conv", "conv2", "classifier_input")
    assert result.dimensions == {"conv": 8 * 32 * 32, "conv2": 8 * 16 * 16, "classifier_input": 8 * 16 * 16}
    for layer in result.layers:
        part = result.parts_delta[layer]["part"].normalized
        assert 0 <= part < result.random[layer].mean, layer
    assert len(result.random_boxes) == 6
    for draw in result.random_boxes:  # same size, same place in every image
        assert len(set(draw)) == 1 and draw[0][2] - draw[0][0] == 8 and draw[0][3] - draw[0][1] == 8


def test_parse_parts_forms_and_errors() -> None:
    sizes = [(20, 30), (25, 25)]
    assert parse_parts({"eye": [1, 2, 5, 6]}, sizes) == {"eye": ((1, 2, 5, 6), (1, 2, 5, 6))}
    assert parse_parts({"eye": [[1, 2, 5, 6], [0, 0, 3, 3]]}, sizes)["eye"][1] == (0, 0, 3, 3)
    assert parse_parts({"eye": {"b.png": [0, 0, 2, 2], "a.png": [1, 1, 4, 4]}}, sizes, ["a.png", "b.png"])["eye"] == (
        (1, 1, 4, 4), (0, 0, 2, 2))
    with pytest.raises(BadArgument, match="outside a 25x25 image"):
        parse_parts({"eye": [[1, 2, 5, 6], [20, 20, 26, 24]]}, sizes)
    with pytest.raises(BadArgument, match="has no box for image b.png"):
        parse_parts({"eye": {"a.png": [0, 0, 2, 2]}}, sizes, ["a.png", "b.png"])
    with pytest.raises(BadArgument, match="one box"):
        parse_parts({"eye": [[1, 2, 5, 6]] * 3}, sizes)
    assert square((10, 10, 12, 12), 6, 20, 20) == (8, 8, 14, 14)
    assert square((0, 0, 2, 2), 6, 20, 20) == (0, 0, 6, 6)


def test_needs_two_images(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadArgument, match="at least 2"):
        correspondence(tiny_cnn, [Image.new("RGB", (16, 16))], {"p": [0, 0, 4, 4]})


def test_cli_on_lfw_faces(tmp_path: Path) -> None:
    import subprocess

    from skimage.data import lfw_subset

    faces = lfw_subset()[:6]  # ships with scikit-image: no download
    assert faces.shape == (6, 25, 25)
    for i, face in enumerate(faces):
        Image.fromarray((face * 255).round().astype(np.uint8)).save(tmp_path / f"face{i}.png")
    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps({"right eye": [6, 3, 11, 10], "left eye": [6, 12, 11, 19], "nose": [10, 9, 17, 14]}))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "convscope", "correspondence", *(str(tmp_path / f"face{i}.png") for i in range(6)),
         "--parts", str(parts), "--model", "tiny", "--weights", "random", "--random", "3", "-o", str(out)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "correspondence.json").read_text())
    assert record["layers"] == ["conv2", "classifier_input"] and record["pairs"] == 30
    for layer in record["layers"]:
        row = record["table"][layer]
        assert list(row) == ["right eye", "left eye", "nose", "random"]
        for part in ("right eye", "left eye", "nose"):
            d = record["dimensions"][layer]
            assert row[part]["normalized"] == pytest.approx(row[part]["delta"] / (30 * d))
        assert len(row["random"]["normalized"]) == 3
    assert "right eye" in (out / "correspondence.txt").read_text() and (out / "parts.png").stat().st_size > 0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        [sys.executable, "-m", "convscope", "correspondence", str(tmp_path / "face0.png"), str(tmp_path / "face1.png"),
         "--parts", str(bad), "--model", "tiny", "--weights", "random", "-o", str(out)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --parts") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True])
def test_parse_parts_refuses_non_finite_and_boolean_coordinates(value: float) -> None:
    # Issue 21, finding 9: int(nan) / int(inf) ended in a ValueError / OverflowError traceback.
    sizes = [(20, 20), (20, 20)]
    reason = "is not [top, left, bottom, right]" if value is True else ": coordinates must be finite numbers"
    if value is not True:
        with pytest.raises(BadArgument, match=r"^--parts eye: box \[1, -?(nan|inf), 5, 6\]: coordinates must be finite"):
            parse_parts({"eye": [1, value, 5, 6]}, sizes)
    with pytest.raises(BadArgument) as caught:
        parse_parts({"eye": [[1, 2, 5, 6], [1, value, 5, 6]]}, sizes)
    assert str(caught.value) == f"--parts eye: box [1, {value}, 5, 6]{' ' if value is True else ''}{reason}"


def test_random_control_has_a_limit(tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    images = [Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))]
    with pytest.raises(BadArgument, match=r"^--random: must be between 0 and 10000, got 10001$"):
        correspondence(tiny_cnn, images, {"p": [0, 0, 4, 4]}, random=10_001)

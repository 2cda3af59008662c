"""Rendering: dtype, range, shape, exact blend and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.render.colormaps import colorize, to_gray_uint8, to_rgb_uint8
from convscope.render.grids import strip, tile
from convscope.render.overlay import overlay


def test_colorize_jet_endpoints() -> None:
    colours = colorize(torch.tensor([[0.0, 0.5, 1.0, 2.0, -1.0]]))
    assert colours.dtype == np.uint8 and colours.shape == (1, 5, 3)
    assert tuple(colours[0, 0]) == (0, 0, 128)  # jet starts dark blue
    assert tuple(colours[0, 2]) == (128, 0, 0)  # and ends dark red
    assert tuple(colours[0, 3]) == tuple(colours[0, 2])  # clipped
    assert tuple(colours[0, 4]) == tuple(colours[0, 0])


def test_overlay_is_point6_image_point4_map() -> None:
    image = np.full((4, 4, 3), 200, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    result = overlay(image, heat)
    expected = np.rint(0.6 * 200 + 0.4 * np.array([0, 0, 128])).astype(np.uint8)
    assert (result == expected).all()
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((3, 3)))


def test_gray_and_rgb_conversions() -> None:
    assert to_gray_uint8(np.array([[1.0, 3.0]])).tolist() == [[0, 255]]
    assert to_gray_uint8(np.ones((2, 2))).tolist() == [[0, 0], [0, 0]]
    rgb = to_rgb_uint8(torch.tensor([[[1.0]], [[0.5]], [[0.0]]]))
    assert rgb.shape == (1, 1, 3) and rgb.tolist() == [[[255, 128, 0]]]


def test_tile_layout_and_determinism() -> None:
    tiles = [np.full((4, 4), v, np.uint8) for v in (0, 100, 200)]
    grid = tile(tiles, columns=2, pad=1, min_side=4)
    assert grid.shape == (1 + 2 * 5, 1 + 2 * 5, 3)
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[1, 6].tolist() == [100] * 3 and grid[6, 1].tolist() == [200] * 3
    labelled = tile(tiles, labels=["0", "1", "2"], min_side=48)
    again = tile(tiles, labels=["0", "1", "2"], min_side=48)
    assert (labelled == again).all()
    assert labelled.shape[0] == 2 * 48 + 3 * 2
    pictures = strip([np.zeros((10, 10, 3), np.uint8)] * 2, ["a", "b"])
    assert pictures.dtype == np.uint8 and pictures.shape[1] > 20


def test_signed_and_magnitude_pictures() -> None:
    from convscope.render.pictures import magnitude_picture, signed_picture

    attribution = torch.zeros(3, 2, 2)
    attribution[:, 0, 0] = 1.0
    attribution[:, 1, 1] = -1.0
    picture = signed_picture(attribution)
    assert picture.dtype == np.uint8 and picture.shape == (2, 2, 3)
    assert picture[0, 1].tolist() == [128, 128, 128]  # zero is mid-grey
    assert picture[0, 0].tolist() == [255, 255, 255] and picture[1, 1].tolist() == [0, 0, 0]
    assert signed_picture(torch.zeros(3, 2, 2)).tolist() == [[[128] * 3] * 2] * 2
    grey = magnitude_picture(torch.tensor([[0.0, 1.0], [2.0, 4.0]]))
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[1, 1].tolist() == [255, 255, 255]

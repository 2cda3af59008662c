"""Receptive-field arithmetic on layers whose two axes differ, on every layer kind ``propagate``
knows, and on the odd calls ``trace`` must survive, each value worked out by hand (kills the mutmut
survivors of ``probes/geometry.py``: ``tools/mutate.py geometry``).

``Geometry`` describes the height axis; a layer whose two axes differ is marked inexact.
Recurrence: size += (k' - 1) * jump, jump *= s, start += ((k' - 1) / 2 - p) * jump, k' = d (k - 1) + 1.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from convscope.probes.geometry import (
    INPUT_GEOMETRY,
    Geometry,
    has_global_statistics,
    is_pointwise,
    propagate,
    reach,
    trace,
)

# (layer, size, jump, start, exact) after one layer on the input (size 1, jump 1, start 0.5)
ONE_LAYER = [
    ("square 3x3", nn.Conv2d(1, 1, 3, padding=1), 3, 1, 0.5, True),
    ("kernel (3, 5)", nn.Conv2d(1, 1, (3, 5)), 3, 1, 1.5, False),  # the height's kernel
    ("stride (1, 2)", nn.Conv2d(1, 1, 3, stride=(1, 2)), 3, 1, 1.5, False),  # the height's stride
    ("padding (1, 0)", nn.Conv2d(1, 1, 3, padding=(1, 0)), 3, 1, 0.5, False),  # the height's padding
    ("dilation (2, 1)", nn.Conv2d(1, 1, 3, dilation=(2, 1)), 5, 1, 2.5, False),  # k' = 5 on the height
    ("even kernel, same", nn.Conv2d(1, 1, 2, padding="same"), 2, 1, 1.0, True),  # pads 0 before, 1 after
    ("avg pool 3/2/1", nn.AvgPool2d(3, stride=2, padding=1), 3, 2, 0.5, True),  # AvgPool2d has no dilation
    ("max pool 2", nn.MaxPool2d(2), 2, 2, 1.0, True),
]


@pytest.mark.parametrize(("name", "layer", "size", "jump", "start", "exact"), ONE_LAYER, ids=[c[0] for c in ONE_LAYER])
def test_one_layer_by_hand(name: str, layer: nn.Module, size: float, jump: float, start: float, exact: bool) -> None:
    assert propagate(INPUT_GEOMETRY, layer) == Geometry(size=size, jump=jump, start=start, exact=exact)


def test_flags_carry_through_windows() -> None:
    inexact = replace(INPUT_GEOMETRY, exact=False)
    assert propagate(inexact, nn.Conv2d(1, 1, 3)).exact is False  # a square layer does not make it exact again
    after_global = Geometry(size=10.0, jump=4.0, start=2.0, exact=False, is_global=True)
    assert propagate(after_global, nn.Conv2d(1, 1, 1)).is_global is True


@pytest.mark.parametrize("layer", [nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(2), nn.Linear(4, 2), nn.Flatten()])
def test_global_layers(layer: nn.Module) -> None:
    geo = Geometry(size=7.0, jump=2.0, start=1.5)
    assert propagate(geo, layer) == Geometry(size=7.0, jump=2.0, start=1.5, exact=False, is_global=True)


def test_unknown_layers_keep_the_field_but_are_inexact() -> None:
    geo = Geometry(size=7.0, jump=2.0, start=1.5)
    assert propagate(geo, nn.Upsample(scale_factor=2)) == Geometry(size=7.0, jump=2.0, start=1.5, exact=False)
    assert propagate(geo, nn.ReLU()) == geo  # pointwise: untouched


def test_zero_padding_moves_the_start_by_whole_cells() -> None:
    # After a stride-2 layer one padded row is two input pixels: start - 1 * jump.
    geo = Geometry(size=2.0, jump=2.0, start=1.0)
    assert propagate(geo, nn.ZeroPad2d((3, 0, 1, 0))) == Geometry(size=2.0, jump=2.0, start=-1.0)


class _Odd(nn.Module):
    """A leaf called by keyword (no positional input), a pool returning a tuple, and a residual
    sum whose two branches have fields of equal size."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.act = nn.ReLU()
        self.a = nn.Conv2d(1, 1, 3, padding=1)
        self.pad = nn.ZeroPad2d((2, 0, 2, 0))
        self.b = nn.Conv2d(1, 1, 3)
        self.after = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.pool(x)
        x = self.act(input=x)
        first = self.a(x)  # size 3 at 4x4, start 0.5
        second = self.b(self.pad(x))  # size 3 at 4x4, start 0.5 - 2 + 1 = -0.5
        return self.after(first + second)


def test_trace_survives_keyword_calls_and_tuple_outputs_and_breaks_ties_by_the_latest() -> None:
    calls = {c.name: c for c in trace(_Odd(), torch.zeros(1, 1, 8, 8))}
    pool, act = calls["pool"], calls["act"]
    assert pool.input_shape == (1, 1, 8, 8) and pool.output_shape is None and pool.output_bytes == 0
    assert act.input_shape is None and act.output_shape == (1, 1, 4, 4) and act.output_bytes == 64
    # the pool's tuple cannot be followed: act starts again from the input's field, marked inexact
    assert act.geometry == replace(INPUT_GEOMETRY, exact=False)
    a, b = calls["a"].geometry, calls["b"].geometry
    assert (a.size, a.start, b.size, b.start) == (3.0, 0.5, 3.0, -0.5)
    # `after` reads a sum: off the chain, it takes the widest field at 4x4, the latest on a tie (b).
    assert calls["after"].geometry == replace(b, exact=False)
    assert calls["after"].geometry.exact is False


@pytest.mark.parametrize("layer", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False)])
def test_global_statistics_keep_the_field_but_have_no_reach(layer: nn.Module) -> None:
    # The decision made once in geometry: the local path's field is unchanged (and exact), but a
    # change anywhere moves the statistics, so no output cell has a bounded reach.
    geo = Geometry(size=7.0, jump=2.0, start=1.5)
    assert propagate(geo, layer.eval()) == geo
    assert reach(layer) is None and not is_pointwise(layer) and has_global_statistics(layer)


def test_reach_per_axis_by_hand() -> None:
    assert reach(nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(1, 0), dilation=(2, 1))) == ((1, -1, 3), (2, 0, 4))
    assert reach(nn.Conv2d(1, 1, 2, padding="same")) == ((1, 0, 1), (1, 0, 1))  # the odd cell goes after
    assert reach(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)) == ((2, -1, 1), (2, -1, 1))
    assert reach(nn.ZeroPad2d((3, 0, 1, 0))) == ((1, -1, -1), (1, -3, -3))
    assert reach(nn.BatchNorm2d(4).eval()) == ((1, 0, 0), (1, 0, 0))
    assert reach(nn.BatchNorm2d(4).train()) is None  # batch statistics while training
    assert reach(nn.Mish()) == ((1, 0, 0), (1, 0, 0))
    assert reach(nn.AdaptiveAvgPool2d(1)) is None and reach(nn.Upsample(scale_factor=2)) is None


# -- found by the hand-made mutation round (issue 14): a dilated kernel, an asymmetric pad ----------


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

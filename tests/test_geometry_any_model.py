"""Receptive fields and the summary on any model (issue 18, item 4b): never a crash; ``global``
through attention, squeeze-excite and global pooling; ``approximate`` through residual and
concatenated paths; linear layers on NHWC maps and tokens per position, in the field and in the
multiply-adds. Values by hand where a hand computation is possible; totals against the published
multiply-adds at 224 (random weights: the counts do not depend on them)."""

from __future__ import annotations

import functools
import math
from dataclasses import fields

import pytest
import torch
import torchvision
from torch import nn

import convscope
from convscope.probes.geometry import (
    INPUT_GEOMETRY,
    FunctionCall,
    Geometry,
    LayerCall,
    function_field,
    function_mult_adds,
    propagate,
    trace,
    trace_steps,
)
from convscope.types import LayerInfo, ModelSummary

MODELS = ("convnext_tiny", "swin_t", "regnet_y_400mf", "densenet121", "resnet18", "efficientnet_b0", "vit_b_16")


@functools.cache
def _summary(name: str) -> ModelSummary:
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None)
    return convscope.summary(convscope.wrap_model(module, name=name))


@functools.cache
def _steps(name: str) -> tuple[LayerCall | FunctionCall, ...]:
    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None)
    return tuple(trace_steps(module, torch.zeros(1, 3, 224, 224)))


def _rows(name: str) -> dict[str, list[LayerInfo]]:
    by_name: dict[str, list[LayerInfo]] = {}
    for row in _summary(name).layers:
        by_name.setdefault(row.name, []).append(row)
    return by_name


def _fields(name: str) -> dict[str, list[Geometry]]:
    by_name: dict[str, list[Geometry]] = {}
    for step in _steps(name):
        if step.geometry is not None:
            by_name.setdefault(step.name if isinstance(step, LayerCall) else f"{step.name}:{step.op}", []).append(step.geometry)
    return by_name


# -- every model: the summary runs, every parameter in a row, every map a kind ---------------------


@pytest.mark.parametrize("name", MODELS)
def test_summary_runs_and_rows_add_up(name: str) -> None:
    result = _summary(name)
    total = sum(p.numel() for p in getattr(torchvision.models, name)(weights=None).parameters())
    assert result.total_params == total
    # parameters read by torch functions (ViT's class token, Swin's qkv via F.linear, ConvNeXt's
    # layer scale) have rows of their own: the rows add up to the model
    assert sum(row.params for row in result.layers) == total
    assert not any("not read" in note for note in result.notes)
    kinds = {step.geometry.kind for step in _steps(name) if step.geometry is not None}
    assert kinds <= {"exact", "approximate", "global"} and "exact" in kinds
    # the classifier reads the whole image in every one of them
    last = [s for s in _steps(name) if isinstance(s, LayerCall)][-1]
    assert last.geometry.kind == "global", name


# -- by hand ----------------------------------------------------------------------------------------


def test_resnet18_conv1_and_residual_and_head() -> None:
    rows, geos = _rows("resnet18"), _fields("resnet18")
    conv1 = rows["conv1"][0]
    assert (conv1.receptive_field, conv1.jump, conv1.start, conv1.rf_exact) == (7, 2, 0.5, True)
    assert rows["maxpool"][0].receptive_field == 11
    # after the first residual sum: the main path's field (11 + 2*4 + 2*4 = 27), approximate
    assert geos["layer1.0.relu"][1] == Geometry(size=27.0, jump=4.0, start=0.5, exact=False)
    assert geos["avgpool"][0].kind == "global" and geos["fc"][0].kind == "global"


def test_squeeze_excite_output_is_global() -> None:
    geos = _fields("regnet_y_400mf")
    block = "trunk_output.block1.block1-0.f"
    assert geos["stem.0"][0] == Geometry(size=3.0, jump=2.0, start=0.5)
    assert geos[f"{block}.b.0"][0].kind == "exact"  # before the gate: a plain chain
    assert geos[f"{block}.se.avgpool"][0].kind == "global"
    # the 1x1 convolution after the gate reads scale * input: global, though its window is 1
    assert geos[f"{block}.c.0"][0].kind == "global"
    effnet = _fields("efficientnet_b0")
    assert effnet["features.0.0"][0] == Geometry(size=3.0, jump=2.0, start=0.5)
    assert effnet["features.1.0.block.0.0"][0].kind == "exact"  # depthwise 3x3: 3 + 2*2 = 7
    assert effnet["features.1.0.block.0.0"][0].size == 7.0
    assert effnet["features.1.0.block.2.0"][0].kind == "global"  # the projection after SE


def test_densenet_concatenation_is_approximate() -> None:
    geos = _fields("densenet121")
    assert geos["features.conv0"][0] == Geometry(size=7.0, jump=2.0, start=0.5)
    assert geos["features.pool0"][0] == Geometry(size=11.0, jump=4.0, start=0.5)
    # the first layer of the first block reads the pool alone (a concatenation of one): exact
    assert geos["features.denseblock1.denselayer1.norm1"][0].kind == "exact"
    # the second reads cat(pool0, layer1's conv 3x3): the widest of the two (11 + 2*4 = 19), approximate
    assert geos["features.denseblock1.denselayer2.norm1"][0] == Geometry(size=19.0, jump=4.0, start=0.5, exact=False)
    assert geos["classifier"][0].kind == "global"


def test_convnext_linear_layers_are_per_position() -> None:
    geos, rows = _fields("convnext_tiny"), _rows("convnext_tiny")
    assert geos["features.0.0"][0] == Geometry(size=4.0, jump=4.0, start=2.0)
    # depthwise 7x7 at jump 4: 4 + 6*4 = 28; Permute, LayerNorm, Linear, GELU, Linear, Permute keep it
    block = Geometry(size=28.0, jump=4.0, start=2.0)
    for part in range(7):
        assert geos[f"features.1.0.block.{part}"][0] == block, part
    assert geos["features.1.0:mul"][0] == block  # the layer scale
    # the next block reads the residual sum: 28 + 24 = 52, approximate
    assert geos["features.1.1.block.0"][0] == Geometry(size=52.0, jump=4.0, start=2.0, exact=False)
    assert geos["avgpool"][0].kind == "global"
    # per position: 56 * 56 positions * 96 in * 384 out
    assert rows["features.1.0.block.3"][0].mult_adds == 56 * 56 * 96 * 384
    assert rows["features.1.0.block.5"][0].mult_adds == 56 * 56 * 384 * 96
    assert rows["classifier.2"][0].mult_adds == 768 * 1000  # on a vector: once


def test_swin_attention_is_global() -> None:
    geos, rows = _fields("swin_t"), _rows("swin_t")
    assert geos["features.0.0"][0] == Geometry(size=4.0, jump=4.0, start=2.0)
    assert geos["features.0.1"][0] == geos["features.0.2"][0] == Geometry(size=4.0, jump=4.0, start=2.0)  # NHWC
    assert all(g.kind == "global" for g in geos["features.1.0.attn:matmul"])
    assert geos["features.1.0.mlp.0"][0].kind == "global"
    # the projections are F.linear on the modules' weights: rows named after the modules
    qkv = rows["features.1.0.attn.qkv"][0]
    assert (qkv.type, qkv.params, qkv.mult_adds) == ("linear()", 96 * 288 + 288, 56 * 56 * 96 * 288)
    # q @ k^T over 64 windows of 49 tokens, 3 heads of 32 channels; then attention @ v
    assert [r.mult_adds for r in rows["features.1.0.attn"] if r.type == "matmul()"] == [64 * 3 * 49 * 49 * 32] * 2
    assert rows["features.1.0.mlp.0"][0].mult_adds == 56 * 56 * 96 * 384


def test_vit_tokens() -> None:
    geos, rows = _fields("vit_b_16"), _rows("vit_b_16")
    assert geos["conv_proj"][0] == Geometry(size=16.0, jump=16.0, start=8.0)
    # tokens, with the class token and the position embedding: still one patch each
    assert geos["encoder:add"][0] == Geometry(size=16.0, jump=16.0, start=8.0)
    assert geos["encoder.layers.encoder_layer_0.ln_1"][0] == Geometry(size=16.0, jump=16.0, start=8.0)
    attention = rows["encoder.layers.encoder_layer_0.self_attention"][0]
    assert attention.type == "multi_head_attention_forward()"
    # projections 4 * 197 * 768^2, q k^T and attention v 2 * 197^2 * 768
    assert attention.mult_adds == 4 * 197 * 768 * 768 + 2 * 197 * 197 * 768
    assert geos["encoder.layers.encoder_layer_0.self_attention:multi_head_attention_forward"][0].kind == "global"
    assert geos["encoder.layers.encoder_layer_0.mlp.0"][0].kind == "global"
    assert rows["encoder.layers.encoder_layer_0.mlp.0"][0].mult_adds == 197 * 768 * 3072
    assert rows["class_token"][0].params == 768


# -- totals against the published numbers at 224 ---------------------------------------------------


@pytest.mark.parametrize(("name", "published"), [
    ("convnext_tiny", 4.5e9), ("swin_t", 4.5e9), ("resnet50", 4.1e9), ("vit_b_16", 17.6e9),
    ("regnet_y_400mf", 0.4e9), ("efficientnet_b0", 0.39e9),
])
def test_total_mult_adds_near_the_published(name: str, published: float) -> None:
    total = _summary(name).total_mult_adds
    assert abs(total - published) / published < 0.05, (name, total)


def test_swin_counts_the_attention_products_and_says_so() -> None:
    result = _summary("swin_t")
    products = sum(r.mult_adds for r in result.layers if r.type == "matmul()")
    # 2 * 49 * C per position and block: stages (56^2, 96, 2), (28^2, 192, 2), (14^2, 384, 6), (7^2, 768, 2)
    assert products == sum(2 * 49 * hw * c * depth for hw, c, depth in
                           [(56 * 56, 96, 2), (28 * 28, 192, 2), (14 * 14, 384, 6), (7 * 7, 768, 2)])
    assert 0.02 < products / result.total_mult_adds < 0.04  # ~3%: within 5% either way, counted
    assert any("matrix products" in note for note in result.notes)
    assert any("global" in note for note in result.notes)


def test_table_shows_global_and_approximate() -> None:
    from convscope.render.text import summary_table

    if "receptive_field_kind" not in {f.name for f in fields(LayerInfo)}:
        pytest.skip("LayerInfo.receptive_field_kind (convscope/types.py) not added yet")
    result = _summary("regnet_y_400mf")
    row = next(r for r in result.layers if r.name.endswith("block1-0.f.c.0"))
    assert row.receptive_field_kind == "global" and row.receptive_field is None  # type: ignore[attr-defined]
    assert "global" in summary_table(result)


# -- small models: the rules one at a time ---------------------------------------------------------


class _SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.after = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        gate = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))  # timm's squeeze: a functional mean
        channel_mean = x.mean(1, keepdim=True)  # per position: not global
        return self.after(x * gate) + channel_mean


def test_functional_squeeze_excite() -> None:
    calls = {c.name: c.geometry for c in trace(_SqueezeExcite(), torch.zeros(1, 3, 8, 8))}
    assert calls["conv"] == Geometry(size=3.0, jump=1.0, start=0.5)
    assert calls["fc"].kind == "global"
    assert calls["after"].kind == "global"


class _Nhwc(nn.Module):
    """conv 2/2 -> NHWC -> LayerNorm -> Linear -> NCHW -> conv 3x3: the field goes through."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.conv = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.norm(self.stem(x).permute(0, 2, 3, 1)))
        return self.conv(x.permute(0, 3, 1, 2))


def test_linear_on_nhwc_keeps_the_field_and_counts_per_position() -> None:
    calls = {c.name: c for c in trace(_Nhwc(), torch.zeros(1, 3, 8, 8))}
    assert calls["fc"].geometry == Geometry(size=2.0, jump=2.0, start=1.0)
    # 3x3 at jump 2: 2 + 2*2 = 6, start 1.0 + (1 - 1) * 2
    assert calls["conv"].geometry == Geometry(size=6.0, jump=2.0, start=1.0)
    row = next(r for r in convscope.summary(convscope.wrap_model(_Nhwc()), input_size=(3, 8, 8)).layers if r.name == "fc")
    assert row.mult_adds == 4 * 4 * 8 * 16 and row.receptive_field == 2 and row.rf_exact


class _Tokens(nn.Module):
    """patches -> tokens -> (x W) per token -> softmax(q k^T) v: global after the product."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, L, C)
        projected = self.norm(tokens @ self.weight)  # a weight: per token
        scores = (projected @ projected.transpose(1, 2)).softmax(-1)
        return self.norm(scores @ projected)


def test_tokens_and_attention() -> None:
    steps = trace_steps(_Tokens(), torch.zeros(1, 3, 8, 8))
    norms = [s.geometry for s in steps if isinstance(s, LayerCall) and s.name == "norm"]
    assert norms[0] == Geometry(size=4.0, jump=4.0, start=2.0)  # after x @ W: per token, exact
    assert norms[1].kind == "global"
    products = [s for s in steps if isinstance(s, FunctionCall)]
    # x @ W (reads the parameter): L=4 tokens * 8 * 8; q k^T: 4 * 4 * 8 (no parameter: not its row)
    assert [(s.name, s.op, s.mult_adds) for s in products] == [("weight", "matmul", 4 * 8 * 8),
                                                                ("", "matmul", 4 * 4 * 8),
                                                                ("", "matmul", 4 * 8 * 4)]


def test_function_field_rules() -> None:
    a = (Geometry(size=3.0, jump=1.0, start=0.5), 0)
    b = (Geometry(size=5.0, jump=1.0, start=0.5), 1)
    x4 = torch.zeros(1, 2, 3, 3)
    assert function_field("add", (), {}, [a]) == a[0]
    assert function_field("cat", (), {}, [a, b]) == Geometry(size=5.0, jump=1.0, start=0.5, exact=False)
    assert function_field("cat", (), {}, [a, a]) == a[0]  # the same field on both paths: still exact
    assert function_field("matmul", (), {}, [a, b]).kind == "global"  # type: ignore[union-attr]
    assert function_field("linear", (), {}, [a]) == a[0]
    assert function_field("scaled_dot_product_attention", (), {}, [a]).kind == "global"  # type: ignore[union-attr]
    assert function_field("adaptive_avg_pool2d", (), {}, [a]).kind == "global"  # type: ignore[union-attr]
    assert function_field("mean", (x4, (2, 3)), {}, [a]).kind == "global"  # type: ignore[union-attr]
    assert function_field("mean", (x4,), {"dim": 1}, [a]) == a[0]  # channels of NCHW
    assert function_field("sum", (torch.zeros(1, 5, 2), 1), {}, [a]).kind == "global"  # type: ignore[union-attr]  # tokens
    assert function_field("softmax", (torch.zeros(1, 5, 2), -1), {}, [a]) == a[0]  # the channels of tokens
    assert function_field("mean", (x4,), {}, [a]).kind == "global"  # type: ignore[union-attr]  # everything
    assert function_field("interpolate", (), {}, [a]) == Geometry(size=3.0, jump=1.0, start=0.5, exact=False)
    assert function_field("permute", (), {}, [a]) == a[0]
    assert function_field("add", (), {}, []) is None  # constants carry no field
    glob = (Geometry(size=3.0, jump=1.0, start=0.5, exact=False, is_global=True), 2)
    assert function_field("mul", (), {}, [b, glob]).kind == "global"  # type: ignore[union-attr]


def test_function_mult_adds_by_hand() -> None:
    x, w = torch.zeros(2, 5, 7), torch.zeros(3, 7)
    assert function_mult_adds("linear", (x, w), {}, torch.zeros(2, 5, 3)) == 2 * 5 * 3 * 7
    q, k = torch.zeros(2, 4, 6, 8), torch.zeros(2, 4, 9, 8)
    assert function_mult_adds("matmul", (q, k.transpose(-1, -2)), {}, torch.zeros(2, 4, 6, 9)) == 2 * 4 * 6 * 9 * 8
    assert function_mult_adds("scaled_dot_product_attention", (q, k, torch.zeros(2, 4, 9, 5)), {}, None) == 2 * 4 * 6 * 9 * (8 + 5)
    assert function_mult_adds("einsum", ("bij,bjk->bik", torch.zeros(2, 3, 4), torch.zeros(2, 4, 5)), {}, None) == 2 * 3 * 4 * 5
    query = torch.zeros(10, 1, 16)  # (L, N, E)
    assert function_mult_adds("multi_head_attention_forward", (query, query, query), {}, None) == (
        4 * 10 * 16 * 16 + 2 * 10 * 10 * 16)
    assert function_mult_adds("add", (x, x), {}, x) == 0


def test_propagate_linear_needs_the_input_shape() -> None:
    geo = Geometry(size=7.0, jump=2.0, start=1.5)
    assert propagate(geo, nn.Linear(4, 2), (1, 5, 5, 4)) == geo
    assert propagate(geo, nn.Linear(4, 2), (1, 9, 4)) == geo
    assert propagate(geo, nn.Linear(4, 2), (1, 4)).kind == "global"
    assert propagate(geo, nn.LayerNorm(4), (1, 9, 4)) == geo
    assert propagate(INPUT_GEOMETRY, nn.Linear(4, 2)).kind == "global"
    assert math.isclose(propagate(geo, nn.LayerNorm((4, 4)), (1, 2, 4, 4)).size, 7.0)  # statistics: the local path

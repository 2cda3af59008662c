"""Occlusion on any model (issue 18, item 5): never a traceback, exact everywhere.

* Where the incremental plan does not fit (squeeze-excite, shortcut convolutions, a forward that
  breaks on the replayed tensor), every copy runs the whole network and ``stats.note`` says why;
  the maps still equal captum's ``Occlusion``.
* ``layer`` on a reused module (ResNet's block ReLU: 512, 512 then 2048 channels in one block)
  reads its last call, as ``probes.hooks.Capture.last`` does.
* ``layer`` on an NHWC or token layer reads the channel from the right axis (the layout API).
* A model that returns a tuple or a dict is refused in one line.
* A sweep over torchvision and timm architectures: each runs (or refuses in one line).

Random weights give near-uniform probabilities, so BatchNorm running statistics are re-estimated
on three photos before numbers are compared (maps of untouched random weights are ~1e-15).
"""

from __future__ import annotations

import pytest
import torch
from conftest import recalibrated
from skimage import data
from torch import nn

from convscope.errors import BadArgument, ConvscopeError
from convscope.methods.occlusion import engine as engine_module
from convscope.methods.occlusion import grid_origins, occlusion
from convscope.models.load import load_model, wrap_model
from convscope.preprocess import Preprocess

torchvision = pytest.importorskip("torchvision")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def photos(size: int = 224) -> torch.Tensor:
    """chelsea, astronaut, coffee: ``(3, 3, size, size)`` normalised with ImageNet's statistics."""
    out = []
    for picture in (data.chelsea(), data.astronaut(), data.coffee()):
        x = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append((x - MEAN) / STD)
    return torch.cat(out)


reestimate = recalibrated


def captum_drop(module: nn.Module, image: torch.Tensor, target: int, window: int, stride: int) -> torch.Tensor:
    captum_attr = pytest.importorskip("captum.attr")
    with torch.no_grad():
        result = captum_attr.Occlusion(lambda x: torch.softmax(module(x), dim=1)).attribute(
            image, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.0,
            target=target, perturbations_per_eval=16,
        )
    return result[0, 0]


def assert_same_as_captum(result, theirs: torch.Tensor) -> None:
    scale = float(theirs.abs().max())
    assert scale > 1e-6  # the re-estimated statistics give a map worth comparing
    torch.testing.assert_close(result.pixel_drop[0], theirs, rtol=0, atol=1e-3 * scale)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return photos(128)  # the networks are fully convolutional up to their global pooling: small is fast


# ---------------------------------------------------------------- models the plan does not fit


@pytest.mark.peer
@pytest.mark.parametrize("name", ["regnet_y_400mf", "convnext_tiny"])
def test_equals_captum_where_the_plan_does_not_fit(name, images) -> None:
    torch.manual_seed(0)
    module = reestimate(getattr(torchvision.models, name)(weights=None), images)
    image = images[:1].contiguous()
    result = occlusion(module, image, window=64, stride=32, fill=0.0, cover_border=True)
    assert (len(result.row_origins), len(result.col_origins)) == (3, 3)
    if name == "regnet_y_400mf":  # squeeze-excite blocks with a shortcut convolution
        assert result.stats.mode == "full" and result.stats.work_fraction == 1.0
        assert result.stats.note.startswith("incremental occlusion does not fit this model (")
        assert "trunk_output.block1.block1-0" in result.stats.note
        assert result.stats.note.endswith("every copy ran the whole network")
    assert_same_as_captum(result, captum_drop(module, image, int(result.targets[0]), 64, 32))


def test_a_plan_that_fails_while_running_starts_again_whole(monkeypatch) -> None:
    """A chain that passed its checks but fails on a chunk: every copy again, whole, with a note
    and progress counted once."""
    loaded = load_model("resnet18", weights="random", seed=0)
    batch = photos(96)
    reestimate(loaded.module, batch)
    image = batch[:1].contiguous()
    clean = occlusion(loaded, image, window=24, stride=24)
    assert clean.stats.mode == "incremental" and clean.stats.note == ""

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch on a crop")

    monkeypatch.setattr(engine_module, "propagate", broken)
    done: list[int] = []
    result = occlusion(loaded, image, window=24, stride=24, batch_size=5, progress=done.append)
    assert result.stats.mode == "full"
    assert result.stats.note == ("incremental occlusion failed on this model (RuntimeError: shape mismatch on a "
                                 "crop): every copy ran the whole network")
    assert sum(done) == 16
    torch.testing.assert_close(result.probability, clean.probability, rtol=0, atol=1e-6)
    assert torch.equal(result.top_class, clean.top_class)


def test_a_plan_that_cannot_be_made_runs_whole(monkeypatch, images) -> None:
    loaded = load_model("resnet18", weights="random", seed=0)
    reestimate(loaded.module, images)
    image = images[:1, :, :96, :96].contiguous()
    want = occlusion(loaded, image, window=32, stride=32, mode="full")

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(engine_module, "leading_chain", broken)
    result = occlusion(loaded, image, window=32, stride=32)
    assert result.stats.mode == "full"
    assert result.stats.note == ("incremental occlusion does not fit this model (IndexError: list index out of "
                                 "range): every copy ran the whole network")
    torch.testing.assert_close(result.probability, want.probability, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- a reused module as the layer


def naive_last_call(module: nn.Module, layer: nn.Module, image: torch.Tensor, window: int, stride: int,
                    channel: int) -> torch.Tensor:
    """Total of ``channel`` at the layer's last call, one occluded copy per forward."""
    height, width = image.shape[-2:]
    rows, cols = grid_origins(height, window, stride), grid_origins(width, window, stride)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    out = torch.zeros(len(rows), len(cols))
    try:
        with torch.no_grad():
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    copy = image.clone()
                    copy[:, :, r : r + window, c : c + window] = 0.0
                    seen.clear()
                    module(copy)
                    out[i, j] = seen[-1][0, channel].double().sum().float()
    finally:
        handle.remove()
    return out


@pytest.fixture(scope="module")
def resnet50(images):
    loaded = load_model("resnet50", weights="random", seed=0)
    reestimate(loaded.module, images)
    return loaded


@pytest.mark.parametrize("mode", ["exact", "full"])
def test_reused_module_reads_its_last_call(resnet50, images, mode) -> None:
    relu = resnet50.module.get_submodule("layer4.2.relu")  # 512, 512, then 2048 channels
    image = images[:1].contiguous()
    result = occlusion(resnet50, image, window=64, stride=64, fill=0.0, layer="layer4.2.relu", channel=1500,
                       mode=mode)
    assert int(result.channels[0]) == 1500
    want = naive_last_call(resnet50.module, relu, image, 64, 64, 1500)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(result.activation[0], want, rtol=1e-4, atol=1e-4)
    # A channel every call has (3 < 512) is still the last call's, not the first's.
    low = occlusion(resnet50, image, window=64, stride=64, fill=0.0, layer="layer4.2.relu", channel=3, mode=mode)
    torch.testing.assert_close(low.activation[0], naive_last_call(resnet50.module, relu, image, 64, 64, 3),
                               rtol=1e-4, atol=1e-4)


def test_cli_reused_module_layer(tmp_path) -> None:
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from convscope.cli.main import app

    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    result = CliRunner().invoke(app, ["occlusion", str(path), "-m", "resnet50", "-w", "random", "--layer",
                                      "layer4.2.relu", "--channel", "1500", "--window", "112", "--stride", "112",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    record = json.loads((tmp_path / "out" / "occlusion.json").read_text())
    assert json.dumps(record).count('"channel": 1500') >= 1


# ---------------------------------------------------------------- NHWC and token layers


class NHWCNet(nn.Module):
    """A convolution, then a channel mixer on ``(N, H, W, C)`` (the watched layer), then back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Linear(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(self.stem(x).permute(0, 2, 3, 1))  # (N, 32, 32, 6)
        return self.head(torch.tanh(y).mean(dim=(1, 2)))


class TokenNet(nn.Module):
    """Patch tokens plus a class token (the watched layer's first token is not a grid cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.mix = nn.Linear(6, 7)
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, 64, 6)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1) * 40, tokens], dim=1)
        y = self.mix(tokens)  # (N, 65, 7)
        return self.head(torch.tanh(y).mean(dim=1))


def as_nchw_naive(output: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "NHWC":
        return output.permute(0, 3, 1, 2)
    return output[:, 1:].transpose(1, 2).reshape(output.shape[0], output.shape[2], 8, 8)


@pytest.mark.parametrize(("net", "kind", "channel"), [(NHWCNet, "NHWC", 4), (TokenNet, "tokens", 5)])
def test_nhwc_and_token_layers_read_the_channel_axis(net, kind, channel) -> None:
    torch.manual_seed(0)
    module = net().eval()
    loaded = wrap_model(module, preprocess=Preprocess(resize=None, crop=32))
    image = torch.randn(1, 3, 32, 32)
    result = occlusion(loaded, image, window=8, stride=8, fill=0.0, layer="mix", channel=channel)
    assert result.layer_layout is not None and result.layer_layout["layout"] == kind
    want = torch.zeros(4, 4)
    seen: list[torch.Tensor] = []
    handle = module.mix.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            module(image)
            clean = as_nchw_naive(seen[-1], kind)[0, channel].sum()
            for i in range(4):
                for j in range(4):
                    copy = image.clone()
                    copy[:, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8] = 0.0
                    module(copy)
                    want[i, j] = as_nchw_naive(seen[-1], kind)[0, channel].sum()
    finally:
        handle.remove()
    torch.testing.assert_close(result.activation[0], want, rtol=1e-5, atol=1e-5)
    assert float(result.clean_activation[0]) == pytest.approx(float(clean), rel=1e-5, abs=1e-5)
    # The strongest channel by default is counted on the channel axis too (6 or 7 channels).
    default = occlusion(loaded, image, window=8, stride=8, fill=0.0, layer="mix")
    assert 0 <= int(default.channels[0]) < (6 if kind == "NHWC" else 7)


# ---------------------------------------------------------------- outputs that are not scores


class Pair(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        features = self.conv(x)
        logits = self.fc(features.mean(dim=(2, 3)))
        if self.kind == "tuple":
            return logits, features
        if self.kind == "dict":
            return {"logits": logits, "features": features}
        return features


@pytest.mark.parametrize(
    ("kind", "what"),
    [("tuple", "a tuple of 2 tensors"), ("dict", "a dict with keys logits, features"),
     ("map", "a 4-D tensor of shape (1, 4, 30, 30)")],
)
def test_outputs_that_are_not_scores_are_refused_in_one_line(kind, what) -> None:
    loaded = wrap_model(Pair(kind), preprocess=Preprocess(resize=None, crop=32))
    with pytest.raises(BadArgument) as caught:
        occlusion(loaded, torch.randn(1, 3, 32, 32), window=16, stride=16)
    message = str(caught.value)
    assert message.startswith(f"model: returns {what}, not (N, classes) scores"), message
    assert "\n" not in message


# ---------------------------------------------------------------- the sweep


SWEEP = [
    ("torchvision", "regnet_y_400mf"), ("torchvision", "convnext_tiny"), ("torchvision", "swin_t"),
    ("torchvision", "efficientnet_b0"), ("torchvision", "mobilenet_v3_small"), ("torchvision", "densenet121"),
    ("torchvision", "resnet18"), ("timm", "resnet18"), ("timm", "seresnext26d_32x4d"), ("timm", "hrnet_w18_small"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name"), SWEEP, ids=[f"{s}:{n}" for s, n in SWEEP])
def test_sweep_runs_or_refuses_in_one_line(source, name) -> None:
    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        module = timm.create_model(name, pretrained=False)
    else:
        module = getattr(torchvision.models, name)(weights=None)
    module.eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    try:
        result = occlusion(module, image, window=112, stride=112)
    except ConvscopeError as exc:  # a refusal is one line
        assert "\n" not in str(exc)
        return
    full = occlusion(module, image, window=112, stride=112, mode="full")
    assert result.probability.shape == (1, 2, 2)
    torch.testing.assert_close(result.probability, full.probability, rtol=1e-4, atol=1e-6)
    assert (result.stats.mode == "full") == (result.stats.incremental_layers == ())
    if name in ("regnet_y_400mf", "seresnext26d_32x4d", "hrnet_w18_small"):  # shortcut convolutions
        assert result.stats.note.startswith("incremental occlusion does not fit this model")

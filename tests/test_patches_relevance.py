"""Relevance-ranked dataset patches (issue 19, item 3; Concept Relevance Propagation): the streaming
miner against a one-image-at-a-time brute force, the conditional relevance maps against a masked
LRP pass, resume and its refusals, and the ``convscope patches --rank relevance`` command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import shapes_folder

from convscope.dataset.patches import collect_patches, conditional_relevance, top_patches
from convscope.dataset.sources import open_source
from convscope.dataset.state import claim_state_folder
from convscope.errors import BadArgument, BadTarget
from convscope.models.load import load_model
from convscope.probes.geometry import cell_box, layer_geometry
from convscope.probes.lrp_rules import box_bounds, lrp_rules

LAYERS = ["conv2", "conv4"]


@pytest.fixture(scope="module")
def zfnet():
    return load_model("zfnet_mnist", "random", seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """45 grey 28x28 images in three folders (bars, blobs, frames), each with its own noise."""
    return shapes_folder(tmp_path_factory.mktemp("shapes"), per_class=15)


@pytest.fixture(scope="module")
def images(zfnet, folder) -> torch.Tensor:
    return open_source(str(folder), zfnet.preprocess).load(list(range(45)))


@contextmanager
def one_thread() -> Iterator[None]:
    """For the one-image reference passes on a 28x28 net: handing such small work between threads
    costs more than the work (by far on a shared machine). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rules(loaded, composite: str):
    if composite == "epsilon-gamma-box":
        low, high = box_bounds(loaded.preprocess.mean, loaded.preprocess.std)
        return lrp_rules(loaded.module, composite, low=low, high=high)
    return lrp_rules(loaded.module, composite)


def lrp_one(loaded, image: torch.Tensor, target: int | str, composite: str, layers: list[str],
            mask: tuple[str, int] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One image alone: the relevance at each layer's output and at the input. ``mask`` keeps one
    channel of one layer (a tensor hook on its output's gradient, zennit-crp's way)."""
    modules = dict(loaded.module.named_modules())
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            kept[name] = output
            if mask is not None and mask[0] == name:
                only = torch.zeros_like(output)
                only[:, mask[1]] = 1.0
                output.register_hook(lambda grad: grad * only)
        return hook

    handles = [modules[loaded.stages[name]].register_forward_hook(keep(name)) for name in layers]
    loaded.module.eval()
    try:
        with one_thread(), rules(loaded, composite):
            x = image[None].clone().requires_grad_(True)
            logits = loaded.module(x)
            explained = int(logits.argmax()) if target == "predicted" else int(target)
            seed = torch.zeros_like(logits)
            seed[0, explained] = logits[0, explained].detach()
            grads = torch.autograd.grad(logits, [*(kept[name] for name in layers), x], grad_outputs=seed)
    finally:
        for handle in handles:
            handle.remove()
    return [g[0].detach() for g in grads[:-1]], grads[-1][0].detach()


def brute_force(loaded, images: torch.Tensor, target: int | str, composite: str, top: int) -> dict[str, Any]:
    """Every image's channel relevance (its relevance summed over the map) and most relevant cell,
    one image at a time; per channel sorted by (-value, image)."""
    per_layer: dict[str, list[list[tuple[float, int, tuple[int, int]]]]] = {}
    for i in range(len(images)):
        relevance, _ = lrp_one(loaded, images[i], target, composite, LAYERS)
        for name, maps in zip(LAYERS, relevance, strict=True):
            rows = per_layer.setdefault(name, [[] for _ in range(maps.shape[0])])
            width = maps.shape[2]
            for c in range(maps.shape[0]):
                plane = maps[c]
                flat = int(torch.nonzero(plane.flatten() == plane.max())[0, 0])  # first in row-major order
                rows[c].append((float(plane.sum()), i, (flat // width, flat % width)))
    return {name: [sorted(row, key=lambda t: (-t[0], t[1]))[:top] for row in rows] for name, rows in per_layer.items()}


@pytest.mark.parametrize("target,composite", [(3, "epsilon-plus-flat"), ("predicted", "epsilon-gamma-box")])
def test_relevance_ranking_equals_brute_force(zfnet, folder, images, target, composite) -> None:
    index = top_patches(zfnet, str(folder), LAYERS, top=6, batch_size=8, rank="relevance", target=target,
                        composite=composite)
    expected = brute_force(zfnet, images, target, composite, top=6)
    assert index.rank == "relevance" and index.target == target and index.composite == composite
    assert index.images == 45
    moved = 0
    for name in LAYERS:
        geometry = layer_geometry(zfnet.module, images[:1], zfnet.stages[name])
        assert len(index.layers[name]) == len(expected[name]) == (64 if name == "conv2" else 96)
        for got, want in zip(index.layers[name], expected[name], strict=True):
            assert [e.index for e in got] == [i for _, i, _ in want], name
            torch.testing.assert_close(torch.tensor([e.value for e in got]), torch.tensor([v for v, _, _ in want]),
                                       rtol=1e-4, atol=1e-9)
            assert [e.cell for e in got] == [cell for _, _, cell in want]
            for entry in got:
                top_, left, bottom, right = cell_box(geometry, *entry.cell, (28, 28))
                assert entry.box == (left, top_, right, bottom)
        # Not the activation ranking under another name: some channel's list differs from it.
        activation = top_patches(zfnet, images, [name], top=6, batch_size=45)
        moved += sum([e.index for e in a] != [e.index for e in r]
                     for a, r in zip(activation.layers[name], index.layers[name], strict=True))
    assert moved > 0


def test_conditional_maps_equal_a_masked_lrp_pass(zfnet, images) -> None:
    index = top_patches(zfnet, images, ["conv4"], top=3, channels=[1, 7, 40], batch_size=16, rank="relevance",
                        target=5)
    got = list(collect_patches(zfnet, images, index, batch_size=4))  # batches mix channels and images
    assert [(p.layer, p.channel) for p in got] == [("conv4", 1), ("conv4", 7), ("conv4", 40)]
    for patches in got:
        assert patches.projections is not None
        for entry, projection in zip(patches.entries, patches.projections, strict=True):
            relevance, heatmap = lrp_one(zfnet, images[entry.index], 5, "epsilon-plus-flat", ["conv4"],
                                         mask=("conv4", patches.channel))
            x0, y0, x1, y1 = entry.box
            assert projection.shape == (1, y1 - y0, x1 - x0)
            torch.testing.assert_close(projection, heatmap[:, y0:y1, x0:x1], rtol=1e-4, atol=1e-10)
            assert entry.value == pytest.approx(float(relevance[0][patches.channel].sum()), rel=1e-4)
        # The random weights have no biases (BatchNorm at its initial statistics), so the map at the
        # input conserves the channel's relevance, its ranking value.
        rows = [entry.index for entry in patches.entries]
        whole_maps = conditional_relevance(zfnet, images[rows], "conv4", torch.full((len(rows),), patches.channel), 5)
        torch.testing.assert_close(whole_maps.sum(dim=(1, 2, 3)), torch.tensor([e.value for e in patches.entries]),
                                   rtol=1e-4, atol=1e-10)
    # One image, several channels in one batch: each row keeps its own channel.
    image = images[got[0].entries[0].index]
    maps = conditional_relevance(zfnet, image[None].repeat(3, 1, 1, 1), "conv4", torch.tensor([1, 7, 40]), 5)
    _, whole = lrp_one(zfnet, image, 5, "epsilon-plus-flat", ["conv4"])
    assert not torch.allclose(maps[0], maps[1]) and maps.abs().amax() > 0
    # Propagation is linear in the relevance: the maps of all channels add up to the plain LRP map.
    every = conditional_relevance(zfnet, image[None].repeat(96, 1, 1, 1), "conv4", torch.arange(96), 5)
    torch.testing.assert_close(every.sum(0), whole, rtol=1e-3, atol=1e-9)


def test_resume_after_an_interrupt_finishes_the_same(zfnet, images, tmp_path) -> None:
    settings: dict[str, Any] = {"top": 4, "batch_size": 5, "rank": "relevance", "target": "predicted"}
    images = images[:23]  # the last batch holds 3 images
    whole = top_patches(zfnet, images, LAYERS, **settings)
    seen: list[int] = []

    def interrupt_after_three(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        top_patches(zfnet, images, LAYERS, progress=interrupt_after_three, checkpoint=tmp_path,
                    checkpoint_every=100, **settings)
    saved = torch.load(tmp_path / "state-rank0-of-1.pt", weights_only=True)
    assert saved["position"] == 15 and saved["config"]["ranking"] == "relevance"
    resumed = top_patches(zfnet, images, LAYERS, checkpoint=tmp_path, resume=True, **settings)
    assert resumed == whole


def test_resume_refuses_another_target_composite_or_ranking(zfnet, images, tmp_path) -> None:
    first = top_patches(zfnet, images[:10], ["conv2"], top=3, batch_size=4, checkpoint=tmp_path, rank="relevance",
                        target=3)
    again = top_patches(zfnet, images[:10], ["conv2"], top=3, batch_size=4, checkpoint=tmp_path, resume=True,
                        rank="relevance", target="Dress")  # class 3 by its name: the same run
    assert again == first and again.label == "Dress"
    changes = [
        ({"rank": "relevance", "target": 4}, r"other settings \(target: 3, now 4\)"),
        ({"rank": "relevance", "target": "predicted"}, r"other settings \(target: 3, now 'predicted'\)"),
        ({"rank": "relevance", "target": 3, "composite": "epsilon-alpha2-beta1"}, r"other settings \(composite"),
        ({}, r"other settings \(ranking: 'relevance', now 'activation'\)"),
    ]
    for change, message in changes:
        with pytest.raises(BadArgument, match=message) as caught:
            top_patches(zfnet, images[:10], ["conv2"], top=3, batch_size=4, checkpoint=tmp_path, resume=True,
                        **change)
        assert "\n" not in str(caught.value)


def test_ranking_arguments_are_checked_before_mining(zfnet, images) -> None:
    with pytest.raises(BadArgument, match="--target: is required with --rank relevance"):
        top_patches(zfnet, images, ["conv2"], rank="relevance")
    with pytest.raises(BadArgument, match="--target: only applies to --rank relevance"):
        top_patches(zfnet, images, ["conv2"], target=3)
    with pytest.raises(BadArgument, match="--rank relevanse: must be one of activation, relevance"):
        top_patches(zfnet, images, ["conv2"], rank="relevanse", target=3)
    with pytest.raises(BadArgument, match="--composite epsilon-plus: must be one of"):
        top_patches(zfnet, images, ["conv2"], rank="relevance", target=3, composite="epsilon-plus")
    with pytest.raises(BadTarget, match="--target 10: is out of range"):
        top_patches(zfnet, images, ["conv2"], rank="relevance", target=10)
    with pytest.raises(BadTarget, match="--target Sweater: is not a class of zfnet_mnist"):
        top_patches(zfnet, images, ["conv2"], rank="relevance", target="Sweater")


# -- the command -----------------------------------------------------------------------------------

COMMAND = ["patches", "--model", "zfnet_mnist", "--weights", "random", "--seed", "3", "--layer", "conv2",
           "--channels", "0-3", "--top", "4", "-b", "16", "--device", "cpu"]


def run_cli(*args: object) -> Any:
    from typer.testing import CliRunner

    from convscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result: Any) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output
    return str(lines[0])


def test_cli_writes_the_rank_and_the_relevance_pictures(zfnet, folder, tmp_path) -> None:
    out = tmp_path / "relevance"
    done = run_cli(*COMMAND[:1], folder, *COMMAND[1:], "--rank", "relevance", "--target", "predicted", "-o", out)
    assert done.exit_code == 0, (done.output, done.exception)
    document = json.loads((out / "patches.json").read_text())
    assert (document["rank"], document["target"], document["composite"]) == ("relevance", "predicted",
                                                                             "epsilon-plus-flat")
    library = top_patches(zfnet, str(folder), ["conv2"], top=4, channels=[0, 1, 2, 3], batch_size=16,
                          rank="relevance", target="predicted")
    assert document == json.loads(json.dumps(library.to_json()))
    assert all((out / "conv2" / f"channel_{c}.png").is_file() for c in range(4))
    assert "conditional relevance map" in (out / "index.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["rank"] == "relevance" and manifest["options"]["target"] == "predicted"

    plain = run_cli(*COMMAND[:1], folder, *COMMAND[1:], "--no-projections", "-o", tmp_path / "activation")
    assert plain.exit_code == 0, (plain.output, plain.exception)
    document = json.loads((tmp_path / "activation" / "patches.json").read_text())
    assert document["rank"] == "activation" and "target" not in document and "composite" not in document


def test_cli_ranking_errors_are_one_line(zfnet, folder, tmp_path) -> None:
    line = one_line(run_cli(*COMMAND[:1], folder, *COMMAND[1:], "--rank", "relevance", "-o", tmp_path / "a"))
    assert line.startswith("error: --target: is required with --rank relevance")
    line = one_line(run_cli(*COMMAND[:1], folder, *COMMAND[1:], "--target", "3", "-o", tmp_path / "b"))
    assert line.startswith("error: --target: only applies to --rank relevance")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work

    # A run stopped by Ctrl-C, resumed with another class: refused in one line, its state kept.
    out = tmp_path / "stopped"
    state = out / ".patches-state"
    claim_state_folder(state)
    calls: list[int] = []

    def stop(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        top_patches(zfnet, str(folder), ["conv2"], top=4, channels=[0, 1, 2, 3], batch_size=16, progress=stop,
                    checkpoint=state, rank="relevance", target=3)
    line = one_line(run_cli(*COMMAND[:1], folder, *COMMAND[1:], "--rank", "relevance", "--target", "4",
                            "--resume", "-o", out))
    assert "other settings (target: 3, now 4)" in line and "without --resume" in line
    assert (state / "state-rank0-of-1.pt").is_file()


def test_layers_without_an_lrp_rule_are_recorded() -> None:
    from torch import nn

    from convscope.models.load import wrap_model
    from convscope.preprocess import Preprocess

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = wrap_model(net, preprocess=Preprocess(None, 16, (0.5,) * 3, (0.5,) * 3), categories=list("abcd"))
    index = top_patches(model, torch.randn(6, 3, 16, 16), ["4"], top=2, rank="relevance", target="predicted")
    assert index.uncovered == ("1",) and index.to_json()["uncovered"] == ["1"]
    plain = top_patches(load_model("zfnet_mnist", "random"), torch.randn(3, 1, 28, 28), ["conv2"], top=2,
                        rank="relevance", target=0)
    assert plain.uncovered == () and plain.to_json()["uncovered"] == []

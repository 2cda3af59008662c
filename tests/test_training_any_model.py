"""`convscope train --arch torchvision:NAME / timm:NAME`: the head found from the graph and replaced,
--freeze features from the graph, --weights pretrained|random|FILE, checkpoints that record the spec
(classify, load_model and --resume rebuild the same network), and the run-folder safety of any run.

Runs are tiny: 2 classes x 4 photos cropped from skimage, one epoch, batch 4."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convscope.errors import BadArgument, WeightsUnavailable
from convscope.models.load import load_model
from convscope.training.transfer import classifier_graph, freeze_prefix, replace_head

QUICK = ["--epochs", "1", "-b", "4", "--val-split", "0.25"]


@pytest.fixture(scope="module")
def cli():
    import convscope.cli.train_cmd  # noqa: F401  (registers train/evaluate/ablate)
    from convscope.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes (cat, coffee) of four 160-pixel crops each."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos") / "photos"
    for name, photo in (("cat", data.chelsea()), ("coffee", data.coffee())):
        (root / name).mkdir(parents=True)
        for i in range(4):
            y, x = 20 * i, 40 * i
            Image.fromarray(np.ascontiguousarray(photo[y:y + 160, x:x + 160])).save(root / name / f"{i}.png")
    return root


def _one_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def mobilenet_run(cli, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("mobilenet") / "run"
    done = cli("train", "--data", photos, "--arch", "torchvision:mobilenet_v3_small", "--weights", "random",
               *QUICK, "-o", run, "--json")
    assert done.exit_code == 0, done.output
    return run, json.loads(done.stdout)


# -- torchvision: random weights, the spec in the checkpoint ---------------------------------------


def test_torchvision_run_records_the_spec_and_reloads(cli, mobilenet_run, photos: Path) -> None:
    run, payload = mobilenet_run
    assert payload["arch"] == "torchvision:mobilenet_v3_small" and payload["head"] == "classifier.3"
    assert payload["frozen"] is None
    saved = torch.load(run / "best.pt", weights_only=True)
    assert saved["arch"] == "torchvision:mobilenet_v3_small"
    assert saved["categories"] == ["cat", "coffee"]
    assert saved["state_dict"]["classifier.3.weight"].shape == (2, 1024)
    assert saved["preprocess"]["crop"] == 224 and saved["preprocess"]["channels"] == 3
    result = json.loads((run / "result.json").read_text())
    assert result["arch"] == "torchvision:mobilenet_v3_small" and result["head"] == "classifier.3"

    loaded = load_model(weights=run / "best.pt")
    assert loaded.name == "torchvision:mobilenet_v3_small" and loaded.categories == ("cat", "coffee")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = loaded.module(x)
    assert out.shape == (1, 2)
    # The same weights: the checkpoint's head, not a fresh one.
    assert torch.equal(loaded.module.state_dict()["classifier.3.weight"], saved["state_dict"]["classifier.3.weight"])
    again = load_model("torchvision:mobilenet_v3_small", run / "best.pt")
    with torch.no_grad():
        assert torch.equal(again.module(x), out)

    shown = cli("classify", "--weights", run / "best.pt", photos / "cat" / "0.png")
    assert shown.exit_code == 0, shown.output
    assert "cat" in shown.output and "coffee" in shown.output


def test_torchvision_run_folder_stays_safe(cli, mobilenet_run, photos: Path, tmp_path: Path) -> None:
    run, _ = mobilenet_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    again = cli("train", "--data", photos, "--arch", "torchvision:mobilenet_v3_small", *QUICK, "-o", copy)
    assert re.fullmatch(r"error: .*holds an earlier run .*use --resume to continue it or --overwrite to replace it",
                        _one_error(again))
    other = cli("train", "-o", copy, "--resume", "--arch", "timm:resnet18")
    assert "not of 'timm:resnet18'" in _one_error(other)
    run_json = json.loads((copy / "run.json").read_text())
    assert run_json["format"] == "convscope-run" and "best.pt" in run_json["files"]


# -- pretrained offline: load_model's one line -------------------------------------------------------


@pytest.mark.parametrize("arch", ["torchvision:mobilenet_v3_small", "timm:resnet18"])
def test_pretrained_offline_is_load_models_one_line(cli, photos: Path, tmp_path: Path, arch: str) -> None:
    with pytest.raises(WeightsUnavailable) as raised:
        load_model(arch, "pretrained")
    result = cli("train", "--data", photos, "--arch", arch, "--weights", "pretrained", *QUICK, "-o", tmp_path / "r")
    line = _one_error(result)
    assert line == f"error: {raised.value}"
    assert "--weights FILE" in line and "http" in line
    assert not [p for p in (tmp_path / "r").glob("*") if p.name != ".convscope.lock"]


# -- timm: a weights file, --freeze features, resume ---------------------------------------------------


def test_timm_weights_file_freeze_features_and_resume(cli, photos: Path, tmp_path: Path) -> None:
    import timm

    photos = Path(shutil.copytree(photos, tmp_path / "photos"))  # this test changes them

    torch.manual_seed(3)
    source = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so "kept" means something
        for name, buffer in source.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    weights = tmp_path / "r18.pth"
    torch.save(source.state_dict(), weights)
    original = {k: v.clone() for k, v in source.state_dict().items()}

    run = tmp_path / "run"
    done = cli("train", "--data", photos, "--arch", "timm:resnet18", "--weights", weights, "--freeze", "features",
               *QUICK, "-o", run, "--json")
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)
    frozen = payload["frozen"]
    assert frozen["head"] == "fc" and frozen["trains_from"] == "fc" and frozen["mode"] == "features"
    assert frozen["frozen_modules"][:2] == ["conv1", "bn1"] and "layer4" in frozen["frozen_modules"]
    assert frozen["trainable_parameters"] == 512 * 2 + 2 == payload["trainable_parameters"]
    assert json.loads((run / "result.json").read_text())["frozen"] == frozen

    after = torch.load(run / "last.pt", weights_only=True)
    assert after["arch"] == "timm:resnet18"
    for key, value in original.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(after["state_dict"][key], value), key  # the backbone, bit for bit
    assert after["state_dict"]["fc.weight"].shape == (2, 512)

    resumed = cli("train", "-o", run, "--resume", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 2/2" in resumed.output
    extended = torch.load(run / "last.pt", weights_only=True)
    assert extended["epoch"] == 2
    assert torch.equal(extended["state_dict"]["layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])
    assert not torch.equal(extended["state_dict"]["fc.weight"], after["state_dict"]["fc.weight"])
    loaded = load_model(weights=run / "last.pt")
    assert loaded.name == "timm:resnet18" and loaded.categories == ("cat", "coffee")

    # The data changed since the run started: resume refuses.
    (photos / "cat" / "0.png").touch()
    refused = cli("train", "-o", run, "--resume", "--epochs", "3")
    assert "the data changed since the run started" in _one_error(refused)


# -- a 1x1 convolution head (SqueezeNet): trained, saved, rebuilt -------------------------------------------


def test_squeezenet_conv_head_trains_and_reloads(photos: Path, tmp_path: Path) -> None:
    from convscope.training import TrainConfig, train

    result = train(TrainConfig(data=str(photos), out_dir=str(tmp_path / "sq"), arch="torchvision:squeezenet1_1",
                               epochs=1, batch_size=4, val_split=0.25, init_from="random"))
    assert result.head == "classifier.1" and result.config.init_from is None
    saved = torch.load(result.best_checkpoint, weights_only=True)
    assert saved["state_dict"]["classifier.1.weight"].shape == (2, 512, 1, 1)
    loaded = load_model(weights=result.best_checkpoint)
    with torch.no_grad():
        assert loaded.module(torch.rand(1, 3, 224, 224)).shape == (1, 2)


# -- the head and the backbone, from the graph ------------------------------------------------------------


@pytest.mark.parametrize(("name", "head", "features_end"), [
    ("resnet18", "fc", "fc"),
    ("squeezenet1_1", "classifier.1", "classifier.1"),
    ("mobilenet_v3_small", "classifier.3", "classifier.0"),
    ("shufflenet_v2_x0_5", "fc", "fc"),
    ("mnasnet0_5", "classifier.1", "classifier.1"),
    ("efficientnet_b0", "classifier.1", "classifier.1"),
])
def test_graph_head_is_what_num_classes_builds(name: str, head: str, features_end: str) -> None:
    from torchvision.models import get_model_builder

    builder = get_model_builder(name)
    torch.manual_seed(0)
    module = builder(weights=None)
    graph = classifier_graph(module, (3, 224, 224), name)
    assert (graph.head, graph.features_end, graph.classes) == (head, features_end, 1000)
    assert replace_head(module, 3, (3, 224, 224), name) == head
    reference = builder(weights=None, num_classes=3)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_freeze_modes_from_the_graph() -> None:
    from torchvision.models import mobilenet_v3_small

    module = mobilenet_v3_small(weights=None)
    frozen = freeze_prefix(module, "features", (3, 224, 224))
    assert frozen.boundary == "classifier.0" and frozen.modules == ("features", "avgpool")
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"}
    module = mobilenet_v3_small(weights=None)
    last = freeze_prefix(module, "all-but-last", (3, 224, 224))
    assert last.boundary == "classifier.3" and "classifier.0" in last.modules
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"classifier.3.weight", "classifier.3.bias"}
    module.train()
    last.hold_eval(module)
    assert not module.classifier[0].training and not module.features.training and module.classifier[3].training


def test_a_model_without_a_classifier_head_is_refused() -> None:
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x).mean((2, 3)))

    with pytest.raises(BadArgument, match=r"^net: its last layer with parameters, norm \(LayerNorm\), is not a Linear"):
        replace_head(Pooled(), 2, (3, 32, 32), "net")


# -- refusals, one line each ---------------------------------------------------------------------------------


def test_refusals(cli, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    line = _one_error(cli("train", "--data", photos, "--arch", "net.py:make", *QUICK, "-o", out))
    assert line.startswith("error: --arch net.py:make: training takes a built-in architecture, torchvision:NAME or timm:NAME")
    line = _one_error(cli("train", "--data", photos, "--arch", "torchvision:resnet", *QUICK, "-o", out))
    assert line.startswith("error: torchvision:resnet: is not a torchvision classification model")
    line = _one_error(cli("train", "--data", photos, "--arch", "torchvision:googlenet", "--weights", "random", *QUICK,
                          "-o", out))
    assert "auxiliary classifiers" in line
    line = _one_error(cli("train", "--data", photos, "--arch", "timm:resnet18", "--weights", "random",
                          "--from", "pretrained", *QUICK, "-o", out))
    assert line.startswith("error: --weights: and --from pretrained both say what to start from")
    line = _one_error(cli("train", "--data", photos, "--arch", "timm:resnet18", "--freeze", "features", *QUICK,
                          "-o", out))
    assert line == "error: --freeze features: freezing needs learned features to keep (add --from CKPT or --from pretrained)"
    assert not [p for p in out.glob("*") if p.name != ".convscope.lock"]

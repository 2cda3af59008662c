"""Model specs: one grammar for --model (built-in, torchvision:, timm:, factories, .pt2) and --weights."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import skimage_photo
from torch import nn
from typer.testing import CliRunner

from convscope.cli.main import app
from convscope.errors import (
    BadArgument,
    BadWeightsFile,
    ConvscopeError,
    UnknownLayer,
    UnknownModel,
    WeightsUnavailable,
)
from convscope.models.external import parse_model_spec
from convscope.models.load import load_model, logits_of, wrap_model
from convscope.preprocess import Preprocess

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, pattern: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def one_line(exc: ConvscopeError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """No cached weights: torch hub's cache in an empty folder, the network off."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("CONVSCOPE_OFFLINE", "1")
    return home


# ---------------------------------------------------------------- the grammar


@pytest.mark.parametrize(("text", "kind", "target", "function"), [
    ("alexnet", "builtin", "alexnet", ""),
    ("torchvision:resnet18", "torchvision", "resnet18", ""),
    ("timm:vit_small_patch16_224.augreg_in21k", "timm", "vit_small_patch16_224.augreg_in21k", ""),
    ("nets/my_net.py:build", "file", "nets/my_net.py", "build"),
    ("pkg.models:make_net", "module", "pkg.models", "make_net"),
    ("exported/model.PT2", "export", "exported/model.PT2", ""),
])
def test_spec_kinds(text, kind, target, function):
    request = parse_model_spec(text)
    assert (request.kind, request.target, request.function, request.text) == (kind, target, function, text)


# ---------------------------------------------------------------- torchvision and timm


def test_torchvision_random_is_torchvisions_model_with_its_preprocessing():
    import torchvision

    loaded = load_model("torchvision:regnet_y_400mf", "random", seed=3, device="cpu")
    assert loaded.name == "torchvision:regnet_y_400mf"
    assert loaded.spec is None
    assert loaded.weights == "random (seed 3)"
    # RegNet_Y_400MF_Weights.IMAGENET1K_V2: resize 232, crop 224, ImageNet mean/std
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (232, 224)
    assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert len(loaded.categories) == 1000 and loaded.categories[0] == "tench"
    assert loaded.cam_layer and loaded.cam_layer in dict(loaded.module.named_modules())
    assert len(loaded.stages) >= 4
    torch.manual_seed(3)
    reference = torchvision.models.regnet_y_400mf(weights=None)
    ours = loaded.module.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())


def test_torchvision_mobilenet_v3_small_runs():
    loaded = load_model("torchvision:mobilenet_v3_small", "random", device="cpu")
    assert loaded.spec is None and loaded.name == "torchvision:mobilenet_v3_small"
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (256, 224)
    x = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        assert loaded.module(x).shape == (2, 1000)
    assert not loaded.module.training


def test_timm_random_takes_preprocessing_from_pretrained_cfg():
    timm = pytest.importorskip("timm")
    loaded = load_model("timm:resnet18", "random", seed=1, device="cpu")
    assert loaded.name == "timm:resnet18" and loaded.spec is None
    cfg = timm.create_model("resnet18").pretrained_cfg
    assert loaded.preprocess.crop == cfg["input_size"][1] == 224
    assert loaded.preprocess.resize == int(224 / cfg["crop_pct"])  # crop_pct 0.95 -> 235
    assert loaded.preprocess.mean == pytest.approx(cfg["mean"])
    # stages from timm's feature_info
    assert list(loaded.stages.values())[-4:] == ["layer1", "layer2", "layer3", "layer4"]
    assert loaded.cam_layer == "layer4"
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False).state_dict()
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in reference.items())


def test_unknown_torchvision_and_timm_names_suggest_close_ones():
    with pytest.raises(UnknownModel) as caught:
        load_model("torchvision:resnet1", "random", device="cpu")
    assert "did you mean: torchvision:resnet18" in one_line(caught.value)
    with pytest.raises(UnknownModel) as caught:
        load_model("timm:resnt18", "random", device="cpu")
    assert "timm:resnet18" in one_line(caught.value)
    with pytest.raises(UnknownModel) as caught:
        load_model("torchvison:resnet18", "random", device="cpu")
    assert "did you mean torchvision:NAME" in one_line(caught.value)


def test_pretrained_offline_is_one_line_naming_the_url_and_cache(empty_torch_home):
    with pytest.raises(WeightsUnavailable) as caught:
        load_model("torchvision:resnet18", device="cpu")  # default weights: pretrained
    message = one_line(caught.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights FILE" in message and "--weights random" in message
    with pytest.raises(WeightsUnavailable) as caught:
        load_model("timm:resnet18", "pretrained", device="cpu")
    assert "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in one_line(caught.value)


def test_weights_file_for_torchvision_spec_and_a_finetuned_head(tmp_path):
    import torchvision

    torch.manual_seed(5)
    trained = torchvision.models.resnet18(weights=None).eval()
    torch.save(trained.state_dict(), tmp_path / "r18.pth")
    loaded = load_model("torchvision:resnet18", tmp_path / "r18.pth", device="cpu")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), trained(x))
    assert loaded.weights == str(tmp_path / "r18.pth")
    tuned = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(tuned.state_dict(), tmp_path / "ten.pth")
    loaded = load_model("torchvision:resnet18", tmp_path / "ten.pth", device="cpu")
    assert loaded.categories == tuple(f"class {i}" for i in range(10))


# ---------------------------------------------------------------- factories


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    import convscope


    class Net(nn.Module):
        def __init__(self, classes=5):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(16, classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))


    class TwoHeads(Net):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(16, 2)

        def forward(self, x):
            pooled = self.features(x).mean((2, 3))
            return self.head(pooled), self.aux(pooled)


    def make():
        torch.manual_seed(0)
        return Net()


    def make_loaded():
        return convscope.wrap_model(make(), categories=list("abcde"), preprocess=convscope.Preprocess(resize=72, crop=64))


    def two_heads():
        torch.manual_seed(0)
        return TwoHeads()


    def broken():
        raise ValueError("no such checkpoint")


    def not_a_model():
        return 42
''')


@pytest.fixture
def factory_file(tmp_path) -> Path:
    path = tmp_path / "my_nets.py"
    path.write_text(FACTORY)
    return path


def test_factory_file_returning_a_module(factory_file):
    loaded = load_model(f"{factory_file}:make", device="cpu")
    assert loaded.name == f"{factory_file}:make" and loaded.spec is None
    assert loaded.categories == tuple(f"class {i}" for i in range(5))  # measured: 5 outputs
    assert loaded.weights == "as built by the factory"
    assert loaded.cam_layer == "features.4" and "features.4" in loaded.stages.values()
    assert loaded.first_conv == "features.0"
    random = load_model(f"{factory_file}:make", "random", seed=2, device="cpu")
    assert not torch.equal(random.module.head.weight, loaded.module.head.weight)


def test_factory_file_returning_a_loaded_model(factory_file):
    loaded = load_model(f"{factory_file}:make_loaded", device="cpu")
    assert loaded.categories == tuple("abcde")
    assert loaded.preprocess.crop == 64
    assert loaded.name == f"{factory_file}:make_loaded"  # the wrap was named "custom"


def test_package_module_factory(factory_file, monkeypatch):
    monkeypatch.chdir(factory_file.parent)  # like uvicorn, the current folder imports
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    loaded = load_model("my_nets:make", device="cpu")
    assert loaded.name == "my_nets:make" and len(loaded.categories) == 5
    sys.modules.pop("my_nets", None)


@pytest.mark.parametrize(("suffix", "error", "words"), [
    (":broken", BadArgument, "the factory raised ValueError: no such checkpoint (at my_nets.py:"),
    (":not_a_model", BadArgument, "returned int 42, not an nn.Module or a LoadedModel"),
    (":mkae", UnknownModel, "has no function 'mkae' (did you mean: make"),
])
def test_factory_errors_are_one_line(factory_file, suffix, error, words):
    with pytest.raises(error) as caught:
        load_model(f"{factory_file}{suffix}", device="cpu")
    assert words in one_line(caught.value)


def test_factory_missing_file_and_module(tmp_path):
    with pytest.raises(UnknownModel, match="no such file"):
        load_model(f"{tmp_path}/absent.py:make", device="cpu")
    with pytest.raises(UnknownModel, match="no module named no_such_package_xyz"):
        load_model("no_such_package_xyz.models:make", device="cpu")


# ---------------------------------------------------------------- output_index


def test_output_index_selects_without_changing_paths(factory_file):
    plain = load_model(f"{factory_file}:two_heads", device="cpu")
    x = torch.zeros(1, 3, 224, 224)
    with pytest.raises(BadArgument) as caught:
        logits_of(plain, plain.module(x))
    assert one_line(caught.value).endswith(
        "returns a tuple of 2 tensors; pick the logits with --output-index N / output_index=N")

    loaded = load_model(f"{factory_file}:two_heads", output_index=0, device="cpu")
    assert [n for n, _ in loaded.module.named_modules()] == [n for n, _ in plain.module.named_modules()]
    assert list(loaded.module.state_dict()) == list(plain.module.state_dict())
    assert loaded.module.get_submodule("features.0") is not None
    assert loaded.categories == tuple(f"class {i}" for i in range(5))  # measured on output 0
    with torch.no_grad():
        assert torch.equal(logits_of(loaded, loaded.module(x)), plain.module(x)[0])
    loaded.module.train()
    assert loaded.module.training and loaded.module.inner.training
    loaded.module.eval()
    assert not loaded.module.inner.training
    with pytest.raises(BadArgument, match="positions are 0..1"):
        load_model(f"{factory_file}:two_heads", output_index=2, device="cpu")


def test_output_index_on_a_dict(tmp_path):
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(self.conv(x).mean((2, 3))), "features": x}

    loaded = wrap_model(Heads(), output_index="logits", categories=["a", "b", "c"],
                        preprocess=Preprocess(resize=None, crop=32))
    assert loaded.module(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


# ---------------------------------------------------------------- wrap_model


def test_wrap_model_checks_categories_and_layers(tiny_cnn):
    size = Preprocess(resize=None, crop=16)
    with pytest.raises(BadArgument) as caught:
        wrap_model(tiny_cnn, preprocess=size, categories=["a", "b"])
    assert "has 2 names but custom has 5 outputs" in one_line(caught.value)
    loaded = wrap_model(tiny_cnn, preprocess=size, categories=list("abcde"), cam_layer="conv1",
                        stages=["conv1", "conv2"])
    assert loaded.cam_layer == "conv1" and loaded.stages == {"stage1": "conv1", "stage2": "conv2"}
    with pytest.raises(UnknownLayer, match="cam_layer conv9"):
        wrap_model(tiny_cnn, preprocess=size, cam_layer="conv9")
    with pytest.raises(UnknownLayer, match="is not a module path"):
        wrap_model(tiny_cnn, preprocess=size, stages={"early": "nope"})


# ---------------------------------------------------------------- torch.export archives


def test_pt2_archive_keeps_layer_names_and_outputs(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "net.pt2")

    loaded = load_model(str(tmp_path / "net.pt2"), device="cpu")
    assert loaded.spec is None and loaded.name == str(tmp_path / "net.pt2")
    assert loaded.preprocess.crop == 64
    assert "torch.export" in loaded.weights
    names = {n for n, _ in loaded.module.named_modules()}
    assert {"0", "1", "2", "3", "3.0", "6"} <= names
    assert loaded.module.original_types["3.0"] == "torch.nn.modules.conv.Conv2d"
    assert loaded.first_conv == "0"
    assert loaded.cam_layer == "3"
    seen = []
    handle = loaded.module.get_submodule("3.0").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            out = loaded.module(x)
    finally:
        handle.remove()
    assert seen == [(1, 8, 32, 32)]  # the hook fires: the submodule's forward runs
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-6)
    with pytest.raises(ConvscopeError) as caught:
        loaded.module(torch.randn(2, 3, 64, 64))
    assert "exported for batches of one image only" in one_line(caught.value)
    with pytest.raises(BadArgument, match="holds its own weights"):
        load_model(str(tmp_path / "net.pt2"), "random", device="cpu")


# ---------------------------------------------------------------- refused files


def test_whole_model_pickle_and_torchscript_are_refused(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    torch.save(model, tmp_path / "whole.pt")
    result = run("layers", "--model", "torchvision:resnet18", "--weights", tmp_path / "whole.pt")
    line = assert_one_line_error(result, "whole pickled model (torchvision.models.resnet.ResNet")
    assert "model.state_dict()" in line and ".pt2" in line

    script = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    torch.jit.save(script, tmp_path / "scripted.pt")
    with pytest.raises(BadWeightsFile) as caught:
        load_model("torchvision:resnet18", tmp_path / "scripted.pt", device="cpu")
    assert "TorchScript" in one_line(caught.value) and ".pt2" in one_line(caught.value)


# ---------------------------------------------------------------- the CLI


def test_models_all_lists_torchvision_and_timm():
    pytest.importorskip("timm")
    result = run("models", "--all", "resnet")
    assert result.exit_code == 0, result.output
    names = result.stdout.split()
    assert "torchvision:resnet18" in names and "timm:resnet18" in names
    assert "torchvision:alexnet" not in names
    rows = json.loads(run("models", "--all", "timm:resnet1*", "--json").stdout)
    assert rows and all(r["name"].startswith("timm:resnet1") for r in rows)


def test_serve_unknown_model_is_one_line():
    result = run("serve", "--model", "nosuch", "--port", "0")
    assert_one_line_error(result, "nosuch: unknown model")


def test_serve_uncached_pretrained_is_one_line(empty_torch_home):
    result = run("serve", "--model", "torchvision:resnet18", "--port", "0")
    assert_one_line_error(result, "https://download.pytorch.org/models/resnet18-f37072fd.pth")


def test_gradcam_on_a_torchvision_spec(tmp_path):
    out = tmp_path / "out"
    result = run("gradcam", skimage_photo("chelsea.png"), "--model", "torchvision:regnet_y_400mf",
                 "--weights", "random", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "chelsea_gradcam.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "torchvision:regnet_y_400mf" in json.dumps(manifest)


def test_output_index_option_on_the_cli(factory_file, tmp_path):
    spec = f"{factory_file}:two_heads"
    result = run("layers", "--model", spec, "--output-index", "0", "--json")
    assert result.exit_code == 0, result.output
    result = run("gradcam", skimage_photo("chelsea.png"), "--model", spec, "--output-index", "0",
                 "-o", tmp_path / "cam")
    assert result.exit_code == 0, result.output
    result = run("layers", "--model", spec, "--output-index", "7")
    assert_one_line_error(result, "--output-index 7")


def test_bare_module_of_another_input_size_still_wraps(tiny_cnn):
    loaded = wrap_model(tiny_cnn)  # no preprocessing given: its forward fails at 224, unmeasured
    assert loaded.stages == {} and loaded.categories == tuple(f"class {i}" for i in range(5))
    with pytest.raises(UnknownLayer) as caught:
        wrap_model(tiny_cnn, preprocess=Preprocess(resize=256, crop=224), name="tiny one")
    assert one_line(caught.value).startswith("tiny one: its forward fails on a (1, 3, 224, 224) input")


def test_web_form_models():
    from convscope.web.forms import form_model

    assert form_model("torchvision:resnet18") == ("torchvision:resnet18", "random")  # not cached here
    with pytest.raises(BadArgument, match="cannot be chosen from the web page"):
        form_model("/tmp/x.py:make")
    with pytest.raises(UnknownModel, match="did you mean"):
        form_model("torchvision:resnet1")


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(UnknownModel) as caught:
        load_model("timm:resnet18", "random", device="cpu")
    assert one_line(caught.value) == "timm:resnet18: timm is not installed (pip install convscope[timm])"


def test_pretrained_default_comes_from_torch_hub_cache(empty_torch_home):
    import torchvision
    from torchvision.models import MobileNet_V3_Small_Weights

    from convscope.web.forms import form_model

    url = MobileNet_V3_Small_Weights.DEFAULT.url
    cache = empty_torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cache.parent.mkdir(parents=True)
    torch.manual_seed(9)
    published = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(published, cache)
    loaded = load_model("torchvision:mobilenet_v3_small", device="cpu")  # no weights given: pretrained
    assert loaded.weights.startswith("pretrained (MobileNet_V3_Small_Weights.IMAGENET1K_V1")
    assert torch.equal(loaded.module.state_dict()["classifier.3.weight"], published["classifier.3.weight"])
    assert form_model("torchvision:mobilenet_v3_small") == ("torchvision:mobilenet_v3_small", "pretrained")

"""Weights loading (pretrained offline, files, checkpoints, hostile files) and real-photo classification."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from conftest import grace_hopper_path
from PIL import Image

import convscope
from convscope.errors import BadWeightsFile, WeightsMismatch, WeightsUnavailable
from convscope.models.load import load_model, wrap_model
from convscope.models.weights import CHECKPOINT_FORMAT
from convscope.training.checkpoint import make_checkpoint

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_default_model_is_pretrained_efficientnet_lite0(default_model) -> None:
    assert default_model.name == "efficientnet_lite0"
    assert default_model.weights.startswith("pretrained")
    assert len(default_model.categories) == 1000


def test_coffee_is_espresso(default_model, coffee) -> None:
    prediction = convscope.classify(default_model, coffee, topk=5)[0]
    assert prediction.labels[0] == "espresso"
    assert prediction.probabilities[0] > 0.5


def test_chelsea_is_a_cat(default_model, photo) -> None:
    prediction = convscope.classify(default_model, photo, topk=5)[0]
    assert int(prediction.indices[0]) in CAT_CLASSES


def test_grace_hopper_wears_a_military_uniform(default_model) -> None:
    image = convscope.load_image(grace_hopper_path())
    prediction = convscope.classify(default_model, image, topk=5)[0]
    assert "military uniform" in prediction.labels


def test_classify_equals_a_plain_torchvision_loop(default_model, photo, coffee) -> None:
    transform = T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3),
    ])
    batch = torch.stack([transform(photo), transform(coffee)])
    with torch.no_grad():
        expected = torch.softmax(default_model.module(batch), dim=1)
    ours = convscope.classify(default_model, [photo, coffee], topk=1000, batch_size=1)
    for row, prediction in enumerate(ours):
        full = torch.zeros(1000)
        full[prediction.indices] = prediction.probabilities
        torch.testing.assert_close(full, expected[row], atol=2e-6, rtol=1e-4)
    # The preset is torchvision's pipeline exactly.
    torch.testing.assert_close(default_model.preprocess.to_tensor([photo, coffee]), batch, atol=1e-6, rtol=0)


def test_batches_do_not_change_results(default_model, photo, coffee) -> None:
    one = convscope.classify(default_model, [photo, coffee], batch_size=1)
    two = convscope.classify(default_model, [photo, coffee], batch_size=2)
    for a, b in zip(one, two):
        assert a.labels == b.labels
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-5, rtol=1e-5)


def test_torchvision_pretrained_offline_gives_the_remedy(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CONVSCOPE_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailable, match=r"alexnet: pretrained weights are not cached.*download https://.*alexnet.*\.pth to .*--weights FILE"):
        load_model("alexnet", weights="pretrained")


def test_torchvision_pretrained_uses_the_hub_cache(monkeypatch, tmp_path) -> None:
    reference = load_model("alexnet", weights="random", seed=5)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save(reference.module.state_dict(), folder / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loaded = load_model("alexnet", weights="pretrained")
    assert "cached" in loaded.weights
    for key, value in reference.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)


def test_model_without_published_weights() -> None:
    with pytest.raises(WeightsUnavailable, match="zfnet: has no published pretrained weights"):
        load_model("zfnet", weights="pretrained")


def test_local_pth_and_safetensors_roundtrip(tmp_path) -> None:
    from safetensors.torch import save_file

    reference = load_model("tiny", weights="random", seed=7)
    state = reference.module.state_dict()
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    for file in ("w.pth", "w.safetensors", "wrapped.pt"):
        loaded = load_model("tiny", weights=tmp_path / file)
        for key, value in state.items():
            assert torch.equal(loaded.module.state_dict()[key], value), (file, key)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path) -> None:
    torch.save(load_model("tiny", weights="random").module.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(WeightsMismatch) as info:
        load_model("alexnet", weights=tmp_path / "tiny.pth")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'tiny.pth'}: does not fit model 'alexnet'")
    assert "missing keys: features.6.weight, features.6.bias" in message
    assert "unexpected keys: classifier.weight, classifier.bias" in message
    assert "features.3.weight (16, 8, 3, 3) vs (192, 64, 5, 5)" in message
    assert "\n" not in message


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/convscope-pwned",))


def test_pickle_with_code_is_refused(tmp_path) -> None:
    marker = Path("/tmp/convscope-pwned")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"weight": _Evil()}, handle)
    with pytest.raises(BadWeightsFile, match=r"evil.pth: refused to load: .*could run code"):
        load_model("tiny", weights=evil)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_garbage_weights_files(tmp_path, content: bytes) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    with pytest.raises(BadWeightsFile, match="bad.pth: "):
        load_model("tiny", weights=bad)


def test_missing_weights_file(tmp_path) -> None:
    with pytest.raises(WeightsUnavailable, match="nope.pth: no such weights file"):
        load_model("tiny", weights=tmp_path / "nope.pth")


def test_convscope_checkpoint_carries_arch_labels_and_preset(tmp_path) -> None:
    reference = load_model("zfnet_mnist", weights="random", seed=2)
    checkpoint = make_checkpoint(
        arch="zfnet_mnist", state_dict=reference.module.state_dict(), categories=reference.categories,
        preprocess=convscope.Preprocess(resize=None, crop=28, mean=(0.1,), std=(0.2,), channels=1),
        epoch=0, config={"epochs": 1},
    )
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    torch.save(checkpoint, tmp_path / "best.pt")
    loaded = load_model(weights=tmp_path / "best.pt")
    assert loaded.name == "zfnet_mnist"
    assert loaded.categories[-1] == "Ankle boot"
    assert loaded.preprocess.mean == (0.1,)
    with pytest.raises(WeightsMismatch, match="is a checkpoint of 'zfnet_mnist', not of 'alexnet_mnist'"):
        load_model("alexnet_mnist", weights=tmp_path / "best.pt")


def test_wrapped_user_module_works_everywhere(tiny_cnn) -> None:
    loaded = wrap_model(tiny_cnn, preprocess=convscope.Preprocess(resize=None, crop=16))
    # Measured: the reused ReLU runs twice, so it is no stage; the pool reads conv2's (in-place
    # rectified) output, then the pool is the last map before the classifier.
    assert loaded.stages == {"stage1": "conv2", "stage2": "pool"}
    image = Image.new("RGB", (20, 20), (120, 30, 200))
    prediction = convscope.classify(loaded, image, topk=2)[0]
    assert prediction.labels[0].startswith("class ")
    assert convscope.classify(tiny_cnn, torch.zeros(1, 3, 16, 16), topk=5)[0].indices.shape == (5,)

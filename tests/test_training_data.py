"""Training data, batch transforms, checkpoints and ablation surgery (no training here)."""

from __future__ import annotations

import errno
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convscope.errors import BadArgument, BadWeightsFile, DataError
from convscope.models.labels import DIGITS, FASHION_MNIST
from convscope.models.registry import get_spec
from convscope.preprocess import Preprocess
from convscope.training.ablation import apply_variant, count_parameters, parse_variant
from convscope.training.batches import BatchTransform, parse_augment
from convscope.training.checkpoint import (
    CheckpointWriteError,
    make_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from convscope.training.data import (
    Split,
    fashion_mnist_available,
    load_training_data,
    read_idx,
    stratified_split,
)

MNIST_PRE = get_spec("zfnet_mnist").preprocess
RGB32 = Preprocess(resize=None, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

needs_fashion = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)",
)


# -- IDX / Fashion-MNIST ------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, compressed: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if compressed else "x.idx")
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compressed else data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(_idx_bytes(np.zeros((4, 5), np.uint8))[:-3])
    with pytest.raises(DataError, match="truncated IDX file: 17 bytes of data, header says 20"):
        read_idx(short)


def test_fashion_mnist_missing_gives_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSCOPE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataError, match="Fashion-MNIST files not found .*apt-get install dataset-fashion-mnist"):
        load_training_data("fashion-mnist", preprocess=MNIST_PRE)


@needs_fashion
def test_fashion_mnist_real_files() -> None:
    data = load_training_data("fashion-mnist", preprocess=MNIST_PRE, val_split=0)
    assert data.categories == FASHION_MNIST
    assert data.train.images.shape == (60000, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test is not None and data.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    # The first training image is an ankle boot, the first test image too (the dataset's README).
    assert int(data.train.labels[0]) == 9 and int(data.test.labels[0]) == 9
    # Nothing held out: no validation split, and the test split never stands in for one.
    assert data.val is None and data.selection is None

    # By default a seeded, stratified tenth of the training images is held out to choose best.pt.
    default = load_training_data("fashion-mnist", preprocess=MNIST_PRE)
    assert default.val is not None and default.selection is default.val
    assert torch.bincount(default.val.labels).tolist() == [600] * 10
    assert torch.bincount(default.train.labels).tolist() == [5400] * 10
    assert torch.equal(default.test.images, data.test.images)
    assert default.describe()["validation"] == "10% of the training images held out per class (split seed 0)"

    small = load_training_data("fashion-mnist", preprocess=MNIST_PRE, limit=300, val_split=0.1)
    assert len(small.train) == 300 and small.val is not None and len(small.val) == 300 and len(small.test) == 300
    assert small.selection is small.val


# -- digits and splits --------------------------------------------------------------------------


def test_digits_split_is_stratified_and_fixed() -> None:
    data = load_training_data("digits", preprocess=MNIST_PRE)
    assert data.categories == DIGITS
    assert data.val is not None and len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.images.shape[1:] == (1, 8, 8)
    assert int(data.train.images.max()) == 255
    per_class_test = torch.bincount(data.test.labels, minlength=10)
    full = torch.bincount(torch.cat([data.train.labels, data.val.labels, data.test.labels]), minlength=10)
    assert torch.equal(per_class_test, (full.float() * 0.2).floor().long())
    again = load_training_data("digits", preprocess=MNIST_PRE)
    assert torch.equal(again.test.images, data.test.images)


def test_stratified_split_keeps_one_image_per_class() -> None:
    split = Split("train", torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 1]))
    train, val = stratified_split(split, 0.5, 0, 2)
    assert val is not None
    assert sorted(train.labels.tolist()) == [0, 0, 1] and val.labels.tolist() == [0, 0]


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_val_split_range(bad: float) -> None:
    with pytest.raises(BadArgument, match=r"^val_split \S+: must be at least 0 and below 1$"):
        load_training_data("digits", preprocess=MNIST_PRE, val_split=bad)


# -- folders ------------------------------------------------------------------------------------


def _image(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_folder_skips_and_counts_corrupt_images(tmp_path: Path) -> None:
    for i in range(5):
        _image(tmp_path / "cats" / f"{i}.png", 10 * i)
        _image(tmp_path / "dogs" / f"{i}.png", 200 + i)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "cats" / "empty.png").write_bytes(b"")
    (tmp_path / "cats" / "notes.txt").write_text("ignored: not an image suffix")
    data = load_training_data(tmp_path, preprocess=RGB32, val_split=0.2)
    assert data.categories == ("cats", "dogs")
    assert sorted(Path(p).name for p, _ in data.skipped) == ["broken.jpg", "empty.png"]
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert len(data.train) == 8 and data.val is not None and len(data.val) == 2
    assert data.train.images.shape[1:] == (3, 32, 32)
    # Decoded through the model's preprocessing: flat grey stays flat grey at the new size.
    cats = data.train.images[data.train.labels == 0]
    assert set(cats.flatten().tolist()) <= {0, 10, 20, 30, 40}
    assert data.describe()["skipped"][0]["reason"] in {"truncated or corrupt image data", "empty file (0 bytes)"}


def test_folder_with_train_and_test_subfolders(tmp_path: Path) -> None:
    for split, count in (("train", 4), ("test", 2)):
        for cls, value in (("a", 0), ("b", 255)):
            for i in range(count):
                _image(tmp_path / split / cls / f"{i}.png", value)
    data = load_training_data(tmp_path, preprocess=MNIST_PRE)
    assert data.categories == ("a", "b")
    assert len(data.train) == 8 and data.test is not None and len(data.test) == 4 and data.val is None
    assert data.train.images.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, r"is empty: expected one sub-folder of images per class"),
        ({"only/1.png": 1, "only/2.png": 2}, r"has only one class \(only\); training needs at least two"),
        ({"loose.png": 1}, r"holds 1 images but no class sub-folders"),
        ({"a/1.png": 1, "b/junk.txt": 0}, r"b: class folder has no readable images"),
    ],
)
def test_folder_errors(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    for name, value in layout.items():
        if name.endswith(".png"):
            _image(tmp_path / name, value)
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("x")
    with pytest.raises(DataError, match=message) as info:
        load_training_data(tmp_path, preprocess=RGB32)
    assert "\n" not in str(info.value)


def test_missing_data_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no-such: no such dataset or folder \(use fashion-mnist, digits"):
        load_training_data(str(tmp_path / "no-such"), preprocess=RGB32)


# -- batch transforms ---------------------------------------------------------------------------


def test_transform_without_augmentation_is_the_preprocessing() -> None:
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = BatchTransform(MNIST_PRE)(pixels)
    expected = (pixels.float() / 255.0 - MNIST_PRE.mean[0]) / MNIST_PRE.std[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_transform_adapts_channels_and_size() -> None:
    pixels = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = BatchTransform(RGB32)(pixels)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, (1.0 - 0.5) / 0.25))


def test_crop_is_a_window_of_the_padded_image_and_flip_mirrors() -> None:
    torch.manual_seed(0)
    pixels = torch.randint(1, 256, (6, 1, 24, 24), dtype=torch.uint8)
    pre = Preprocess(resize=None, crop=24, mean=(0.0,), std=(1.0,), channels=1)
    transform = BatchTransform(pre, ("crop", "flip"))
    out = transform(pixels, torch.Generator().manual_seed(5))
    pad = transform.pad
    assert pad == 2  # 24 / 12
    padded = torch.nn.functional.pad(pixels.float() / 255.0, (pad,) * 4)
    for i in range(6):
        windows = [
            padded[i, :, y : y + 24, x : x + 24] for y in range(2 * pad + 1) for x in range(2 * pad + 1)
        ]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows), i
    again = BatchTransform(pre, ("crop", "flip"))(pixels, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    other = BatchTransform(pre, ("crop", "flip"))(pixels, torch.Generator().manual_seed(6))
    assert not torch.equal(out, other)


def test_erase_sets_a_rectangle_to_the_mean() -> None:
    pixels = torch.full((64, 1, 20, 20), 255, dtype=torch.uint8)
    out = BatchTransform(MNIST_PRE, ("erase",))(pixels, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).any(dim=1)
    assert 16 < int(erased.sum()) < 48  # probability 1/2 per image
    for image in out[erased]:
        rows, cols = torch.nonzero(image[0] == 0, as_tuple=True)
        box = image[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert torch.all(box == 0)


def test_parse_augment() -> None:
    assert parse_augment("flip, crop,flip") == ("crop", "flip")
    assert parse_augment(None) == () and parse_augment("none") == ()
    with pytest.raises(BadArgument, match=r"^augment rotate: unknown augmentation"):
        parse_augment("crop,rotate")


# -- checkpoints --------------------------------------------------------------------------------


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convscope.training import checkpoint as module

    path = tmp_path / "last.pt"

    def checkpoint(epoch: int, weight: torch.Tensor) -> dict:
        return make_checkpoint(
            arch="zfnet_mnist", state_dict={"w": weight}, categories=DIGITS, preprocess=MNIST_PRE, epoch=epoch,
            config={"epochs": 2}, history=[{"epoch": e} for e in range(1, epoch + 1)],
        )

    write_checkpoint(path, checkpoint(1, torch.ones(3)))

    def full_disk(handle, data):  # type: ignore[no-untyped-def]
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "_write", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"last.pt: no space left on /\S* \(\d+ bytes needed\); "
                       r"the previous checkpoint is intact"):
        write_checkpoint(path, checkpoint(2, torch.zeros(1000)))
    assert read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_read_checkpoint_rejects_plain_state_dicts(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(BadWeightsFile, match="plain weights file, not a convscope training checkpoint"):
        read_checkpoint(path)


# -- ablation surgery ---------------------------------------------------------------------------


def _zfnet_mnist() -> nn.Module:
    torch.manual_seed(0)
    return get_spec("zfnet_mnist").build(10)


STAGES = dict(get_spec("zfnet_mnist").stages)
SIZE = MNIST_PRE.input_size


def test_parse_variant() -> None:
    variant = parse_variant("drop:conv3,conv4; width:conv2=48")
    assert [(o.kind, o.layer, o.width) for o in variant.operations] == [
        ("drop", "conv3", None), ("drop", "conv4", None), ("width", "conv2", 48)
    ]
    assert variant.slug == "drop-conv3-conv4-width-conv2-48"
    assert parse_variant("base").is_base
    with pytest.raises(BadArgument, match="unknown operation 'shrink'"):
        parse_variant("shrink:conv1")
    with pytest.raises(BadArgument, match="'conv2=x' is not LAYER=N"):
        parse_variant("width:conv2=x")


def test_drop_conv_stages_rewires_the_next_conv() -> None:
    model = apply_variant(_zfnet_mnist(), "drop:conv3,conv4", stages=STAGES, input_size=SIZE)
    f = model.features
    for index in (8, 9, 10, 11, 12, 13):  # conv3/bn/relu and conv4/bn/relu
        assert isinstance(f[index], nn.Identity)
    assert f[14].in_channels == 64 and f[14].out_channels == 64  # conv5 now reads conv2's 64 channels
    base = count_parameters(_zfnet_mnist())
    removed = (64 * 96 * 9 + 2 * 96) + (96 * 96 * 9 + 2 * 96) + (96 * 64 * 9 - 64 * 64 * 9)
    assert count_parameters(model) == base - removed
    assert model(torch.zeros(2, *SIZE)).shape == (2, 10)


def test_width_changes_conv_norm_and_consumer() -> None:
    model = apply_variant(_zfnet_mnist(), "width:conv2=48;width:conv5=32", stages=STAGES, input_size=SIZE)
    f = model.features
    assert f[4].out_channels == 48 and f[5].num_features == 48 and f[8].in_channels == 48
    assert f[14].out_channels == 32 and f[15].num_features == 32
    assert model.classifier[1].in_features == 32 * 9  # the 3x3 adaptive pool is kept


def test_drop_last_conv_and_a_linear_layer() -> None:
    model = apply_variant(_zfnet_mnist(), "drop:conv5;drop:classifier.1", stages=STAGES, input_size=SIZE)
    assert isinstance(model.features[14], nn.Identity)
    assert isinstance(model.classifier[1], nn.Identity) and isinstance(model.classifier[2], nn.Identity)
    assert model.classifier[4].in_features == 96 * 9


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("drop:classifier.4", "classifier.4 is the output layer and cannot be dropped"),
        ("drop:conv9", "no layer 'conv9'"),
        ("drop:features.3", "features.3 is a MaxPool2d; only Conv2d and Linear layers can change"),
        ("drop:conv2,conv2", "conv2 is already dropped"),
    ],
)
def test_impossible_variants(variant: str, message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        apply_variant(_zfnet_mnist(), variant, stages=STAGES, input_size=SIZE)


def test_variant_that_no_longer_runs() -> None:
    from torchvision.models import resnet18

    with pytest.raises(BadArgument, match=r"width:layer1.0.conv2=16: the changed network no longer runs"):
        apply_variant(resnet18(num_classes=3), "width:layer1.0.conv2=16", stages={}, input_size=(3, 64, 64))

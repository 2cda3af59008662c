"""Tests that kill the survivors of the mutmut runs (``tools/mutate.py``, issue 14).

Each test names the mutant it kills. Tiny models keep them fast: mutmut runs them once per
mutant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.errors import BadArgument
from convscope.methods.predict import classify
from convscope.models.load import wrap_model
from convscope.preprocess import Preprocess

CATEGORIES = [f"name {i}" for i in range(10)]


def _biased_classifier(outputs: int = 12) -> nn.Module:
    """Logits = bias = 0, 1, ..., outputs-1 for every image: class outputs-1 ranks first."""
    head = nn.Linear(3, outputs)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(outputs, dtype=torch.float32))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _model(outputs: int = 12):
    return wrap_model(_biased_classifier(outputs), preprocess=Preprocess(resize=None, crop=8),
                      categories=CATEGORIES)


def test_classify_refuses_topk_zero_naming_the_option() -> None:
    # kills predict mutants 1-10: `topk < 2`, `topk <= 1`, and a lost/changed subject or reason.
    with pytest.raises(BadArgument) as caught:
        classify(_model(), torch.zeros(1, 3, 8, 8), topk=0)
    assert str(caught.value) == "--topk: must be at least 1, got 0"


def test_classify_topk_one_is_the_argmax() -> None:
    # kills `topk < 2` / `topk <= 1` from the accepting side: k=1 must work.
    [prediction] = classify(_model(), torch.zeros(1, 3, 8, 8), topk=1)
    assert prediction.indices.tolist() == [11]


def test_classify_labels_past_the_category_list_are_class_numbers() -> None:
    # 12 outputs, 10 names: classes 11 and 10 rank first and have no name -> "class N";
    # kills `i <= len(categories)` (IndexError), `... or True` (IndexError), `... and False`
    # (name 9 would become "class 9").
    predictions = classify(_model(), torch.zeros(2, 3, 8, 8), topk=3)
    for prediction in predictions:
        assert prediction.labels == ("class 11", "class 10", "name 9")
        assert prediction.indices.tolist() == [11, 10, 9]


def test_classify_probabilities_are_the_softmax_over_classes_in_batches() -> None:
    # 5 images in chunks of 2 (2 + 2 + 1): every row is softmax(0..11) over the class axis.
    expected = torch.softmax(torch.arange(12, dtype=torch.float32), dim=0)
    predictions = classify(_model(), torch.randn(5, 3, 8, 8), topk=12, batch_size=2)
    assert len(predictions) == 5
    for prediction in predictions:
        torch.testing.assert_close(prediction.probabilities, expected.flip(0))
        assert float(prediction.probabilities.sum()) == pytest.approx(1.0)


def test_classify_clips_topk_to_the_number_of_classes() -> None:
    [prediction] = classify(_model(4), torch.zeros(1, 3, 8, 8), topk=50)
    assert prediction.indices.tolist() == [3, 2, 1, 0]


def test_classify_default_is_top5() -> None:
    # kills the mutant that changes the documented default `topk=5`.
    [prediction] = classify(_model(), torch.zeros(1, 3, 8, 8))
    assert prediction.indices.tolist() == [11, 10, 9, 8, 7]


# --- probes/geometry.py: the lookups by layer name and the xyxy boxes ------------------------


class _TwoBlocks(nn.Module):
    """block (conv 3x3 s1 -> ReLU) then block1 (conv 2x2 s2): names that share a prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU())
        self.block1 = nn.Conv2d(1, 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block1(self.block(x))


def test_layer_geometry_by_container_and_leaf_name() -> None:
    from convscope.probes.geometry import Geometry, layer_geometries, layer_geometry

    x = torch.zeros(1, 1, 8, 8)
    # conv 3x3 pad 1: size 3, jump 1, start 0.5 + (1 - 1) = 0.5; the ReLU keeps it.
    first = Geometry(size=3.0, jump=1.0, start=0.5)
    # then 2x2 stride 2: size 3 + 1 = 4, jump 2, start 0.5 + 0.5 = 1.0.
    second = Geometry(size=4.0, jump=2.0, start=1.0)
    model = _TwoBlocks()
    # "block" is a container: its last leaf (block.1, the ReLU), not block1 (shared prefix).
    assert layer_geometry(model, x, "block") == first
    assert layer_geometry(model, x, "block.0") == first
    assert layer_geometry(model, x, "block1") == second
    assert layer_geometries(model, x, ["block1", "block", "block.0"]) == {
        "block1": second, "block": first, "block.0": first}
    with pytest.raises(KeyError, match="blo"):
        layer_geometry(model, x, "blo")
    with pytest.raises(KeyError, match="missing"):
        layer_geometries(model, x, ["block", "missing"])


def test_layer_geometry_takes_the_last_call_of_a_reused_layer() -> None:
    from convscope.probes.geometry import layer_geometries, layer_geometry

    conv = nn.Conv2d(1, 1, 3, padding=1)
    model = nn.Sequential(conv, conv)  # the same module called twice: size 3, then 5
    x = torch.zeros(1, 1, 8, 8)
    assert layer_geometry(model, x, "0").size == 5.0
    assert layer_geometries(model, x, ["0"])["0"].size == 5.0


def test_cell_boxes_xyxy_order_and_clipping() -> None:
    from convscope.probes.geometry import Geometry, cell_box, cell_boxes_xyxy

    geo = Geometry(size=4.0, jump=2.0, start=1.0)
    # cell (row 0, col 3): centre y 1, x 7 -> rows -1..3 clipped to 0..3, cols 5..9 clipped
    # to the width 8: (x0, y0, x1, y1) = (5, 0, 8, 3). cell (2, 1): y 5 -> 3..7, x 3 -> 1..5.
    assert cell_boxes_xyxy(geo, [0, 2], [3, 1], (10, 8)) == [(5, 0, 8, 3), (1, 3, 5, 7)]
    assert cell_box(geo, 0, 3, (10, 8)) == (0, 5, 3, 8)
    with pytest.raises(ValueError):
        cell_boxes_xyxy(geo, [0, 1], [0], (10, 8))


def test_conv_output_size_default_dilation_is_one() -> None:
    from convscope.probes.geometry import conv_output_size

    # (10 + 0 - 1*(3-1) - 1) // 1 + 1 = 8; dilation 2 would give 6.
    assert conv_output_size(10, 3, 1, 0) == 8
    assert conv_output_size(10, 3, 1, 0, 2) == 6
    # (224 + 2*3 - 6 - 1) // 2 + 1 = 112
    assert conv_output_size(224, 7, 2, 3) == 112


# --- preprocess.py ------------------------------------------------------------------------


def test_to_display_inverts_normalize_and_clamps_both_ends() -> None:
    pre = Preprocess(resize=None, crop=2, mean=(0.2, 0.5, 0.7), std=(0.1, 0.3, 0.9))
    pixels = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    torch.testing.assert_close(pre.to_display(pre.normalize(pixels)), pixels)
    # a normalised value of -10 maps below 0 and +10 above 1 in every channel: clamped.
    extreme = torch.tensor([-10.0, 10.0, 0.0, 0.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    shown = pre.to_display(extreme)
    assert shown[:, :, 0, 0].tolist() == [[0.0, 0.0, 0.0]]
    assert shown[:, :, 0, 1].tolist() == [[1.0, 1.0, 1.0]]
    torch.testing.assert_close(shown[0, :, 1, 0], torch.tensor([0.2, 0.5, 0.7]))


def test_to_pil_refuses_a_non_image_naming_it() -> None:
    from convscope.errors import BadInputType

    with pytest.raises(BadInputType) as caught:
        Preprocess(resize=None, crop=8).to_pil("photo.jpg")  # type: ignore[arg-type]
    assert str(caught.value) == "image: expected a PIL image, got str"


def test_window_of_keeps_a_non_square_kernel_in_height_width_order() -> None:
    from convscope.probes.geometry import window_of

    conv = nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1))
    assert window_of(conv) == ((3, 5), (1, 2), (1, 2), (2, 1))


def test_window_of_same_and_valid_padding_strings() -> None:
    from convscope.probes.geometry import window_of

    # "same" with k=3, d=2: padding d*(k-1)//2 = 2 per side; k=(5, 3), d=1: (2, 1).
    same = nn.Conv2d(1, 1, 3, padding="same", dilation=2)
    assert window_of(same) == ((3, 3), (1, 1), (2, 2), (2, 2))
    assert window_of(nn.Conv2d(1, 1, (5, 3), padding="same"))[2] == (2, 1)
    assert window_of(nn.Conv2d(1, 1, 3, padding="valid"))[2] == (0, 0)
    assert window_of(nn.ReLU()) is None


def test_to_pil_converts_to_the_model_channels() -> None:
    from PIL import Image

    rgb = Image.new("RGB", (8, 8), (255, 0, 0))
    grey = Preprocess(resize=None, crop=8, mean=(0.5,), std=(0.5,), channels=1)
    assert grey.to_pil(rgb).mode == "L"
    assert grey.to_tensor(rgb).shape == (1, 1, 8, 8)
    # red in ITU-R 601 luma: 255 * 299/1000 = 76.2 -> 76
    assert grey.to_pil(rgb).getpixel((0, 0)) == 76
    assert Preprocess(resize=None, crop=8).to_pil(Image.new("L", (8, 8), 9)).mode == "RGB"


# -- preprocess.py survivors (tools/mutate.py preprocess) ----------------------------------------


def _noise(width: int, height: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_preprocess_load_image_pixel_limit(tmp_path) -> None:
    # kills load_image 1 (default limit 100_000_001) and 6 (the caller's max_pixels dropped).
    import struct
    import zlib

    from convscope.errors import ImageError

    def black_png(path, width: int, height: int):
        """A valid 1-bit PNG, compressed rows of zeros (a few kB for 100 M pixels)."""
        row = bytes(1 + (width + 7) // 8)
        data = zlib.compress(row * height, 1)

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
        return path

    pre = Preprocess(resize=None, crop=8)
    with pytest.raises(ImageError) as caught:
        pre.load_image(black_png(tmp_path / "big.png", 5_882_353, 17))  # 100,000,001 pixels: one over
    assert str(caught.value).endswith("image is 5882353x17 (100 Mpx), over the 100 Mpx limit")  # not Pillow's 89 Mpx
    small = tmp_path / "small.png"
    _noise(20, 20).save(small)
    with pytest.raises(ImageError, match="over the 100 px limit"):
        pre.load_image(small, max_pixels=100)


def test_preprocess_resizes_like_torchvision_when_squashing_and_when_upscaling_by_two() -> None:
    # kills to_pil 30/33 (bicubic instead of bilinear with resize=None) and 52 (scale 2.0 skipped).
    import numpy as np
    import torchvision.transforms as T

    squash = Preprocess(resize=None, crop=8)
    photo = _noise(16, 12)
    assert np.array_equal(np.asarray(squash.to_pil(photo)), np.asarray(T.Resize((8, 8))(photo)))
    upscale = Preprocess(resize=16, crop=12)
    small = _noise(20, 8)  # shorter side 8: scale exactly 2
    expected = T.CenterCrop(12)(T.Resize(16)(small))
    assert np.array_equal(np.asarray(upscale.to_pil(small)), np.asarray(expected))


def test_preprocess_normalise_keeps_the_input_dtype_and_device() -> None:
    # kills _stats 11/14/31/34 (statistics in float32 for a float64 batch) and 12/15/32/35 (on the CPU).
    pre = Preprocess(resize=None, crop=2, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = torch.linspace(0, 1, 12, dtype=torch.float64).view(1, 3, 2, 2)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    normalised = pre.normalize(pixels)
    assert normalised.dtype == torch.float64
    assert torch.equal(normalised, (pixels - mean) / std)
    assert torch.equal(pre.to_display(normalised), normalised * std + mean)
    meta = pre.normalize(torch.zeros(1, 3, 2, 2, device="meta"))
    assert meta.device.type == "meta"


def test_preprocess_names_the_remedy_for_a_list_of_tensors() -> None:
    # kills _image_list 30/31 (the hint's wording).
    from convscope.errors import BadInputType

    with pytest.raises(BadInputType) as caught:
        Preprocess(resize=None, crop=8).to_tensor([torch.zeros(3, 8, 8)])
    assert str(caught.value).endswith(
        "(pass tensors as one normalised (N, C, H, W) batch, e.g. torch.stack(list))")

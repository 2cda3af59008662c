"""convscope.preprocess: resize, crop, normalise and their inverse, checked against torchvision and
by hand (kills the mutmut survivors of ``preprocess.py``: ``tools/mutate.py preprocess``).

Inputs that tell the right code from the mutant: mean != std, one channel, a float64 batch, a
scale of exactly 2, a pixel count one over the limit. The values are worked out in the comments.
"""

from __future__ import annotations

import pytest
import torch

from convscope.preprocess import IMAGENET, Preprocess

# -- found by the hand-made mutation round (issue 14) ---------------------------------------------


def test_preprocess_with_imagenet_stats_equals_torchvision(photo) -> None:
    from torchvision import transforms

    reference = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    assert IMAGENET.mean != IMAGENET.std  # a swap of the two must show
    expected = reference(photo).unsqueeze(0)
    got = IMAGENET.to_tensor(photo)
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(IMAGENET.to_display(got), reference.transforms[2](reference.transforms[1](
        reference.transforms[0](photo))).unsqueeze(0), rtol=0, atol=1e-5)


def test_preprocess_grayscale_stats_per_channel() -> None:
    # One channel, mean 0.25, std 0.5: pixel 255 -> (1 - 0.25) / 0.5 = 1.5; pixel 0 -> -0.5.
    from PIL import Image

    pre = Preprocess(resize=None, crop=2, mean=(0.25,), std=(0.5,), channels=1)
    image = Image.new("L", (2, 2), 255)
    image.putpixel((0, 0), 0)
    torch.testing.assert_close(pre.to_tensor(image), torch.tensor([[[[-0.5, 1.5], [1.5, 1.5]]]]))


# -- survivors of the mutmut runs (tools/mutate.py preprocess) ------------------------------------


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


def test_to_pil_converts_to_the_model_channels() -> None:
    from PIL import Image

    rgb = Image.new("RGB", (8, 8), (255, 0, 0))
    grey = Preprocess(resize=None, crop=8, mean=(0.5,), std=(0.5,), channels=1)
    assert grey.to_pil(rgb).mode == "L"
    assert grey.to_tensor(rgb).shape == (1, 1, 8, 8)
    # red in ITU-R 601 luma: 255 * 299/1000 = 76.2 -> 76
    assert grey.to_pil(rgb).getpixel((0, 0)) == 76
    assert Preprocess(resize=None, crop=8).to_pil(Image.new("L", (8, 8), 9)).mode == "RGB"


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

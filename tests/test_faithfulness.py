"""``quantus_protocol``: Quantus' Pixel-Flipping and Region-Perturbation, batched.

Hand-computed curves on a linear model (order, "black", no clean point, unit-spaced AUC, block
sums and padding), argument checks, and equality with Quantus 0.6 itself on the pretrained
default model, three real photos and two methods (peer).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import skimage_photo
from PIL import Image
from torch import nn

from convscope.analysis.faithfulness import quantus_protocol
from convscope.errors import BadArgument


class Weighted(nn.Module):
    """Logit 0 is ``sum(w * x)``, logit 1 is 0: with ``softmax=False`` a curve is hand-computable."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.weights).flatten(1).sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_pixel_flipping_hand_computed() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    net = Weighted(torch.tensor([[[1.0, 10.0], [100.0, 1000.0]]]))
    maps = {"m": torch.tensor([[[0.1, 0.3], [0.2, 0.4]]])}  # order: (1,1), (0,1), (1,0), (0,0)
    result = quantus_protocol(net, x, maps, torch.tensor([0]), metrics=("pixel_flipping",),
                              features_in_step=1, softmax=False)
    curve = result.curves["m"]["pixel_flipping"]
    # each flipped value becomes the image's minimum, 1 ("black"); no point for the clean image
    assert curve.values.tolist() == [[1321.0, 1311.0, 1111.0, 1111.0]]
    assert curve.auc.tolist() == [(1321 + 1311) / 2 + (1311 + 1111) / 2 + 1111.0]
    assert curve.forwards == 3  # the last step flips (0, 0), already black: the copy of step 3, not run again
    two = quantus_protocol(net, x, maps, torch.tensor([0]), metrics=("pixel_flipping",), features_in_step=2,
                           softmax=False).curves["m"]["pixel_flipping"]
    assert two.values.tolist() == [[1311.0, 1111.0]]


class Counting(nn.Module):
    """A small convolutional net that records every copy it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        self.net[1].running_mean.uniform_(-0.2, 0.2)
        self.net[1].running_var.uniform_(0.5, 1.5)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.net(x)


def test_steps_that_change_nothing_take_the_previous_score_and_equal_a_step_by_step_loop() -> None:
    """Images whose background is their minimum ("black"), as Fashion-MNIST's: flipping a
    background feature makes the same copy again. The curves equal one forward per step (Quantus'
    loop), with fewer copies run; region-perturbation blocks that are all background too."""
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(3, 2, 8, 8, generator=generator)
    x[:, :, :4] = 0.0  # the top half of every image at the minimum
    x[1, 0] = 0.0  # and one whole channel of image 1
    maps = {"m": torch.randn(3, 8, 8, generator=generator)}
    targets = torch.tensor([0, 2, 1])
    net = Counting().eval()
    result = quantus_protocol(net, x, maps, targets, metrics=("pixel_flipping", "region_perturbation"),
                              features_in_step=4, patch_size=2, regions_evaluation=12, softmax=True, batch_size=7)
    flip = result.curves["m"]["pixel_flipping"]
    region = result.curves["m"]["region_perturbation"]
    assert flip.values.shape == (3, 32) and 0 < flip.forwards < 3 * 32 - 20
    assert region.values.shape == (3, 12) and 0 < region.forwards < 3 * 12

    # the reference: Quantus' order and "black", every step's copy run on its own
    values = maps["m"] / maps["m"].abs().max()
    with torch.no_grad():
        for n in range(3):
            black = x[n].min()
            order = np.argsort(-np.broadcast_to(values[n].numpy()[None], (2, 8, 8)).reshape(-1))
            copy = x[n].clone().reshape(-1)
            expected = []
            for k in range(32):
                copy[torch.from_numpy(order[k * 4:(k + 1) * 4].copy())] = black
                expected.append(float(torch.softmax(net(copy.view(1, 2, 8, 8)), 1)[0, targets[n]]))
            torch.testing.assert_close(flip.values[n], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_region_perturbation_hand_computed_with_padding() -> None:
    # 3x3 image, 2x2 blocks: padded by one row and column at the bottom/right (Quantus' floor/ceil
    # split); blocks in raster order: {00,01,10,11}, {02,12}, {20,21}, {22}.
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    weights = torch.tensor([[[1.0, 1.0, 10.0], [1.0, 1.0, 10.0], [100.0, 100.0, 1000.0]]])
    net = Weighted(weights)
    map_ = torch.tensor([[[0.0, 0.0, 0.2], [0.0, 0.0, 0.2], [0.1, 0.1, 0.5]]])  # block sums 0, .4, .2, .5
    result = quantus_protocol(net, x, {"m": map_}, torch.tensor([0]), metrics=("region_perturbation",),
                              patch_size=2, regions_evaluation=3, softmax=False)
    curve = result.curves["m"]["region_perturbation"]
    # drops: block {22} (9 -> 1: 8000), then {02,12} (3, 6 -> 1: 20 + 50), then {20,21} (7, 8 -> 1: 600 + 700)
    assert curve.values.tolist() == [[8000.0, 8070.0, 9370.0]]
    assert curve.auc.tolist() == [(8000 + 8070) / 2 + (8070 + 9370) / 2]
    lerf = quantus_protocol(net, x, {"m": map_}, torch.tensor([0]), metrics=("region_perturbation",),
                            patch_size=2, regions_evaluation=1, order="lerf", softmax=False)
    assert lerf.curves["m"]["region_perturbation"].values.tolist() == [[0.0 + 1 + 3 + 4]]  # block {00,01,10,11}: 2, 4, 5 -> 1


def test_result_is_json() -> None:
    x = torch.rand(2, 1, 4, 4)
    net = Weighted(torch.rand(1, 4, 4))
    result = quantus_protocol(net, x, {"a": torch.rand(2, 4, 4), "b": torch.rand(2, 1, 4, 4)}, torch.tensor([0, 1]),
                              features_in_step=4, patch_size=2, regions_evaluation=2)
    record = json.loads(json.dumps(result.as_dict()))
    assert record["settings"]["features_in_step"] == 4
    assert set(record["methods"]) == {"a", "b"}
    assert len(record["methods"]["a"]["pixel_flipping"]["curves"][1]) == 4
    assert len(record["methods"]["b"]["region_perturbation"]["curves"][0]) == 2


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"features_in_step": 3}, r"features_in_step 3: must divide H x W = 16"),
    ({"metrics": ("pixelflipping",)}, r"metric pixelflipping: must be one of pixel_flipping, region_perturbation"),
    ({"patch_size": 0}, r"patch_size 0: must be at least 1 pixel"),
    ({"order": "random"}, r"order random: must be one of morf, lerf"),
    ({"maps": {"m": torch.rand(1, 4, 4)}}, r"maps\[m\]: must be \(N, H, W\) or \(N, C, H, W\)"),
])
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    net = Weighted(torch.rand(1, 4, 4))
    arguments = {"maps": {"m": torch.rand(2, 4, 4)}, **kwargs}
    with pytest.raises(BadArgument, match=pattern):
        quantus_protocol(net, torch.rand(2, 1, 4, 4), arguments.pop("maps"), torch.tensor([0, 1]), **arguments)


@pytest.mark.peer
@pytest.mark.slow
def test_equals_quantus_on_the_default_model(default_model) -> None:
    """Three photos, Grad-CAM and saliency maps: the curves equal Quantus' lists to 1e-5."""
    import quantus
    import skimage.data

    from convscope.methods.gradcam import gradcam
    from convscope.methods.guided import saliency

    photos = [Image.open(skimage_photo("chelsea.png")).convert("RGB"), Image.open(skimage_photo("coffee.png")).convert("RGB"),
              Image.fromarray(skimage.data.astronaut())]
    batch = default_model.preprocess.to_tensor(photos)
    cam = gradcam(default_model, batch)
    maps = {"gradcam": cam.maps, "saliency": saliency(default_model, batch, target=cam.targets).maps}
    # ties (upsampling plateaus at the borders; every value three times over the channels): the
    # order of tied features must be Quantus' own
    assert cam.maps[0].numel() - torch.unique(cam.maps[0]).numel() > 1000
    step = 224 * 224 // 4
    ours = quantus_protocol(default_model, batch, maps, cam.targets, features_in_step=step, patch_size=16,
                            regions_evaluation=6)
    x, y = batch.numpy(), cam.targets.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, value in maps.items():
            a = value.numpy()
            flipping = np.asarray(quantus.PixelFlipping(features_in_step=step, disable_warnings=True)(
                model=default_model.module, x_batch=x, y_batch=y, a_batch=a, device="cpu"))
            region = np.asarray(quantus.RegionPerturbation(patch_size=16, regions_evaluation=6, disable_warnings=True)(
                model=default_model.module, x_batch=x, y_batch=y, a_batch=a, device="cpu"))
            curves = ours.curves[name]
            assert flipping.shape == tuple(curves["pixel_flipping"].values.shape) == (3, 12)
            assert region.shape == tuple(curves["region_perturbation"].values.shape) == (3, 6)
            np.testing.assert_allclose(curves["pixel_flipping"].values.numpy(), flipping, atol=1e-5, rtol=0)
            np.testing.assert_allclose(curves["region_perturbation"].values.numpy(), region, atol=1e-5, rtol=0)
            np.testing.assert_allclose(curves["pixel_flipping"].auc.numpy(), np.trapezoid(flipping, dx=1, axis=1),
                                       atol=1e-4, rtol=0)

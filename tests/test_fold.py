"""BatchNorm folded into convolutions (``probes.fold``): equal outputs, only safe pairs, the
original untouched, and classify using it."""

from __future__ import annotations

import torch
from torch import nn

import convscope
from convscope.probes.fold import fold_batchnorm, foldable_pairs


def _randomise_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return net.eval()


class Residual(nn.Module):
    """conv1's output is read by bn1 *and* by the add: bn1 must not fold into conv1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pre = nn.BatchNorm2d(8)  # a BatchNorm *before* a convolution: never folded
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = torch.relu(self.bn1(a)) + a
        c = self.bn2(self.conv2(b))
        return self.conv3(self.pre(c)).mean((2, 3))


def test_only_a_batchnorm_reading_one_convolution_alone_folds() -> None:
    net = _randomise_statistics(Residual())
    x = torch.randn(2, 3, 16, 16)
    assert foldable_pairs(net, x) == [("conv2", "bn2")]
    folded = fold_batchnorm(net, x)
    assert folded.convolutions == ("conv2",) and folded.batchnorms == ("bn2",)
    assert isinstance(folded.module.bn2, nn.Identity) and isinstance(folded.module.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded.module(x), net(x), rtol=1e-5, atol=1e-6)
    assert folded.changes("conv2") and not folded.changes("bn2") and not folded.changes("") and not folded.changes("conv1")


def test_the_original_is_untouched_and_a_changed_weight_makes_a_new_copy() -> None:
    net = _randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    first = fold_batchnorm(net, x)
    assert first.module is not net and isinstance(net[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert fold_batchnorm(net, x) is first  # cached
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    second = fold_batchnorm(net, x)
    assert second is not first
    with torch.no_grad():
        torch.testing.assert_close(second.module(x), net(x), rtol=1e-5, atol=1e-6)


def test_a_network_without_batchnorm_is_not_copied() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert fold_batchnorm(net, torch.randn(1, 3, 8, 8)).module is net


def test_classify_probabilities_equal_the_unfolded_model_on_real_photos() -> None:
    loaded = convscope.load_model("efficientnet_lite0")
    photos = [convscope.load_image(convscope.__path__[0] + f"/data/{n}.jpg") for n in ("chelsea", "coffee")]
    batch = loaded.preprocess.to_tensor(photos)
    folded = fold_batchnorm(loaded.module, batch)
    assert len(folded.convolutions) == sum(isinstance(m, nn.BatchNorm2d) for m in loaded.module.modules())
    predictions = convscope.classify(loaded, batch, topk=1000)
    with torch.no_grad():
        reference = torch.softmax(loaded.module.eval()(batch), dim=1)
    for i, prediction in enumerate(predictions):
        ours = torch.zeros(1000).scatter_(0, prediction.indices, prediction.probabilities)
        assert float((ours - reference[i]).abs().max()) < 1e-5
    assert int(predictions[0].indices[0]) == int(reference[0].argmax())


def test_a_hooked_network_is_not_folded() -> None:
    net = _randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    seen: list[tuple[int, ...]] = []
    handle = net[1].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        assert fold_batchnorm(net, torch.randn(1, 3, 8, 8)).module is net
        assert seen == []  # not even a trace ran
    finally:
        handle.remove()
    assert fold_batchnorm(net, torch.randn(1, 3, 8, 8)).module is not net

"""BatchNorm folded into convolutions (``probes.fold``): equal outputs, only safe pairs, the
original untouched, and classify using it."""

from __future__ import annotations

import torch
from torch import nn

import convscope
from convscope.probes.fastlinear import FastLinear
from convscope.probes.fold import FusedConv2d, fold_batchnorm, foldable_pairs


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


def test_a_network_without_batchnorm_or_linear_is_not_copied() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert fold_batchnorm(net, torch.randn(1, 3, 8, 8)).module is net


def test_linear_layers_become_onednn_linears_that_share_the_weights_and_equal_addmm() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 300), nn.ReLU(),
                        nn.Linear(300, 10, bias=False)).eval()
    x = torch.randn(5, 3, 8, 8)
    folded = fold_batchnorm(net, x)
    assert folded.linears == ("3", "5") and folded.convolutions == ()
    twin = folded.module
    assert all(isinstance(twin[i], FastLinear) for i in (3, 5)) and type(twin[0]) is nn.Conv2d
    # the classifier's bytes are not copied, and the original's parameters keep their grad flag
    assert twin[3].weight is net[3].weight and twin[3].bias is net[3].bias and twin[5].weight is net[5].weight
    assert twin[0].weight is not net[0].weight and all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-6)
    # every input rank F.linear takes, with and without bias, against the BLAS product
    fast = FastLinear(nn.Linear(64, 96))
    for shape in ((7, 64), (2, 3, 64), (64,)):
        value = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(fast(value), value @ fast.weight.t() + fast.bias, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert twin[5](torch.randn(4, 300)).shape == (4, 10)


def test_fast_linear_keeps_autograd_where_a_gradient_is_wanted() -> None:
    fast = FastLinear(nn.Linear(16, 8))
    x = torch.randn(3, 16, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and fast.weight.grad is not None
    torch.testing.assert_close(x.grad, fast.weight.sum(0).expand(3, 16))


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


# ---------------------------------------------------------------- fuse=True: pads and activations


class SamePadded(nn.Module):
    """TensorFlow "same" stride-2 layers: explicit asymmetric zero pads before unpadded convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))  # 3 dense input channels: 21 extra taps, stays a pad
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.pad3 = nn.ZeroPad2d((0, 1, 0, 1))
        self.depthwise3 = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.pad5 = nn.ZeroPad2d((1, 2, 1, 2))
        self.depthwise5 = nn.Conv2d(8, 8, 5, stride=2, groups=8, bias=False)
        self.skew = nn.ZeroPad2d((2, 1, 0, 0))  # more before than after, and only on one axis
        self.depthwise_skew = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.stem_pad(x))
        x = self.depthwise3(self.pad3(x))
        x = self.depthwise5(self.pad5(x))
        return self.depthwise_skew(self.skew(x))


def test_pads_fold_into_depthwise_kernels_with_equal_outputs() -> None:
    torch.manual_seed(0)
    net = SamePadded().eval()
    x = torch.randn(2, 3, 30, 30)
    folded = fold_batchnorm(net, x, fuse=True)
    assert folded.pads == (("pad3", "depthwise3"), ("pad5", "depthwise5"), ("skew", "depthwise_skew"))
    copy = folded.module
    assert isinstance(copy.pad3, nn.Identity) and isinstance(copy.stem_pad, nn.ZeroPad2d)
    assert copy.depthwise3.kernel_size == (4, 4) and copy.depthwise3.padding == (1, 1)
    assert copy.depthwise5.kernel_size == (6, 6) and copy.depthwise5.padding == (2, 2)
    # (2, 1) before/after plus the conv's own 1 on the width only
    assert copy.depthwise_skew.kernel_size == (3, 4) and copy.depthwise_skew.padding == (1, 3)
    assert torch.equal(copy.depthwise3.weight[:, :, 0], torch.zeros(8, 1, 4))  # the zero row in front
    assert torch.equal(copy.depthwise_skew.weight[:, :, :, 3], torch.zeros(8, 1, 3))  # the zero column after
    with torch.no_grad():
        torch.testing.assert_close(copy(x), net(x), rtol=0, atol=1e-6)
        odd = torch.randn(1, 3, 33, 27)  # other sizes too: the fold is exact for any input
        torch.testing.assert_close(fold_batchnorm(net, odd, fuse=True).module(odd), net(odd), rtol=0, atol=1e-6)
    assert folded.changes("pad3") and not folded.changes("depthwise3") and not folded.changes("stem_pad")
    assert isinstance(net.pad3, nn.ZeroPad2d) and net.depthwise3.kernel_size == (3, 3)  # original untouched
    assert fold_batchnorm(net, x).pads == ()  # only on request


class Activated(nn.Module):
    """conv-bn-relu6 (in place), conv-relu, and a conv whose map is also read by an add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act3 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        b = self.conv3(a)
        return self.act3(b) + b  # conv3's raw map is read by the add too: no fusion


def test_activations_fuse_into_convolutions_only_where_nothing_else_reads_the_map() -> None:
    torch.manual_seed(0)
    net = _randomise_statistics(Activated())
    x = torch.randn(2, 3, 12, 12) * 4  # wide enough that ReLU6 clips at both ends
    folded = fold_batchnorm(net, x, fuse=True)
    assert folded.activations == (("conv1", "act1"), ("conv2", "act2"))
    assert folded.convolutions == ("conv1",)
    copy = folded.module
    assert isinstance(copy.conv1, FusedConv2d) and isinstance(copy.act1, nn.Identity)
    assert type(copy.conv3) is nn.Conv2d and isinstance(copy.act3, nn.ReLU6)
    assert folded.changes("conv2") and not folded.changes("act2")
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(copy(x), expected, rtol=1e-5, atol=1e-5)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(copy(channels_last), expected, rtol=1e-5, atol=1e-5)
        clipped = copy.conv1(x)
    assert float(clipped.max()) == 6.0 and float(clipped.min()) == 0.0


def test_fused_convolution_falls_back_to_conv_then_clamp_off_the_fast_path() -> None:
    torch.manual_seed(0)
    conv, act = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU6()
    fused = FusedConv2d(conv, act)
    x = torch.randn(2, 4, 9, 9) * 5
    with torch.no_grad():
        expected = act(conv(x))
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(x.double().float()), expected, rtol=1e-5, atol=1e-5)
    fused.fast = False  # the plain path: conv, then the clamp
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-6, atol=1e-6)
    assert fused.weight is conv.weight and "fused=hardtanh(0.0, 6.0)" in repr(fused)


def test_a_fused_copy_that_disagrees_with_the_original_is_not_used(monkeypatch) -> None:
    net = _randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, x: nn.Conv2d.forward(self, x) + 1.0)
    folded = fold_batchnorm(net, torch.randn(1, 3, 8, 8), fuse=True)
    assert folded.activations == () and folded.convolutions == ("0",)
    assert isinstance(folded.module[2], nn.ReLU)


def test_plain_and_fused_copies_are_cached_side_by_side() -> None:
    net = _randomise_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    plain, fused = fold_batchnorm(net, x), fold_batchnorm(net, x, fuse=True)
    assert plain is not fused and fused.activations == (("0", "2"),) and plain.activations == ()
    assert fold_batchnorm(net, x) is plain and fold_batchnorm(net, x, fuse=True) is fused


def test_classify_fuses_efficientnet_lite_pads_and_relu6_within_1e5_on_real_photos(default_model, photo, coffee) -> None:
    loaded = default_model
    batch = loaded.preprocess.to_tensor([photo, coffee])
    folded = fold_batchnorm(loaded.module, batch, fuse=True)
    # the four stride-2 depthwise pads fold; the stem's (3 dense channels) does not
    assert [pad for pad, _ in folded.pads] == [f"features.{i}.0.depthwise.pad" for i in (2, 3, 4, 6)]
    assert len(folded.activations) == sum(isinstance(m, nn.ReLU6) for m in loaded.module.modules()) == 33
    assert isinstance(loaded.module.features[2][0].depthwise.pad, nn.ZeroPad2d)  # the model keeps its own
    predictions = convscope.classify(loaded, batch, topk=1000)
    with torch.no_grad():
        reference = torch.softmax(loaded.module.eval()(batch), dim=1)
        fused = torch.softmax(folded.module(batch), dim=1)
    assert float((fused - reference).abs().max()) < 1e-5
    for i, prediction in enumerate(predictions):
        ours = torch.zeros(1000).scatter_(0, prediction.indices, prediction.probabilities)
        assert float((ours - reference[i]).abs().max()) < 1e-5
        assert int(prediction.indices[0]) == int(reference[i].argmax())
